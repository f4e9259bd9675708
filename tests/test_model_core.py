"""Co-DINO core: denoising layout, look-forward-twice, encoder proposals, train/eval paths, shipped configs.

Tiny shapes throughout (embed 32-128, 2-3 layers, images <= 96 px); the whole file runs in a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import from_dict
from pipeline.models.config import CoConfig, ModelConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "model").glob("*.yaml"))


def tiny_config(**overrides) -> ModelConfig:
    """configs/model/co_dino_tiny.yaml made smaller still for unit tests (resnet10t, 50 queries), K = 0."""
    data = yaml.safe_load((REPO / "configs" / "model" / "co_dino_tiny.yaml").read_text())["model"]
    data["backbone"]["name"] = "resnet10t"
    data["transformer"].update(ffn_dim=128, num_queries=50)
    data["dn"]["num_dn_queries"] = 10
    data["test"].update(topk=50, max_per_img=50)
    data["co"] = {"aux_heads": []}
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(ModelConfig, data)


def _targets(boxes_per_image: list[int], num_classes: int = 80, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in boxes_per_image:
        cxcy = 0.3 + 0.4 * torch.rand(n, 2, generator=g)
        wh = 0.1 + 0.3 * torch.rand(n, 2, generator=g)
        out.append({"boxes": torch.cat([cxcy, wh], 1), "labels": torch.randint(0, num_classes, (n,), generator=g)})
    return out


@pytest.fixture(scope="module")
def tiny_model():
    from pipeline.models import build_model

    torch.manual_seed(0)
    return build_model(tiny_config())


def _batch(b: int = 2, h: int = 64, w: int = 96):
    torch.manual_seed(1)
    images = torch.randn(b, 3, h, w)
    masks = torch.zeros(b, h, w, dtype=torch.bool)
    masks[-1, h - 16 :] = True  # last image is 48 x 80
    masks[-1, :, w - 16 :] = True
    return images, masks


# --------------------------------------------------------------------------------------------------------------
def test_denoising_groups_with_an_empty_image():
    from pipeline.models.query_head.denoising import CdnQueryGenerator

    gen = CdnQueryGenerator(num_classes=5, embed_dims=16, num_matching_queries=10, num_dn_queries=7)
    targets = _targets([3, 0, 1], num_classes=5)
    dn = gen(targets)
    assert (dn.max_gt, dn.num_groups, dn.pad_size) == (3, 2, 12)  # G = 7 // 3, P = 2 * 3 * 2
    assert dn.query.shape == (3, 12, 16) and dn.box_logits.shape == (3, 12, 4)
    # the empty image and the unused slots of image 2 have zero content and zero box logits
    assert dn.query[1].abs().sum() == 0 and dn.box_logits[1].abs().sum() == 0
    used = torch.zeros(12, dtype=torch.bool)
    used[[0, 3, 6, 9]] = True  # image 2 (1 GT): slot 0 of each of the 4 parts [pos g0 | neg g0 | pos g1 | neg g1]
    assert dn.query[2][~used].abs().sum() == 0 and (dn.query[2][used].abs().sum(-1) > 0).all()
    labels, label_w, box_t, box_w = dn.targets(targets, num_classes=5)
    assert torch.equal(labels[0, [0, 1, 2, 6, 7, 8]], targets[0]["labels"].repeat(2))
    assert (labels[0, [3, 4, 5, 9, 10, 11]] == 5).all() and (labels[1] == 5).all()
    assert box_w[0, :, 0].tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0] and label_w.eq(1).all()
    assert torch.allclose(box_t[2, 6], targets[2]["boxes"][0])
    # positive copies stay near their GT: every corner moves by < half the box size
    from pipeline.models.box_ops import box_cxcywh_to_xyxy

    noisy = box_cxcywh_to_xyxy(dn.box_logits[0, :3].sigmoid())
    gt = box_cxcywh_to_xyxy(targets[0]["boxes"])
    half = targets[0]["boxes"][:, 2:].repeat(1, 2) / 2
    assert ((noisy - gt).abs() <= half + 1e-4).all()
    # attention mask: matching rows blind to DN; DN groups blind to each other; DN sees matching queries
    m = dn.attn_mask
    assert m.shape == (22, 22) and m[12:, :12].all() and not m[12:, 12:].any()
    assert m[:6, 6:12].all() and m[6:12, :6].all() and not m[:6, :6].any() and not m[:12, 12:].any()


def test_denoising_without_any_gt():
    from pipeline.models.query_head.denoising import CdnQueryGenerator

    dn = CdnQueryGenerator(num_classes=5, embed_dims=16, num_matching_queries=10)(_targets([0, 0]))
    assert (dn.pad_size, dn.num_groups) == (0, 1) and dn.query.shape == (2, 0, 16) and not dn.attn_mask.any()


def test_look_forward_twice_gradient_paths():
    """Layer-l boxes reach layer l-1's refinement branch (not detached), but not layer l-2's."""
    from pipeline.models.layers.padding_mask import valid_ratio
    from pipeline.models.query_head.dino_head import DINOHead
    from pipeline.models.transformer.decoder import DinoDecoder, DinoDecoderLayer

    torch.manual_seed(0)
    c, levels = 32, 2
    decoder = DinoDecoder([DinoDecoderLayer(c, 2, levels, 2, 64) for _ in range(3)], c)
    head = DINOHead(num_classes=3, embed_dims=c, num_decoder_layers=3)
    for reg in head.reg_branches:  # non-zero last layers so that every path carries signal
        torch.nn.init.normal_(reg[-1].weight, std=0.1)
    shapes = torch.tensor([[4, 4], [2, 2]])
    memory = torch.randn(1, 20, c)
    ratios = torch.stack([valid_ratio(torch.zeros(1, 4, 4, dtype=torch.bool))] * levels, 1)
    refs0 = torch.rand(1, 5, 4) * 0.5 + 0.25
    hidden, refs = decoder(torch.randn(1, 5, c), refs0, memory, shapes, torch.tensor([0, 16]), ratios, None,
                           head.reg_branches)  # fmt: skip
    assert hidden.shape == (3, 1, 5, c) and refs.shape == (4, 1, 5, 4) and torch.equal(refs[0], refs0)
    _, boxes = head.predict(hidden, refs)

    def grads(loss):
        head.zero_grad()
        loss.backward(retain_graph=True)
        return [float(r[-1].weight.grad.abs().sum()) if r[-1].weight.grad is not None else 0.0
                for r in head.reg_branches]  # fmt: skip

    g = grads(boxes[1].sum())  # layer 1 prediction: reg 1 (head) + reg 0 (refinement, look-forward-twice)
    assert g[0] > 0 and g[1] > 0 and g[2] == 0
    g = grads(boxes[2].sum())  # layer 2: reg 2 and reg 1 only; reg 0's refinement is detached by then
    assert g[0] == 0 and g[1] > 0 and g[2] > 0


def test_encoder_proposals_validity():
    from pipeline.models.transformer.query_selection import encoder_proposals

    shapes = torch.tensor([[4, 6], [2, 3]])
    mask4 = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask4[1, 3:] = True
    mask4[1, :, 4:] = True  # image 1: valid 3 x 4 at level 0
    mask2 = torch.zeros(2, 2, 3, dtype=torch.bool)
    mask2[1, :, 2:] = True
    padding = torch.cat([mask4.flatten(1), mask2.flatten(1)], 1)
    memory = torch.randn(2, 30, 8)
    out_memory, logits = encoder_proposals(memory, padding, shapes)
    invalid = torch.isinf(logits).any(-1)
    assert torch.isinf(logits[invalid]).all() and (logits[invalid] > 0).all()
    assert (out_memory[invalid] == 0).all() and torch.equal(out_memory[~invalid], memory[~invalid])
    assert invalid[padding].all()  # every padded token is invalid
    boxes = logits[~invalid].sigmoid()
    assert ((boxes > 0.01) & (boxes < 0.99)).all()
    # image 1, level 0, pixel (row 1, col 2): centre = (2.5 / 4, 1.5 / 3), w = h = 0.05
    torch.testing.assert_close(logits[1, 1 * 6 + 2].sigmoid(), torch.tensor([2.5 / 4, 1.5 / 3, 0.05, 0.05]))
    # level 1 anchors are twice as large; a level-1 anchor of image 0 at (0, 0): (0.5/3, 0.5/2, 0.1, 0.1)
    torch.testing.assert_close(logits[0, 24].sigmoid(), torch.tensor([0.5 / 3, 0.25, 0.1, 0.1]))


# --------------------------------------------------------------------------------------------------------------
def test_train_step_returns_named_losses(tiny_model):
    images, masks = _batch()
    tiny_model.train()
    losses = tiny_model(images, masks, _targets([2, 1]))
    names = {f"{p}{k}_{t}" for p in ("", "d0.") for k in ("loss", "dn_loss") for t in ("cls", "bbox", "iou")}
    names |= {"enc_loss_cls", "enc_loss_bbox", "enc_loss_iou"}
    assert set(losses) == names
    assert all(v.dim() == 0 and torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    tiny_model.zero_grad()
    sum(losses.values()).backward()
    assert tiny_model.denoising.label_embedding.weight.grad.abs().sum() > 0
    assert tiny_model.transformer.query_embed.weight.grad.abs().sum() > 0


def test_train_step_without_any_gt_keeps_label_embedding_in_graph(tiny_model):
    images, masks = _batch()
    tiny_model.train()
    losses = tiny_model(images, masks, _targets([0, 0]))
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["loss_bbox"].detach()) == 0 and float(losses["dn_loss_cls"].detach()) == 0
    tiny_model.zero_grad()
    sum(losses.values()).backward()
    assert tiny_model.denoising.label_embedding.weight.grad is not None  # the `0 * weight[0, 0]` trick


def test_denoising_queries_do_not_leak_into_matching_queries(tiny_model):
    images, masks = _batch()
    tiny_model.eval()
    sizes = tiny_model.image_sizes(images, masks, None, None)
    assert sizes.tolist() == [[64, 96], [48, 80]]
    with torch.no_grad():
        plain = tiny_model.run(images, sizes)
        dn = tiny_model.denoising(_targets([3, 1]))
        with_dn = tiny_model.run(images, sizes, dn)
    assert with_dn.dn_logits.shape[2] == dn.pad_size > 0
    torch.testing.assert_close(with_dn.logits, plain.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_dn.boxes, plain.boxes, atol=1e-5, rtol=1e-5)


def test_eval_returns_detections(tiny_model):
    images, masks = _batch()
    tiny_model.eval()
    dets = tiny_model(images, masks)
    assert len(dets) == 2
    for det, (h, w) in zip(dets, [(64, 96), (48, 80)]):
        k = det["boxes"].shape[0]
        assert 0 < k <= 50 and det["scores"].shape == (k,) and det["labels"].shape == (k,)
        assert (det["boxes"][:, 0::2] <= w).all() and (det["boxes"][:, 1::2] <= h).all() and (det["boxes"] >= 0).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
    # orig_size rescales to the original image
    targets = [{"orig_size": torch.tensor([128, 192])}, {"orig_size": torch.tensor([48, 80])}]
    big = tiny_model(images, masks, targets)
    torch.testing.assert_close(big[0]["boxes"], dets[0]["boxes"] * 2)
    torch.testing.assert_close(big[1]["boxes"], dets[1]["boxes"])


def test_inference_state_dict_drops_aux_parts():
    from pipeline.models import build_model

    cfg = tiny_config(co={"aux_heads": ["atss"], "atss": {"strides": [8, 16, 32, 64, 128]}})
    model = build_model(cfg)
    keys = model.inference_state_dict().keys()
    assert len(model.aux_heads) == 1 and any(k.startswith("aux_heads.") for k in model.state_dict())
    assert not any(k.startswith(("aux_heads.", "adapter.", "aux_query_proj.")) for k in keys)
    assert set(keys) == set(build_model(tiny_config()).state_dict())


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_model_config_builds_on_meta(path):
    from pipeline.models import build_model

    data = yaml.safe_load(path.read_text())["model"]
    data.setdefault("backbone", {})["pretrained"] = False  # no downloads in tests
    cfg = from_dict(ModelConfig, data)
    with torch.device("meta"):
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
    assert len(model.aux_heads) == len(cfg.co.aux_heads)


def test_official_keys_map_onto_our_modules():
    """Every name in the authors' Co-DINO R50 state dict (keys.tsv) maps onto our K = 2 model with its shape."""
    golden = REPO.parent / "shared" / "golden" / "co_dino_r50" / "keys.tsv"
    if not golden.exists():
        pytest.skip("golden keys.tsv not available")
    import ast

    from pipeline.checkpoints.convert import convert_official_state_dict
    from pipeline.models import build_model

    rows = [line.rstrip("\n").split("\t") for line in golden.read_text().splitlines()]
    official = {n: torch.empty(ast.literal_eval(s), device="meta") for n, s, _ in rows}
    with torch.device("meta"):
        model = build_model(ModelConfig())
    ours = model.state_dict()
    mapped = convert_official_state_dict(official, ModelConfig().co.aux_heads)
    assert set(mapped) == set(ours)
    assert all(mapped[k].shape == ours[k].shape for k in ours)
    deployed = convert_official_state_dict(official, aux_heads=())
    assert set(deployed) == set(model.inference_state_dict())
    assert CoConfig().aux_heads == ("atss", "faster_rcnn")
