"""Importing the authors' checkpoints: name mapping (Co-DINO R50 keys.tsv, Swin-L in both namings), what is
skipped or dropped, one-line errors, and jobs/import_checkpoint.py end to end on the golden fixture's weights.

The mapping tests run on the meta device (names and shapes only). The job tests write the fixture's 65 M
weights as {"state_dict": ...} once and run the job in subprocesses (~10 s each on an idle machine).
"""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("CODETR_GOLDEN_DIR", REPO.parent / "shared" / "golden" / "co_dino_r50"))
needs_golden = pytest.mark.skipif(not (GOLDEN / "keys.tsv").exists(), reason=f"no golden fixture at {GOLDEN}")
AUX_PREFIXES = ("rpn_head.", "roi_head.", "bbox_head.", "query_head.downsample.",
                "query_head.transformer.aux_pos_trans")  # fmt: skip


def _official_meta() -> dict[str, torch.Tensor]:
    rows = [line.split("\t") for line in (GOLDEN / "keys.tsv").read_text().splitlines()]
    return {n: torch.empty(ast.literal_eval(s), device="meta") for n, s, _ in rows}


def _meta_model(aux_heads: tuple[str, ...], **model_kwargs):
    from pipeline.models import build_model
    from pipeline.models.config import CoConfig, ModelConfig

    with torch.device("meta"):
        return build_model(ModelConfig(co=CoConfig(aux_heads=aux_heads), **model_kwargs))


@needs_golden
@pytest.mark.parametrize("aux_heads", [("atss", "faster_rcnn"), ("atss",), ()])
def test_codino_r50_keys_fit_k2_k1_k0(aux_heads):
    from pipeline.checkpoints.convert import convert_checkpoint, fit_to_model

    official = _official_meta()
    model = _meta_model(aux_heads)
    conv = convert_checkpoint(official, aux_heads)
    state = fit_to_model(conv, model.state_dict())  # raises on any missing / unexpected / mis-shaped key
    model.load_state_dict(state, strict=True, assign=True)
    aux = [k for k in official if k.startswith(AUX_PREFIXES)]
    assert len(aux) == 44 and conv.unknown == [] and conv.checkpoint_aux_heads == ("faster_rcnn", "atss")
    assert len(conv.dropped_buffers) == 53
    assert all(k.endswith("num_batches_tracked") for k in conv.dropped_buffers)
    assert len(conv.state) + len(conv.skipped_aux) + 53 == len(official) == 674
    if aux_heads == ():
        assert sorted(conv.skipped_aux) == sorted(aux)
    elif aux_heads == ("atss",):  # group 1 of the K = 2 checkpoint (ATSS) is our group 0
        ours = "aux_query_proj.aux_pos_trans.0.weight"
        assert conv.origin[ours] == "query_head.transformer.aux_pos_trans.1.weight"
        group0 = [k for k in aux if k.startswith("query_head.transformer.aux_pos_trans") and ".0." in k]
        rcnn = [k for k in aux if k.startswith(("rpn_head.", "roi_head."))]
        assert sorted(conv.skipped_aux) == sorted(rcnn + group0) and len(group0) == 4
    else:
        assert conv.skipped_aux == []


