"""Our ViT-L backbone + SFP neck against the authors' (Sense-X/Co-DETR `vit.py` + `sfp.py`) on the golden fixture.

The fixture directory (env `CODETR_VIT_GOLDEN_DIR`, default ../shared/golden/vit_l_sfp; README there) holds the
authors' parameter names (`keys.tsv`), a script rebuilding deterministic weights for the `seed` of
`fixture.json` (`make_weights.py`), one input (`inputs.pt`) and the authors' outputs (`expected.pt`). We build
our modules with every setting of `fixture.json` (window_size, global_blocks, use_lsj, img_size,
pretrain_img_size, patch_size), map the names (`pipeline.checkpoints.vit_keys`; the authors' rotary buffers,
added as their checkpoints carry them, are dropped with a report), load strictly, run the input and compare the
backbone map and P2..P6: stats (mean, std, mean|x|), the sampled values and the whole P6, all within 1e-4 abs.
A copy of the fixture with another seed must fail that comparison (the seed is really used), and a fixture of the
same format with the LVIS settings, derived from our production build path, must pass it (nothing is tied to the
one fixture).
One forward is ~1-2 min on 2 cores: run once per fixture directory (module-scoped), two in all.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

from pipeline.checkpoints.vit_keys import ViTKeyReport, vit_authors_to_ours
from pipeline.models.backbones.vit import ViT
from pipeline.models.necks.sfp import SFP

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("CODETR_VIT_GOLDEN_DIR", REPO.parent / "shared" / "golden" / "vit_l_sfp"))
TOL = 1e-4

pytestmark = pytest.mark.skipif(
    not (GOLDEN / "expected.pt").exists(), reason=f"ViT golden fixture not found at {GOLDEN}"
)


def _make_weights(fixture_dir: Path) -> ModuleType:
    """The fixture's own make_weights.py (reads the keys.tsv beside it)."""
    spec = importlib.util.spec_from_file_location(f"vit_golden_make_weights_{abs(hash(fixture_dir))}",
                                                  fixture_dir / "make_weights.py")  # fmt: skip
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(fx: dict[str, Any]) -> nn.ModuleDict:
    """Our backbone + neck from every architecture setting of fixture.json (ViT-L sizes), on the meta device."""
    with torch.device("meta"):
        backbone = ViT(
            img_size=fx["img_size"], patch_size=fx["patch_size"], window_size=fx["window_size"],
            global_blocks=fx["global_blocks"], use_lsj=fx["use_lsj"], pretrain_img_size=fx["pretrain_img_size"],
        )  # fmt: skip
        neck = SFP(backbone.embed_dim, 256, use_p2=True)
    return nn.ModuleDict({"backbone": backbone, "neck": neck})


