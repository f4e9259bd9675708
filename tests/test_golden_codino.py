"""Our Co-DINO (inference, one-to-one and aux head losses) against the authors' model on the golden fixture.

The fixture (shared/golden/co_dino_r50, README there) holds outputs of the authors' mmdet 3.x Co-DINO R50 for
deterministic random weights keyed by the authors' state-dict names. We rebuild those weights, map them with
`convert_official_state_dict` onto a K = 2 model (strict load), run one forward pass on the two fixture images
and compare every stage.

Tolerances (float32 on CPU; summation order differs from the reference):
- stats (mean, std, mean|x|) of backbone / neck / memory / adapter maps: 1e-5 abs;
- encoder top-k anchors, decoder references, per-layer boxes (normalised): 1e-4 abs; top-k max logits and
  class logits: 1e-4 abs;
- detections before / after soft-NMS: boxes 2e-3 px abs (images ~400 px), scores 1e-5 / 5e-5 abs (soft-NMS
  decays scores by IoUs of class-offset boxes, coordinates up to ~3e4 px in float32), labels equal;
- the 21 one-to-one losses (decoder layers + encoder proposals): 1e-4 relative;
- the 6 remaining deterministic training terms, from the aux heads (train mode, the fixture's boxes): ATSS
  loss_cls1 / loss_bbox1 / loss_centerness1, loss_rpn_bbox, RoI loss_bbox0 and acc0: 1e-4 relative
  (max(1, |ref|) as the scale). RPN / RoI sampling is random, but these terms do not depend on it here: every
  positive fits the quotas (RPN 128, RoI 128 of 512) and enough negatives exist to fill 256 / 512 per image,
  so the normalisers (RPN #pos + #neg = 256 per image, RoI #sampled = 512 per image) are fixed, and acc0 is 0
  for any draw (no sampled RoI is classified correctly with these weights); checked by a second draw.
  ATSS runs with every anchor of the batch maps valid (pad_size_divisor=0): the reference's loss_cls1 shows
  that (per-image valid flags give 12.4887 instead of 12.5889).
Near ties: top-k orders of values equal to ~1e-6 (encoder max logits, detection scores) may swap neighbours
in float32; `_align` re-pairs such neighbours (score gap < 1e-5) before comparing, and the decoder is run on
the top-k in the reference's order (a swap of two equal-score proposals exchanges their content queries).
Runs one R50 forward at 320x416 (batch 2) and the aux heads on CPU: ~20 s on an idle 2-core machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("CODETR_GOLDEN_DIR", REPO.parent / "shared" / "golden" / "co_dino_r50"))

pytestmark = [
    pytest.mark.skipif(not (GOLDEN / "expected.pt").exists(), reason=f"golden fixture not found at {GOLDEN}"),
]


def _fixture(directory: Path = GOLDEN) -> dict:
    """fixture.json: every parameter the case was computed with (seed, num_classes, num_queries)."""
    return json.loads((directory / "fixture.json").read_text())


def _official_weights(directory: Path = GOLDEN) -> dict[str, torch.Tensor]:
    """The authors'-named weights of the case in `directory`, rebuilt with the seed of its fixture.json."""
    return _make_weights(directory).official_state_dict(seed=int(_fixture(directory)["seed"]))


def _model_config(fixture: dict, topk: int):
    from pipeline.models.config import CoConfig, ModelConfig, TestConfig, TransformerConfig

    # K = 2 (the fixture's heads); mmdet 3.x takes the top max_per_img before NMS (topk: the reference's count)
    return ModelConfig(num_classes=int(fixture["num_classes"]), co=CoConfig(aux_heads=("atss", "faster_rcnn")),
                       transformer=TransformerConfig(num_queries=int(fixture["num_queries"])),
                       test=TestConfig(topk=topk, max_per_img=topk))