def _co_deformable_keys(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' Co-Deformable-DETR R50 keys, derived from the Co-DINO R50 keys.tsv with the differences of
    CO_DETR_SPEC.md 1.2 and 8 (names and shapes written from the spec, not from our model): C3-C5 neck inputs
    (convs.1-3 become convs.0-2), 4 levels (offsets 256 / attention weights 128 rows, 4 level embeds, 5 ATSS
    scales), no decoder norm / ref_point_head / label_embedding / query_embed, plus query_embedding (300, 256),
    pos_trans 512 -> 512, aux_pos_trans 512 -> 512, pos_feats_{trans,norm}, head_pos_embed (2, 1)."""
    meta = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731
    out: dict[str, torch.Tensor] = {}
    for k, v in official.items():
        if k.startswith(("neck.convs.0.", "query_head.transformer.decoder.norm.", "query_head.dn_generator.",
                         "query_head.transformer.decoder.ref_point_head.", "query_head.transformer.query_embed.",
                         "bbox_head.0.scales.5.", "query_head.label_embedding")):  # fmt: skip
            continue
        if k.startswith("neck.convs."):
            i = int(k.split(".")[2])
            k = k.replace(f"neck.convs.{i}.", f"neck.convs.{i - 1}.")
        elif k == "query_head.transformer.level_embeds":
            v = meta(4, 256)
        elif ".sampling_offsets." in k or ".attention_weights." in k:
            v = meta(v.shape[0] * 4 // 5, *v.shape[1:])
        elif ".aux_pos_trans." in k or ".aux_pos_trans_norm." in k:
            v = meta(512, 512) if k.endswith("weight") and v.dim() == 2 else meta(512)
        out[k] = v
    t = "query_head.transformer."
    out["query_head.query_embedding.weight"] = meta(300, 256)
    out.update({t + "pos_trans.weight": meta(512, 512), t + "pos_trans.bias": meta(512),
                t + "pos_trans_norm.weight": meta(512), t + "pos_trans_norm.bias": meta(512),
                t + "head_pos_embed.weight": meta(2, 1)})  # fmt: skip
    for g in range(2):
        out.update({f"{t}pos_feats_trans.{g}.weight": meta(256, 256), f"{t}pos_feats_trans.{g}.bias": meta(256),
                    f"{t}pos_feats_norm.{g}.weight": meta(256), f"{t}pos_feats_norm.{g}.bias": meta(256)})
    return out


@needs_golden
@pytest.mark.parametrize("aux_heads", [("atss", "faster_rcnn"), ("atss",), ()])
def test_co_deformable_r50_keys_fit_k2_k1_k0(aux_heads):
    from pipeline.checkpoints.convert import convert_checkpoint, fit_to_model
    from pipeline.config import load_config
    from pipeline.models import build_model

    heads = "[" + ",".join(aux_heads) + "]"
    cfg = load_config(str(REPO / "configs/model/co_deformable_detr_r50.yaml"),
                      ["model.backbone.pretrained=false", f"model.co.aux_heads={heads}"]).model  # fmt: skip
    with torch.device("meta"):
        model = build_model(cfg)
    official = _co_deformable_keys(_official_meta())
    official["query_head.transformer.head_pos_embed.weight"] = torch.tensor([[1.0], [2.0]])  # group 0 RCNN, 1 ATSS
    conv = convert_checkpoint(official, aux_heads, cfg.backbone.out_indices)
    state = fit_to_model(conv, model.state_dict())  # raises on any missing / unexpected / mis-shaped key
    model.load_state_dict(state, strict=True, assign=True)
    assert conv.unknown == []
    if aux_heads:
        want = {("atss", "faster_rcnn"): [[1.0], [2.0]], ("atss",): [[2.0]]}[aux_heads]
        assert state["aux_query_proj.head_pos_embed.weight"].tolist() == want
    else:
        assert "query_head.transformer.head_pos_embed.weight" in conv.skipped_aux
        assert not any(k.startswith("aux_") for k in state)


def _swin_l_v1_keys() -> dict[str, torch.Tensor]:
    """The authors' SwinTransformerV1 (Swin-L, window 12) backbone keys with their shapes, written from the
    original Microsoft module layout (downsample at the end of a stage, per-output norm{i})."""
    keys: dict[str, tuple[int, ...]] = {"backbone.patch_embed.proj.weight": (192, 3, 4, 4)}
    for leaf in ("patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias"):
        keys[f"backbone.{leaf}"] = (192,)
    for s, (depth, heads) in enumerate(zip((2, 2, 18, 2), (6, 12, 24, 48))):
        c = 192 * 2**s
        for b in range(depth):
            p = f"backbone.layers.{s}.blocks.{b}."
            keys.update({p + "norm1.weight": (c,), p + "norm1.bias": (c,), p + "norm2.weight": (c,),
                         p + "norm2.bias": (c,), p + "attn.relative_position_bias_table": (23 * 23, heads),
                         p + "attn.relative_position_index": (144, 144), p + "attn.qkv.weight": (3 * c, c),
                         p + "attn.qkv.bias": (3 * c,), p + "attn.proj.weight": (c, c),
                         p + "attn.proj.bias": (c,),
                         p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,),
                         p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,)})  # fmt: skip
        if s < 3:
            p = f"backbone.layers.{s}.downsample."
            keys.update({p + "reduction.weight": (2 * c, 4 * c), p + "norm.weight": (4 * c,),
                         p + "norm.bias": (4 * c,)})  # fmt: skip
        keys.update({f"backbone.norm{s}.weight": (c,), f"backbone.norm{s}.bias": (c,)})
    return {k: torch.empty(v, device="meta") for k, v in keys.items()}


def _to_mmdet_swin_names(v1: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same keys as mmdet's SwinTransformer names them (its swin converter, names only)."""
    out = {}
    for k, v in v1.items():
        new = k.replace("attn.", "attn.w_msa.").replace("mlp.fc1.", "ffn.layers.0.0.")
        new = new.replace("mlp.fc2.", "ffn.layers.1.").replace("backbone.layers.", "backbone.stages.")
        out[new.replace("patch_embed.proj.", "patch_embed.projection.")] = v
    return out


@pytest.mark.parametrize("naming", ["swin-v1", "swin-mmdet"])
def test_swin_large_names_fit_timm_swin(naming):
    """Every Swin-L backbone key lands on timm's swin_large_patch4_window12_384 / out_norms with its shape."""
    from pipeline.checkpoints.convert import convert_checkpoint, fit_to_model
    from pipeline.models.backbones.timm_backbones import build_backbone
    from pipeline.models.config import BackboneConfig

    with torch.device("meta"):
        backbone = build_backbone(BackboneConfig(name="swin_large_patch4_window12_384", frozen_stages=-1))
    expected = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    keys = _swin_l_v1_keys() if naming == "swin-v1" else _to_mmdet_swin_names(_swin_l_v1_keys())
    conv = convert_checkpoint(keys)
    assert conv.backbone_format == naming and conv.unknown == []
    assert len(conv.dropped_buffers) == 24  # relative_position_index of the 24 blocks
    fit_to_model(conv, expected)
    assert conv.origin["backbone.body.layers.1.downsample.reduction.weight"].startswith(
        "backbone.layers.0.downsample" if naming == "swin-v1" else "backbone.stages.0.downsample")
    assert conv.origin["backbone.out_norms.3.weight"] == "backbone.norm3.weight"
    with pytest.raises(ValueError, match="no known mapping: backbone.norm3.weight"):
        fit_to_model(convert_checkpoint(keys, out_indices=(0, 1, 2)), expected)


def test_mmdet_patch_merging_order_is_undone():
    """mmdet's nn.Unfold patch merging with its weights == timm's PatchMerging with the converted weights."""
    from timm.models.swin_transformer import PatchMerging

    from pipeline.checkpoints.convert import convert_checkpoint

    torch.manual_seed(0)
    c = 8
    x = torch.randn(2, 6, 4, c)  # (B, H, W, C)
    w_norm, b_norm, w_red = torch.randn(4 * c), torch.randn(4 * c), torch.randn(2 * c, 4 * c)
    unfolded = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)  # (B, L, 4C) c-major
    ref = F.linear(F.layer_norm(unfolded, (4 * c,), w_norm, b_norm), w_red).reshape(2, 3, 2, 2 * c)
    conv = convert_checkpoint({"backbone.stages.0.downsample.norm.weight": w_norm,
                               "backbone.stages.0.downsample.norm.bias": b_norm,
                               "backbone.stages.0.downsample.reduction.weight": w_red})  # fmt: skip
    merge = PatchMerging(c)
    prefix = "backbone.body.layers.1.downsample."
    merge.load_state_dict({k[len(prefix):]: v for k, v in conv.state.items()})
    torch.testing.assert_close(merge(x), ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merge.reduction.weight, w_red)  # the order did change