def _stats(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([x.mean(), x.std(), x.abs().mean()])


def _sample_diff(x: torch.Tensor, sample: dict[str, torch.Tensor]) -> float:
    i = sample["index"]
    return (x[i[:, 0], i[:, 1], i[:, 2], i[:, 3]] - sample["values"]).abs().max().item()


def _run(fixture_dir: Path) -> dict[str, Any]:
    """Weights for the fixture's seed -> our names -> strict load -> forward; max abs diff per compared output."""
    fx = json.loads((fixture_dir / "fixture.json").read_text())
    theirs = _make_weights(fixture_dir).official_state_dict(fx["seed"])
    for leaf in fx["buffers_not_in_keys"]:  # the authors' checkpoints also carry the rotary tables
        for table in ("rope_win", "rope_glb") if fx["use_lsj"] else ("rope_win",):
            theirs[f"backbone.{table}.{leaf}"] = torch.zeros(1)
    ours, report = vit_authors_to_ours(theirs)
    model = _build(fx)
    model.load_state_dict(ours, strict=True, assign=True)
    model.eval()
    images = torch.load(fixture_dir / "inputs.pt")["images"]
    assert list(images.shape) == list(fx["input_shape"])
    expected = torch.load(fixture_dir / "expected.pt")
    with torch.no_grad():
        (feat,) = model["backbone"](images)
        levels = model["neck"]([feat])
    assert tuple(feat.shape) == tuple(expected["backbone_shape"])
    assert [tuple(p.shape) for p in levels] == [tuple(s) for s in expected["neck_shapes"]]
    diffs = {
        "backbone stats": (_stats(feat) - expected["backbone_stats"]).abs().max().item(),
        "backbone sample": _sample_diff(feat, expected["backbone_sample"]),
    }
    for lvl, (p, st, smp) in enumerate(zip(levels, expected["neck_stats"], expected["neck_samples"]), start=2):
        diffs[f"P{lvl} stats"] = (_stats(p) - st).abs().max().item()
        diffs[f"P{lvl} sample"] = _sample_diff(p, smp)
    diffs["P6 full"] = (levels[-1] - expected["p6_full"]).abs().max().item()
    return {"fx": fx, "report": report, "diffs": diffs, "model": model}


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return _run(GOLDEN)


def test_names_shapes_and_parameter_counts_fit_the_fixture() -> None:
    """keys.tsv mapped onto our modules: same key set and shapes; parameter counts of fixture.json (fast, meta)."""
    fx = json.loads((GOLDEN / "fixture.json").read_text())
    model = _build(fx)
    assert sum(p.numel() for p in model["backbone"].parameters()) == fx["params_backbone"]
    assert sum(p.numel() for p in model["neck"].parameters()) == fx["params_neck"]
    theirs = {n: torch.empty(s, device="meta") for n, s in _make_weights(GOLDEN).read_keys()}
    ours, report = vit_authors_to_ours({**theirs, "query_head.x": torch.empty(1, device="meta")})
    assert report == ViTKeyReport(dropped_rope=[], unmapped=["query_head.x"])
    expected = model.state_dict()
    assert sorted(ours) == sorted(expected)
    assert all(ours[k].shape == expected[k].shape for k in ours)


def test_outputs_match_the_authors_within_1e4(golden: dict[str, Any]) -> None:
    fx, report, diffs = golden["fx"], golden["report"], golden["diffs"]
    leaves = {n.rsplit(".", 1)[-1] for n in report.dropped_rope}
    assert report.dropped_rope and leaves == set(fx["buffers_not_in_keys"]) and not report.unmapped
    print("\nmax abs diff per compared output: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, f"outputs differ from the authors' by more than {TOL}: {bad}"


def test_another_seed_fails_the_comparison(tmp_path: Path) -> None:
    """Same fixture files, fixture.json with seed + 1: the weights change, so the outputs must not match."""
    for f in GOLDEN.iterdir():
        if f.name != "fixture.json":
            (tmp_path / f.name).symlink_to(f) if f.suffix == ".pt" else shutil.copy(f, tmp_path / f.name)
    fx = json.loads((GOLDEN / "fixture.json").read_text())
    (tmp_path / "fixture.json").write_text(json.dumps({**fx, "seed": fx["seed"] + 1}))
    diffs = _run(tmp_path)["diffs"]
    assert diffs["backbone sample"] > 100 * TOL and diffs["P6 full"] > 100 * TOL, diffs


def _derive_fixture(dst: Path, seed: int, side: int, **settings: Any) -> torch.Tensor:
    """A fixture of the same format in `dst` with other settings: the fixture's keys.tsv / make_weights.py, a new
    fixture.json (`settings` over the original, another seed, a square `side` x `side` input) and inputs.pt /
    expected.pt computed by our model built through the production config path (ModelConfig -> build_backbone /
    build_neck), independently of `_build`. Returns the P6 map of that model."""
    from pipeline.models.backbones.build import build_backbone, build_neck
    from pipeline.models.config import BackboneConfig, ViTConfig

    for name in ("keys.tsv", "make_weights.py"):
        shutil.copy(GOLDEN / name, dst / name)
    fx = {**json.loads((GOLDEN / "fixture.json").read_text()), **settings, "seed": seed,
          "input_shape": [1, 3, side, side]}  # fmt: skip
    (dst / "fixture.json").write_text(json.dumps(fx))
    vit = ViTConfig(window_size=fx["window_size"], global_blocks=tuple(fx["global_blocks"]), use_lsj=fx["use_lsj"],
                    img_size=fx["img_size"], pretrain_img_size=fx["pretrain_img_size"], patch_size=fx["patch_size"])
    backbone = build_backbone(BackboneConfig(name="vit_authors", vit=vit, frozen_stages=-1, pretrained=False))
    neck = build_neck(backbone, 256, 5)
    ours, _ = vit_authors_to_ours(_make_weights(dst).official_state_dict(seed))
    nn.ModuleDict({"backbone": backbone, "neck": neck}).load_state_dict(ours, strict=True)
    images = torch.randn(fx["input_shape"], generator=torch.Generator().manual_seed(seed))
    torch.save({"images": images}, dst / "inputs.pt")
    with torch.no_grad():
        (feat,) = backbone.eval()(images)
        levels = neck.eval()([feat])
    g = torch.Generator().manual_seed(seed + 1)

    def sample(x: torch.Tensor) -> dict[str, torch.Tensor]:
        index = torch.stack([torch.randint(0, n, (256,), generator=g) for n in x.shape], 1)
        return {"index": index, "values": x[index[:, 0], index[:, 1], index[:, 2], index[:, 3]]}

    torch.save({"backbone_stats": _stats(feat), "backbone_sample": sample(feat), "backbone_shape": tuple(feat.shape),
                "neck_stats": [_stats(p) for p in levels], "neck_samples": [sample(p) for p in levels],
                "neck_shapes": [tuple(p.shape) for p in levels], "p6_full": levels[-1]}, dst / "expected.pt")
    return levels[-1]


def test_passes_on_a_fixture_with_other_settings(tmp_path: Path) -> None:
    """The test is not tied to the one fixture it was written against: a fixture of the same format with the LVIS
    recipe's settings (window 16, global blocks 2, 5, ..., 23, use_lsj with img_size = the input side), another
    seed and another input size passes `_run`; the settings change the outputs, so ignoring one would fail."""
    lvis = {"window_size": 16, "global_blocks": list(range(2, 24, 3)), "use_lsj": True, "img_size": 256}
    p6 = _derive_fixture(tmp_path, seed=7, side=256, **lvis)
    diffs = _run(tmp_path)["diffs"]
    assert all(v <= TOL for v in diffs.values()), diffs
    coco = tmp_path / "coco_settings"
    coco.mkdir()
    fx = json.loads((GOLDEN / "fixture.json").read_text())
    p6_coco = _derive_fixture(coco, seed=7, side=256, use_lsj=False, img_size=fx["img_size"])
    assert (p6 - p6_coco).abs().max() > 100 * TOL  # the derived settings matter