def _batch(inp: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's batch: images normalised and placed top-left on a zero canvas, sizes, padding masks."""
    h, w = inp["batch_shape"]
    n = len(inp["images_uint8_hwc"])
    mean = torch.tensor(inp["pixel_mean"]).view(3, 1, 1)
    std = torch.tensor(inp["pixel_std"]).view(3, 1, 1)
    images = torch.zeros(n, 3, h, w)
    for i, im in enumerate(inp["images_uint8_hwc"]):
        x = (im.permute(2, 0, 1).float() - mean) / std
        images[i, :, : x.shape[1], : x.shape[2]] = x
    masks = torch.ones(n, h, w, dtype=torch.bool)
    for i, (ih, iw) in enumerate(inp["img_shapes"]):
        masks[i, :ih, :iw] = False
    return images, torch.tensor(inp["img_shapes"]), masks


def _make_weights(directory: Path = GOLDEN):
    spec = importlib.util.spec_from_file_location(f"golden_make_weights_{abs(hash(str(directory)))}",
                                                  directory / "make_weights.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _stats(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([x.mean(), x.std(), x.abs().mean()])


def _align(ours: torch.Tensor, ref: torch.Tensor, ref_scores: torch.Tensor, our_scores: torch.Tensor,
           tol: float, window: int = 4) -> torch.Tensor:
    """Indices j(i) into `ours` pairing each reference row i with our row of (nearly) equal score nearby.

    ours, ref: (N, D) rows compared with `tol`; scores (N,). Rows equal at i keep j = i; otherwise the best
    row within +-window whose score is within 1e-5 of the reference's is taken.
    """
    n = ref.shape[0]
    idx = torch.arange(n)
    for i in range(n):
        if (ours[i] - ref[i]).abs().max() <= tol:
            continue
        lo, hi = max(0, i - window), min(n, i + window + 1)
        j = lo + int((ours[lo:hi] - ref[i]).abs().max(-1)[0].argmin())
        assert abs(float(our_scores[j] - ref_scores[i])) < 1e-5, f"row {i}: no near-tie partner ({i} vs {j})"
        idx[i] = j
    assert len(set(idx.tolist())) == n, "near-tie alignment is not a permutation"
    return idx


@pytest.fixture(scope="module")
def golden():
    from pipeline.checkpoints.convert import convert_official_state_dict
    from pipeline.models import build_model
    from pipeline.models.aux_heads.adapter import MultiScaleAdapter
    from pipeline.models.box_ops import box_xyxy_to_cxcywh

    torch.manual_seed(0)
    exp = torch.load(GOLDEN / "expected.pt", weights_only=False)
    inp = torch.load(GOLDEN / "inputs.pt", weights_only=False)
    fixture = _fixture()
    official = _official_weights()
    topk = len(exp["det_pre_nms"][0]["scores"])  # the reference's pre-NMS top-k (mmdet 3.x: max_per_img)
    cfg = _model_config(fixture, topk)
    nq, nc = cfg.transformer.num_queries, cfg.num_classes
    model = build_model(cfg)
    model.load_state_dict(convert_official_state_dict(official, cfg.co.aux_heads), strict=True)
    model.eval()
    adapter = model.adapter
    assert isinstance(adapter, MultiScaleAdapter)

    h, w = inp["batch_shape"]
    images, sizes, masks = _batch(inp)
    n = len(images)

    from pipeline.models.layers.padding_mask import padding_masks_from_sizes

    r: dict = {"exp": exp, "model": model, "sizes": sizes, "num_queries": nq, "num_classes": nc, "n": n}
    with torch.no_grad():
        assert torch.equal(model.image_sizes(images, masks, None, None), sizes)
        r["backbone"] = model.backbone(images)
        r["neck"] = model.neck(r["backbone"])
        tr = model.transformer
        enc = tr.encode(r["neck"], padding_masks_from_sizes(sizes, (h, w)))
        r["enc"] = enc
        r["adapter"] = adapter(enc.memory, enc.spatial_shapes)
        sel = tr.select_queries(enc, model.head.cls_branches[6], model.head.reg_branches[6])
        r["sel"] = sel
        perm = torch.stack([
            _align(sel.boxes[b], exp["enc_topk_anchors"][b], exp["enc_topk_max_logit"][b],
                   sel.logits[b].max(-1)[0], 1e-4)
            for b in range(n)
        ])  # fmt: skip
        r["perm"] = perm

        def gather(x):
            return torch.gather(x, 1, perm[..., None].expand(-1, -1, x.shape[-1]))

        r["topk_boxes"], r["topk_logits"] = gather(sel.boxes), gather(sel.logits)
        query = tr.query_embed.weight[None].expand(n, -1, -1)
        hidden, refs = tr.decode(query, gather(sel.ref_logits).sigmoid(), enc, model.head.reg_branches)
        r["refs"] = refs
        r["logits"], r["boxes"] = model.head.predict(hidden, refs)
        from pipeline.models.query_head.postprocess import detr_postprocess_with_pre_nms

        r["dets"] = [detr_postprocess_with_pre_nms(r["logits"][-1, b], r["boxes"][-1, b], sizes[b], topk=topk,
                                                   nms="soft", iou_threshold=0.8, max_per_img=topk)
                     for b in range(n)]  # fmt: skip
        targets = []
        for b, (ih, iw) in enumerate(inp["img_shapes"]):
            factor = torch.tensor([iw, ih, iw, ih], dtype=torch.float32)
            boxes = box_xyxy_to_cxcywh(inp["gt_bboxes_xyxy"][b] / factor)
            targets.append({"boxes": boxes, "labels": inp["gt_labels"][b], "size": torch.tensor([ih, iw])})
        r["losses"] = model.head.loss(r["logits"], r["boxes"], r["topk_logits"], r["topk_boxes"], targets, sizes)

        # aux heads on the adapter maps, in train mode; the fixture's ATSS counts every anchor as valid
        model.train()
        heads = {h.name: h for h in model.aux_heads}
        heads["atss"].pad_size_divisor = 0
        from pipeline.models.loss_weights import loss_weights, weigh  # heads return unweighted terms

        weights = loss_weights(cfg)
        r["aux_losses"], r["aux_positives"] = {}, {}
        for name, head in heads.items():
            torch.manual_seed(0)
            losses, r["aux_positives"][name] = head.forward_train(r["adapter"], targets, sizes)
            r["aux_losses"].update(weigh(losses, weights))
        torch.manual_seed(1)  # another RPN / RoI draw
        r["rcnn_redraw"] = weigh(heads["faster_rcnn"].forward_train(r["adapter"], targets, sizes)[0], weights)
        model.eval()
        r["official"] = official
    return r


def test_feature_stats(golden):
    stats = golden["exp"]["stats"]
    for name, ours in (("backbone", golden["backbone"]), ("neck", golden["neck"]), ("aux_adapter", golden["adapter"])):
        assert len(ours) == len(stats[name])
        for i, x in enumerate(ours):
            torch.testing.assert_close(_stats(x), stats[name][i], atol=1e-5, rtol=0, msg=f"{name}[{i}]")
    torch.testing.assert_close(_stats(golden["enc"].memory), stats["enc_memory"], atol=1e-5, rtol=0)


def test_encoder_proposals(golden):
    exp = golden["exp"]
    torch.testing.assert_close(golden["topk_boxes"], exp["enc_topk_anchors"], atol=1e-4, rtol=0)
    torch.testing.assert_close(golden["topk_logits"].max(-1)[0], exp["enc_topk_max_logit"], atol=1e-4, rtol=0)
    # near-tie swaps only: at most a handful of neighbours exchanged
    assert (golden["perm"] != torch.arange(golden["num_queries"])).sum() <= 20


def test_decoder_references_boxes_logits(golden):
    exp = golden["exp"]
    torch.testing.assert_close(golden["refs"], exp["dec_references"], atol=1e-4, rtol=0)
    torch.testing.assert_close(golden["boxes"], exp["all_bbox_preds"], atol=1e-4, rtol=0)
    first_last = torch.stack([golden["logits"][0], golden["logits"][-1]])
    torch.testing.assert_close(first_last, exp["cls_logits_first_last"], atol=1e-4, rtol=0)


def _det_rows(boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.cat([boxes / 100.0, labels[:, None].float()], 1)  # boxes in units of 100 px


@pytest.mark.parametrize("stage", ["det_pre_nms", "det"])
def test_detections(golden, stage):
    for b in range(golden["n"]):
        ref = golden["exp"][stage][b]
        ours = golden["dets"][b][0 if stage == "det_pre_nms" else 1]
        assert ours["boxes"].shape == ref["bboxes"].shape
        idx = _align(_det_rows(ours["boxes"], ours["labels"]), _det_rows(ref["bboxes"], ref["labels"]),
                     ref["scores"], ours["scores"], 2e-5)  # fmt: skip
        torch.testing.assert_close(ours["boxes"][idx], ref["bboxes"], atol=2e-3, rtol=0)
        torch.testing.assert_close(ours["scores"][idx], ref["scores"], atol=1e-5 if stage == "det_pre_nms" else 5e-5,
                                   rtol=0)
        assert torch.equal(ours["labels"][idx], ref["labels"])


def test_model_detections_wiring(golden):
    """CoDETR's eval post-processing (TestConfig -> detr_postprocess) gives the reference detections."""
    from pipeline.models.co_detr import detections

    dets = detections(golden["logits"][-1], golden["boxes"][-1], golden["sizes"], golden["model"].test_cfg)
    for b in range(golden["n"]):
        ref, ours = golden["exp"]["det"][b], dets[b]
        assert ours["boxes"].shape == ref["bboxes"].shape
        idx = _align(_det_rows(ours["boxes"], ours["labels"]), _det_rows(ref["bboxes"], ref["labels"]),
                     ref["scores"], ours["scores"], 2e-5)  # fmt: skip
        torch.testing.assert_close(ours["boxes"][idx], ref["bboxes"], atol=2e-3, rtol=0)
        torch.testing.assert_close(ours["scores"][idx], ref["scores"], atol=5e-5, rtol=0)


def test_one_to_one_losses(golden):
    ref = golden["exp"]["train_losses_deterministic"]
    names = [k for k in ref if k.startswith(("loss_", "d0.", "d1.", "d2.", "d3.", "d4.", "enc_"))
             and not k.endswith(("0", "1")) and "rpn" not in k]  # fmt: skip
    assert len(names) == 21, names
    assert set(golden["losses"]) == set(names)
    for k in names:
        ours, theirs = float(golden["losses"][k]), float(ref[k])
        assert abs(ours - theirs) <= 1e-4 * max(1.0, abs(theirs)), f"{k}: {ours} vs {theirs}"


AUX_TERMS = ("loss_cls1", "loss_bbox1", "loss_centerness1", "loss_rpn_bbox", "loss_bbox0", "acc0")


def test_aux_head_losses(golden):
    """The 6 deterministic aux terms; with the 21 one-to-one losses they are all 27 deterministic terms."""
    ref = golden["exp"]["train_losses_deterministic"]
    assert len(ref) == 27 and set(AUX_TERMS) | set(golden["losses"]) == set(ref)
    for k in AUX_TERMS:
        ours, theirs = float(golden["aux_losses"][k]), float(ref[k])
        assert abs(ours - theirs) <= 1e-4 * max(1.0, abs(theirs)), f"{k}: {ours} vs {theirs}"


def test_rpn_roi_terms_do_not_depend_on_sampling(golden):
    """Another RPN / RoI draw: the random terms change, the compared ones do not; 512 RoIs per image."""
    first, again = golden["aux_losses"], golden["rcnn_redraw"]
    for k in ("loss_rpn_bbox", "loss_bbox0", "acc0"):
        assert abs(float(first[k]) - float(again[k])) <= 1e-6 * max(1.0, abs(float(first[k]))), k
    assert float(first["loss_rpn_cls"]) != float(again["loss_rpn_cls"])  # the draw did change
    rcnn = golden["aux_positives"]["faster_rcnn"]
    for labels in rcnn.labels:
        positives = int((labels < golden["num_classes"]).sum())
        assert labels.numel() == 512 and 0 < positives < 128  # all positives + negatives = 512


def test_deployed_keys_load_into_k0_model(golden):
    """The K = 0 conversion of the same checkpoint is exactly the deployed part of the K = 2 model."""
    from pipeline.checkpoints.convert import convert_official_state_dict

    deployed = convert_official_state_dict(golden["official"], aux_heads=())
    assert set(deployed) == set(golden["model"].inference_state_dict())


def test_reseeded_fixture_is_rejected_at_the_first_stage(tmp_path):
    """A copy of the fixture whose fixture.json names another seed: its weights must not reproduce the expected
    backbone output. Proves the test reads the seed (and that the comparison has teeth)."""
    from pipeline.checkpoints.convert import convert_official_state_dict
    from pipeline.models import build_model

    for f in GOLDEN.iterdir():
        if f.is_file() and f.name != "fixture.json":
            shutil.copy(f, tmp_path / f.name)
    fixture = _fixture()
    (tmp_path / "fixture.json").write_text(json.dumps({**fixture, "seed": int(fixture["seed"]) + 1}))
    exp = torch.load(tmp_path / "expected.pt", weights_only=False)
    inp = torch.load(tmp_path / "inputs.pt", weights_only=False)
    cfg = _model_config(_fixture(tmp_path), len(exp["det_pre_nms"][0]["scores"]))
    model = build_model(cfg).eval()
    model.load_state_dict(convert_official_state_dict(_official_weights(tmp_path), cfg.co.aux_heads), strict=True)
    with torch.no_grad():
        c2 = model.backbone(_batch(inp)[0])[0]
    diff = (_stats(c2) - exp["stats"]["backbone"][0]).abs().max().item()
    assert diff > 1e-3, f"re-seeded weights reproduced the first stage (max stat diff {diff:.2e})"


def test_passes_on_a_fixture_with_other_settings(tmp_path):
    """Not tied to the one fixture it was written against: a second fixture of the same format (seed 3, 300
    queries, 20 classes, the two images in swapped order; tests/golden_codino_derive.py, expected outputs from our
    production paths) passes every other test of this module."""
    import subprocess

    from golden_codino_derive import derive

    derive(GOLDEN, tmp_path / "fixture", seed=3, num_queries=300, num_classes=20)
    env = {**os.environ, "CODETR_GOLDEN_DIR": str(tmp_path / "fixture")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "not other_settings and not reseeded"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:]