def test_dropped_and_unknown_keys_are_reported():
    from pipeline.checkpoints.convert import convert_checkpoint, convert_official_state_dict, split_checkpoint

    t = torch.zeros(1)
    sd = {"backbone.conv1.weight": t, "ema_backbone_conv1_weight": t, "ema_query_head_cls_branches_0_bias": t,
          "roi_head.0.bbox_head.fed_loss_weight": t, "backbone.bn1.num_batches_tracked": t,
          "data_preprocessor.mean": t, "query_head.transformer.unknown_proj.weight": t}  # fmt: skip
    conv = convert_checkpoint(sd)
    assert conv.dropped_ema == ["ema_backbone_conv1_weight", "ema_query_head_cls_branches_0_bias"]
    assert sorted(conv.dropped_buffers) == ["backbone.bn1.num_batches_tracked", "data_preprocessor.mean",
                                            "roi_head.0.bbox_head.fed_loss_weight"]  # fmt: skip
    assert conv.unknown == ["query_head.transformer.unknown_proj.weight"]
    assert list(conv.state) == ["backbone.body.conv1.weight"]
    with pytest.raises(ValueError, match=r"^1 checkpoint key\(s\) with no known mapping: query_head\.transformer\.unk"):
        convert_official_state_dict({"state_dict": sd, "meta": {}})
    sd_only, meta = split_checkpoint({"state_dict": sd, "meta": {"CLASSES": ("a", "b")}, "optimizer": {}})
    assert sd_only == sd and meta["CLASSES"] == ("a", "b")


@needs_golden
def test_shape_mismatch_is_one_line():
    from pipeline.checkpoints.convert import convert_checkpoint, fit_to_model

    official = _official_meta()
    model = _meta_model((), num_classes=81)
    with pytest.raises(ValueError) as e:
        fit_to_model(convert_checkpoint(official), model.state_dict())
    msg = str(e.value)
    assert "\n" not in msg and "shape mismatch" in msg
    assert "query_head.cls_branches.0.weight (80, 256) vs ours (81, 256)" in msg


