"""The authors' ViT-L Co-DINO checkpoints fit our ViT-L recipes: the ViT fixture's keys.tsv (backbone + SFP neck)
plus the Co-DINO golden case's detector keys (minus its R50 backbone and ChannelMapper neck), plus the rotary
tables and FedLoss buffers of the authors' files, load strictly into configs/model/co_dino_vit_l.yaml (COCO) and
configs/model/co_dino_vit_l_lvis.yaml (LVIS) on the meta device; then jobs/import_checkpoint.py end to end on a
small ViT of the same family (real tensors, values checked)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "golden"
VIT_DIR = Path(os.environ.get("CODETR_VIT_GOLDEN_DIR", SHARED / "vit_l_sfp"))
CODINO_DIR = Path(os.environ.get("CODETR_GOLDEN_DIR", SHARED / "co_dino_r50"))
needs_fixtures = pytest.mark.skipif(
    not (VIT_DIR / "keys.tsv").exists() or not (CODINO_DIR / "keys.tsv").exists(),
    reason=f"no golden fixtures at {VIT_DIR} / {CODINO_DIR}",
)
FED = ("query_head.loss_cls.fed_loss_weight", "bbox_head.0.loss_cls.fed_loss_weight",
       "roi_head.0.bbox_head.loss_cls.fed_loss_weight")  # fmt: skip
# class-count dimension of the Co-DINO golden keys (80 classes): rows = nc, nc + 1 (fc_cls) or 4 nc (fc_reg)
CLASS_ROWS = {"cls_branches": 1, "label_embedding": 1, "atss_cls": 1, "fc_cls": 1, "fc_reg": 4}


def _rope_keys(depth: int) -> list[str]:
    """The rotary tables of the authors' files (computed buffers, `*.rope*.freqs_cos/sin`)."""
    names = [f"backbone.rope_{w}.freqs_{t}" for w in ("win", "glb") for t in ("cos", "sin")]
    return names + [f"backbone.blocks.{i}.attn.rope.freqs_{t}" for i in range(depth) for t in ("cos", "sin")]


def authors_vit_l_keys(num_classes: int, num_queries: int, fed_loss: bool) -> dict[str, torch.Tensor]:
    """Meta tensors named and shaped like the authors' Co-DINO ViT-L file for this class / query count."""
    out: dict[str, torch.Tensor] = {}
    for line in (VIT_DIR / "keys.tsv").read_text().splitlines():
        if line.startswith("#"):
            continue
        name, shape, _ = line.split("\t")
        out[name] = torch.empty([int(s) for s in shape.split("x")], device="meta")
    for name in _rope_keys(24):
        out[name] = torch.empty(576, 64, device="meta")
    for line in (CODINO_DIR / "keys.tsv").read_text().splitlines():
        name, shape, _ = line.split("\t")
        if name.startswith(("backbone.", "neck.")):
            continue
        dims = list(ast.literal_eval(shape))
        group = next((g for k, g in CLASS_ROWS.items() if k in name), None)
        if group is not None:
            dims[0] = group * num_classes + (dims[0] - group * 80)  # keep fc_cls's background row
        if name.endswith("query_embed.weight"):
            dims[0] = num_queries
        out[name] = torch.empty(dims, device="meta")
    if fed_loss:
        out.update({k: torch.empty(num_classes, device="meta") for k in FED})
    return out


def _recipe_model(recipe: str):
    from pipeline.config import load_config, replace
    from pipeline.models import build_model

    cfg = replace(load_config(str(REPO / "configs" / "model" / recipe)).model, **{"backbone.pretrained": False})
    with torch.device("meta"):
        return cfg, build_model(cfg)


@needs_fixtures
@pytest.mark.parametrize("recipe", ["co_dino_vit_l.yaml", "co_dino_vit_l_lvis.yaml"])
def test_authors_vit_l_checkpoint_fits_the_recipe(recipe: str) -> None:
    from pipeline.checkpoints.convert import convert_checkpoint, fit_to_model

    cfg, model = _recipe_model(recipe)
    official = authors_vit_l_keys(cfg.num_classes, cfg.transformer.num_queries, fed_loss=True)
    conv = convert_checkpoint(official, cfg.co.aux_heads, cfg.backbone.out_indices, cfg.loss.fed_loss)
    state = fit_to_model(conv, model.state_dict())  # raises on unknown / missing / unexpected / mis-shaped keys
    model.load_state_dict(state, strict=True, assign=True)
    assert conv.unknown == [] and conv.skipped_aux == [] and conv.backbone_format == "vit"
    rope = _rope_keys(24)
    assert conv.origin["backbone.blocks.3.attn.q_proj.bias"] == "backbone.blocks.3.attn.q_bias"
    assert conv.origin["backbone.blocks.23.mlp.fc1_g.weight"] == "backbone.blocks.23.mlp.w1.weight"
    assert conv.origin["neck.p6.1.weight"] == "neck.p6.1.weight"
    vit_params = sum(1 for k in official if k.startswith(("backbone.", "neck.")) and k not in rope)
    assert sum(1 for k in conv.state if k.startswith(("backbone.", "neck."))) == vit_params
    if cfg.loss.fed_loss:  # LVIS: the three FedLoss buffers are ours
        assert sorted(conv.dropped_buffers) == sorted(rope)
        assert {conv.origin[k] for k in conv.state if k.endswith("fed_loss_weight")} == set(FED)
        assert "aux_heads.0.roi_head.bbox_head.fed_loss.fed_loss_weight" in state
    else:  # COCO: dropped, with the rotary tables, and reported
        assert sorted(conv.dropped_buffers) == sorted(rope + list(FED))
    assert len(conv.state) + len(conv.dropped_buffers) == len(official)


