"""A second Co-DINO golden fixture of the same format, derived from the shared one with other settings.

    derive(src, dst, seed=3, num_queries=300, num_classes=20)

writes into `dst`: keys.tsv (the source's, with the query and class dimensions changed), make_weights.py (the
source's), fixture.json (the new seed and sizes), inputs.pt (the source's two images in swapped order, labels taken
modulo the class count) and expected.pt, computed by our model through its production paths (`build_model`,
`convert_official_state_dict`, `CoDETR.run`, the head's loss, the aux heads). Running tests/test_golden_codino.py
on `dst` checks that the golden test reads every setting from its fixture instead of assuming the one it was
written against. (It proves nothing about faithfulness: the shared fixture, computed by the authors' code, does.)
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
from pathlib import Path

import torch

AUX_TERMS = ("loss_cls1", "loss_bbox1", "loss_centerness1", "loss_rpn_bbox", "loss_bbox0", "acc0")
# authors' keys whose leading dimension is the class count (c: nc, c1: nc + 1, c4: 4 nc) or the query count (q)
_RESIZE = [
    (re.compile(r"query_head\.transformer\.query_embed\.weight$"), "q"),
    (re.compile(r"query_head\.cls_branches\.\d+\.(weight|bias)$"), "c"),
    (re.compile(r"query_head\.dn_generator\.label_embedding\.weight$"), "c"),
    (re.compile(r"bbox_head\.\d+\.atss_cls\.(weight|bias)$"), "c"),
    (re.compile(r"roi_head\.\d+\.bbox_head\.fc_cls\.(weight|bias)$"), "c1"),
    (re.compile(r"roi_head\.\d+\.bbox_head\.fc_reg\.(weight|bias)$"), "c4"),
]


def _keys(src: Path, dst: Path, num_queries: int, num_classes: int) -> None:
    size = {"q": num_queries, "c": num_classes, "c1": num_classes + 1, "c4": 4 * num_classes}
    lines = []
    for line in (src / "keys.tsv").read_text().splitlines():
        name, shape, dtype = line.split("\t")
        dims = list(ast.literal_eval(shape))
        for pattern, kind in _RESIZE:
            if pattern.search(name):
                dims[0] = size[kind]
        lines.append(f"{name}\t{tuple(dims)}\t{dtype}")
    (dst / "keys.tsv").write_text("\n".join(lines) + "\n")


def _stats(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([x.mean(), x.std(), x.abs().mean()])


def derive(src: Path, dst: Path, seed: int, num_queries: int, num_classes: int) -> dict:
    from pipeline.checkpoints.convert import convert_official_state_dict
    from pipeline.models import build_model
    from pipeline.models.box_ops import box_xyxy_to_cxcywh
    from pipeline.models.config import CoConfig, ModelConfig, TestConfig, TransformerConfig
    from pipeline.models.loss_weights import loss_weights, weigh
    from pipeline.models.query_head.postprocess import detr_postprocess_with_pre_nms

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "make_weights.py", dst / "make_weights.py")
    _keys(src, dst, num_queries, num_classes)
    fixture = {**json.loads((src / "fixture.json").read_text()), "seed": seed, "num_queries": num_queries,
               "num_classes": num_classes}  # fmt: skip
    (dst / "fixture.json").write_text(json.dumps(fixture))
    inp = torch.load(src / "inputs.pt", weights_only=False)
    order = [1, 0]
    inp = {**inp, "images_uint8_hwc": [inp["images_uint8_hwc"][i] for i in order],
           "img_shapes": [inp["img_shapes"][i] for i in order],
           "gt_bboxes_xyxy": [inp["gt_bboxes_xyxy"][i] for i in order],
           "gt_labels": [inp["gt_labels"][i] % num_classes for i in order]}  # fmt: skip
    torch.save(inp, dst / "inputs.pt")
    topk = len(torch.load(src / "expected.pt", weights_only=False)["det_pre_nms"][0]["scores"])

    spec = importlib.util.spec_from_file_location(f"derived_make_weights_{seed}", dst / "make_weights.py")
    make_weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_weights)
    make_weights.KEYS = str(dst / "keys.tsv")
    official = {n: make_weights.make_tensor(n, s, d, seed) for n, s, d in make_weights.read_keys(make_weights.KEYS)}
    cfg = ModelConfig(num_classes=num_classes, co=CoConfig(aux_heads=("atss", "faster_rcnn")),
                      transformer=TransformerConfig(num_queries=num_queries), test=TestConfig(topk=topk))
    model = build_model(cfg)
    model.load_state_dict(convert_official_state_dict(official, cfg.co.aux_heads), strict=True)
    model.eval()

    h, w = inp["batch_shape"]
    mean, std = torch.tensor(inp["pixel_mean"]).view(3, 1, 1), torch.tensor(inp["pixel_std"]).view(3, 1, 1)
    images = torch.zeros(len(order), 3, h, w)
    for i, im in enumerate(inp["images_uint8_hwc"]):
        images[i, :, : im.shape[0], : im.shape[1]] = (im.permute(2, 0, 1).float() - mean) / std
    sizes = torch.tensor(inp["img_shapes"])
    with torch.no_grad():
        feats = model.backbone(images)
        maps = model.neck(feats)
        out = model.run(images, sizes)
        adapter = model.adapter(out.enc.memory, out.enc.spatial_shapes)
        dets = [detr_postprocess_with_pre_nms(out.logits[-1, b], out.boxes[-1, b], sizes[b], topk=topk, nms="soft",
                                              iou_threshold=0.8, max_per_img=topk) for b in range(len(order))]
        targets = []
        for b, (ih, iw) in enumerate(inp["img_shapes"]):
            factor = torch.tensor([iw, ih, iw, ih], dtype=torch.float32)
            targets.append({"boxes": box_xyxy_to_cxcywh(inp["gt_bboxes_xyxy"][b] / factor),
                            "labels": inp["gt_labels"][b], "size": torch.tensor([ih, iw])})
        losses = model.head.loss(out.logits, out.boxes, out.selection.logits, out.selection.boxes, targets, sizes)
        model.train()
        aux: dict[str, torch.Tensor] = {}
        for head in model.aux_heads:
            if head.name == "atss":
                head.pad_size_divisor = 0  # the reference's ATSS counts every anchor valid (README)
            torch.manual_seed(0)
            aux.update(weigh(head.forward_train(adapter, targets, sizes)[0], loss_weights(cfg)))
    expected = {
        "stats": {"backbone": [_stats(x) for x in feats], "neck": [_stats(x) for x in maps],
                  "aux_adapter": [_stats(x) for x in adapter], "enc_memory": _stats(out.enc.memory)},
        "enc_topk_anchors": out.selection.boxes, "enc_topk_max_logit": out.selection.logits.max(-1)[0],
        "dec_references": out.references, "all_bbox_preds": out.boxes,
        "cls_logits_first_last": torch.stack([out.logits[0], out.logits[-1]]),
        "det_pre_nms": [{"bboxes": p["boxes"], "scores": p["scores"], "labels": p["labels"]} for p, _ in dets],
        "det": [{"bboxes": d["boxes"], "scores": d["scores"], "labels": d["labels"]} for _, d in dets],
        "train_losses_deterministic": {**{k: v.detach() for k, v in losses.items()},
                                       **{k: aux[k].detach() for k in AUX_TERMS}},
    }  # fmt: skip
    torch.save(expected, dst / "expected.pt")
    return fixture