def test_pickled_objects_need_trust():
    """A checkpoint with objects of a class that is not installed (like mmengine's message_hub)."""
    from pipeline.checkpoints.convert import load_checkpoint_bytes

    pkg, mod = types.ModuleType("fake_mmengine"), types.ModuleType("fake_mmengine.logging")
    history = type("HistoryBuffer", (), {"__module__": "fake_mmengine.logging"})
    mod.HistoryBuffer = history
    sys.modules.update({"fake_mmengine": pkg, "fake_mmengine.logging": mod})
    try:
        buf = io.BytesIO()
        torch.save({"state_dict": {"a": torch.ones(2)}, "message_hub": {"h": history()}}, buf)
    finally:
        del sys.modules["fake_mmengine"], sys.modules["fake_mmengine.logging"]
    with pytest.raises(ValueError, match="global fake_mmengine.logging.HistoryBuffer.*--trust-pickle"):
        load_checkpoint_bytes(buf.getvalue())
    obj = load_checkpoint_bytes(buf.getvalue(), trust_pickle=True)
    assert torch.equal(obj["state_dict"]["a"], torch.ones(2))


# ---------------------------------------------------------------------------------------------------------
def _run_job(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "jobs" / "import_checkpoint.py"), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def fixture_pth(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("golden_make_weights", GOLDEN / "make_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    official = module.official_state_dict()
    path = tmp_path_factory.mktemp("official") / "co_dino_r50_fixture.pth"
    torch.save({"state_dict": official}, path)
    return path, official


@needs_golden
def test_import_job_k2_then_k0(fixture_pth, tmp_path):
    """K = 2: every key mapped, nothing skipped; K = 0: exactly the 44 aux keys skipped. Both outputs load in
    jobs/evaluate.py's loader, and the K = 0 one seeds a K = 2 model through `init.from` (aux heads fresh)."""
    from pipeline.config import JobConfig, load_config
    from pipeline.eval.run import load_model_for_eval
    from pipeline.train.init import init_weights

    src, official = fixture_pth
    config = str(REPO / "configs" / "model" / "co_dino_r50.yaml")
    outs = {}
    for name, extra in (("k2", []), ("k0", ["--set", "model.co.aux_heads=[]"])):
        out = tmp_path / name
        res = _run_job("--src", str(src), "--config", config, "--set", "model.backbone.pretrained=false",
                       *extra, "--out", str(out))  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
        outs[name] = (out, json.loads(res.stdout.strip().splitlines()[-1]))
        assert sorted(os.listdir(out)) == ["categories.json", "config.yaml", "manifest.json", "model.pt",
                                        "trainer_state.json"]
    k2, k0 = outs["k2"][1], outs["k0"][1]
    assert (k2["unknown"], k2["skipped_aux"], k2["mapped"], k2["dropped_buffers"]) == (0, 0, 621, 53)
    assert (k0["unknown"], k0["skipped_aux"], k0["mapped"]) == (0, 44, 577)
    assert sorted(k0["skipped_aux_keys"]) == sorted(k for k in official if k.startswith(AUX_PREFIXES))

    model, cats = load_model_for_eval(str(outs["k2"][0]), JobConfig())
    assert len(model.aux_heads) == 2 and len(cats) == 80 and cats[0]["name"] == "class_0"
    sd = model.state_dict()
    assert torch.equal(sd["transformer.level_embeds"], official["query_head.transformer.level_embeds"])
    assert torch.equal(sd["aux_heads.1.atss_cls.weight"], official["bbox_head.0.atss_cls.weight"])
    proj_bias = official["query_head.transformer.aux_pos_trans.0.bias"]
    assert torch.equal(sd["aux_query_proj.aux_pos_trans.0.bias"], proj_bias)

    from pipeline.models import build_model

    job = load_config(config, ["model.backbone.pretrained=false"])
    model = build_model(job.model)
    report = init_weights(model, str(outs["k0"][0]), cats)
    assert report["missing_in_source"] == 44 and report["fresh_params"] == []  # the aux part keeps its init
    cls_bias = official["query_head.cls_branches.6.bias"]
    assert torch.equal(model.state_dict()["head.cls_branches.6.bias"], cls_bias)


def test_import_job_unknown_key_is_one_line_error(s3_bucket):
    """A key no rule maps, in a checkpoint read from S3: exit 2, one line naming it, nothing written."""
    from pipeline import storage

    buf = io.BytesIO()
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7),
                               "query_head.transformer.unknown_proj.weight": torch.zeros(2)}}, buf)  # fmt: skip
    storage.write_bytes(f"{s3_bucket}/official/bad.pth", buf.getvalue())
    res = _run_job("--src", f"{s3_bucket}/official/bad.pth", "--out", f"{s3_bucket}/ckpt/bad")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ValueError: 1 checkpoint key(s) with no known mapping")
    assert "query_head.transformer.unknown_proj.weight" in lines[0]
    assert storage.listdir(f"{s3_bucket}/ckpt") == []