SMALL_VIT = ["model.backbone.vit.depth=2", "model.backbone.vit.embed_dim=64", "model.backbone.vit.num_heads=2",
             "model.backbone.vit.window_size=4", "model.backbone.vit.global_blocks=[1]",
             "model.backbone.vit.img_size=160", "model.backbone.pretrained=false"]  # fmt: skip
BLOCK_TO_AUTHORS = (("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"),
                    ("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."), ("mlp.norm.", "mlp.ffn_ln."),
                    ("mlp.fc2.", "mlp.w3."))  # fmt: skip


def _to_authors(name: str) -> str:
    for ours, theirs in BLOCK_TO_AUTHORS:
        if name.startswith("blocks.") and ours in name:
            return name.replace(ours, theirs)
    return name


@needs_fixtures
def test_import_job_small_vit_lvis_keeps_fed_loss_coco_drops_it(tmp_path: Path) -> None:
    """jobs/import_checkpoint.py on an authors'-named file: a small ViT + SFP (our random weights renamed to the
    authors' names, rotary tables added) + the Co-DINO golden detector weights + FedLoss buffers."""
    sys.path.insert(0, str(CODINO_DIR))
    from make_weights import official_state_dict

    from pipeline.config import load_config
    from pipeline.models.backbones.build import build_backbone, build_neck

    cfg = load_config(str(REPO / "configs" / "model" / "co_dino_vit_l_lvis.yaml"), SMALL_VIT).model
    torch.manual_seed(0)
    vit = build_backbone(cfg.backbone)
    neck = build_neck(vit, 256, 5)
    src = {k: v for k, v in official_state_dict().items() if not k.startswith(("backbone.", "neck."))}
    src.update({"backbone." + _to_authors(k): v for k, v in vit.state_dict().items()})
    assert "backbone.blocks.1.attn.v_bias" in src and "backbone.blocks.0.mlp.w3.weight" in src
    src.update({"neck." + k: v for k, v in neck.state_dict().items()})
    src.update({k: torch.rand(16, 64) for k in _rope_keys(2)})
    fed = {k: torch.arange(80.0) + i for i, k in enumerate(FED)}
    src.update(fed)
    pth = tmp_path / "authors_vit_small.pth"
    torch.save({"state_dict": src}, pth)

    outs = {}
    for recipe in ("co_dino_vit_l_lvis.yaml", "co_dino_vit_l.yaml"):
        out = tmp_path / recipe.split(".")[0]
        sets = [x for s in [*SMALL_VIT, "model.num_classes=80", "model.transformer.num_queries=900"]
                for x in ("--set", s)]  # fmt: skip
        cmd = [sys.executable, str(REPO / "jobs" / "import_checkpoint.py"), "--src", str(pth), "--config",
               str(REPO / "configs" / "model" / recipe), *sets, "--out", str(out)]  # fmt: skip
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        outs[recipe] = (out, json.loads(res.stdout.strip().splitlines()[-1]), res.stdout)
    lvis, coco = outs["co_dino_vit_l_lvis.yaml"], outs["co_dino_vit_l.yaml"]
    assert lvis[1]["unknown"] == 0 and lvis[1]["dropped_buffers"] == len(_rope_keys(2))
    assert coco[1]["dropped_buffers"] == len(_rope_keys(2)) + 3
    assert "freqs_cos 4, freqs_sin 4" in lvis[2] and "fed_loss_weight 3" in coco[2]
    sd = torch.load(lvis[0] / "model.pt", map_location="cpu", weights_only=True)
    sd = sd.get("model", sd)
    assert torch.equal(sd["head.fed_loss.fed_loss_weight"], fed[FED[0]])
    assert torch.equal(sd["aux_heads.1.fed_loss.fed_loss_weight"], fed[FED[1]])
    assert torch.equal(sd["aux_heads.0.roi_head.bbox_head.fed_loss.fed_loss_weight"], fed[FED[2]])
    assert torch.equal(sd["backbone.blocks.1.attn.v_proj.bias"], src["backbone.blocks.1.attn.v_bias"])
    assert torch.equal(sd["backbone.blocks.0.mlp.norm.weight"], src["backbone.blocks.0.mlp.ffn_ln.weight"])
    assert torch.equal(sd["neck.p2.1.weight"], src["neck.p2.1.weight"])
    coco_sd = torch.load(coco[0] / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.endswith("fed_loss_weight") for k in coco_sd.get("model", coco_sd))
