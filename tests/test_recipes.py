"""Every shipped recipe exercised: each YAML under configs/ loads; each model recipe builds (meta device for the large
ones) with its parameter counts checked; each stage recipe (pretrain O365, finetune COCO, finetune LVIS) and the
Tune search recipe runs two optimizer steps and an evaluation on CPU on generated data.

The stage smoke tests change only what cannot run here, listed in `CANNOT_RUN_HERE` and printed at the end of the
pytest run (section "recipe smoke overrides"): data location (generated data instead of s3:// shards), image
sizes, the backbone (a small one of the same family, no pretrained download), workers (CPU, 1-2), steps, the
tracking server (SQLite) and the checkpoint store (a temp dir). Everything else stays the recipe's: the number of
queries (1500 / 900) and denoising queries (1000), top-k and max detections, LSJ with `with_padding_mask: false`
(LVIS), EMA (COCO), lr multipliers, the aux heads (K=2), class counts (365 / 80 / 1203), the LVIS protocol, and the
stage chain (the COCO and LVIS finetunes start from the O365 smoke stage's checkpoint, class heads remapped).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import yaml

from pipeline.config import load_config

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
STAGE_RECIPES = ("pretrain_o365.yaml", "finetune_coco.yaml", "finetune_lvis.yaml")
USED_OVERRIDES: dict[str, list[str]] = {}  # recipe -> overrides actually used (printed by conftest)


def _is_search(path: pathlib.Path) -> bool:
    return "search" in (yaml.safe_load(path.read_text()) or {})


def _is_model_only(path: pathlib.Path) -> bool:
    return path.parent.name == "model"


ALL_YAML = sorted(p for p in CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_YAML, ids=[str(p.relative_to(CONFIGS)) for p in ALL_YAML])
def test_every_yaml_loads(path: pathlib.Path) -> None:
    if _is_search(path):
        from pipeline.tune.search import load_search

        cfg = load_search(str(path))
        assert cfg.search.space, f"{path}: empty search space"
    else:
        job = load_config(str(path))
        assert job.model.num_classes > 0


# ----------------------------------------------------------------------------------------------------------
# model recipes: build + parameter counts


def _model_info():
    spec = importlib.util.spec_from_file_location("model_info_job", REPO / "jobs" / "model_info.py")
    sys.path.insert(0, str(REPO / "jobs"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _counts(cfg_path: pathlib.Path, device: str = "meta") -> tuple[dict[str, int], int, int]:
    """(per-state-dict-name sizes, total, deployed) of a model recipe, as jobs/model_info.py counts them."""
    import torch

    from pipeline.config import replace
    from pipeline.models import build_model

    model_cfg = replace(load_config(str(cfg_path)).model, **{"backbone.pretrained": False})
    with torch.device(device):
        model = build_model(model_cfg)
    sizes = _model_info().count(model)
    deployed = set(model.inference_state_dict())
    return sizes, sum(sizes.values()), sum(n for k, n in sizes.items() if k in deployed)


MODEL_RECIPES = sorted((CONFIGS / "model").glob("*.yaml"))


@pytest.mark.parametrize("path", MODEL_RECIPES, ids=[p.stem for p in MODEL_RECIPES])
def test_model_recipe_builds(path: pathlib.Path) -> None:
    sizes, total, deployed = _counts(path)
    aux = sum(n for k, n in sizes.items() if k.startswith(("aux_heads.", "adapter.", "aux_query_proj.")))
    assert total > deployed and total - deployed == aux  # the deployed model is the K = 0 model
    if path.stem == "co_dino_r50":  # the authors' numbers (golden keys.tsv, 80 classes, 900 queries, K = 2)
        assert (total, deployed) == (65_204_005, 48_064_780)


# ----------------------------------------------------------------------------------------------------------
# stage recipes: two optimizer steps + an evaluation on CPU

CANNOT_RUN_HERE = {
    "data": ["data.shards=", "synthetic.images=4", "synthetic.val_images=2", "synthetic.image_size=[128,192]",
             "data.num_workers=1", "data.map_batch_size=2", "eval.max_images=2"],
    "steps": ["train.max_steps=2", "train.total_batch_size=2", "train.warmup_steps=0"],
    "workers": ["scaling.use_gpu=false", "scaling.cpus_per_worker=1", "scaling.max_failures=0"],
}
IMAGE_SIZES = {  # the recipe's policy kept, sizes shrunk
    "detr": ["data.augment.scales=[160,192]", "data.augment.max_size=256", "data.augment.crop_scales=[128,160]",
             "data.augment.crop_size=[96,128]", "data.eval_size=[160,256]"],
    "lsj": ["data.augment.lsj_size=160"],
}  # >= 1500 encoder tokens at strides 4..64, so the 1500-query top-k of the O365 / COCO recipes is possible
SMALL_BACKBONE = {  # same family, small, no download
    "vit_authors": ["model.backbone.vit.embed_dim=64", "model.backbone.vit.depth=2", "model.backbone.vit.num_heads=2",
                    "model.backbone.vit.window_size=4", "model.backbone.vit.global_blocks=[1]"],
    "resnet": ["model.backbone.name=resnet18"],
    "swin": ["model.backbone.name=swin_tiny_patch4_window7_224"],
}
PER_RECIPE = {  # how many workers each runs (one multi-worker recipe), and its synthetic style
    "pretrain_o365.yaml": ["scaling.num_workers=1", "synthetic.style=o365", "synthetic.classes=365"],
    "finetune_coco.yaml": ["scaling.num_workers=2", "synthetic.style=coco", "synthetic.classes=80"],
    "finetune_lvis.yaml": ["scaling.num_workers=1", "synthetic.style=lvis", "synthetic.classes=1203"],
}


def _lsj_vit(job) -> list[str]:
    """With use_lsj the ViT's global rotary grid is fixed at img_size: it follows the shrunk LSJ canvas."""
    vit = job.model.backbone.vit
    if job.model.backbone.name == "vit_authors" and vit.use_lsj:
        return [f"model.backbone.vit.img_size={IMAGE_SIZES['lsj'][0].split('=')[1]}"]
    return []


def recipe_overrides(recipe: str, tmp: pathlib.Path, extra: list[str] = ()) -> list[str]:
    job = load_config(str(CONFIGS / recipe))
    family = next(k for k in SMALL_BACKBONE if job.model.backbone.name.startswith(k))
    out = [*CANNOT_RUN_HERE["data"], *CANNOT_RUN_HERE["steps"], *CANNOT_RUN_HERE["workers"],
           *IMAGE_SIZES[job.data.augment.policy], *SMALL_BACKBONE[family], "model.backbone.pretrained=false",
           *PER_RECIPE[recipe], *_lsj_vit(job), f"work_dir={tmp}", f"storage_path={tmp / 'ray_results'}",
           f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *extra]
    USED_OVERRIDES[recipe] = [o.replace(str(tmp), "<tmp>") for o in out]
    return out


def _run(recipe: str, tmp: pathlib.Path, extra: list[str] = ()):
    from pipeline.train.driver import run_stage

    job = load_config(str(CONFIGS / recipe), recipe_overrides(recipe, tmp, extra))
    return job, run_stage(job, register=False)


@pytest.fixture(scope="module")
def pretrain_smoke(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("o365")
    return _run("pretrain_o365.yaml", tmp)


def test_pretrain_o365_recipe_runs(pretrain_smoke) -> None:
    job, res = pretrain_smoke
    assert (job.model.transformer.num_queries, job.model.dn.num_dn_queries) == (1500, 1000)
    assert job.model.test.topk == 1500 and job.data.size_divisor == 32
    assert res.metrics["step"] == 2 and "val/AP" in res.metrics
    # async upload from /dev/shm (the recipe's): the registered checkpoint is whole
    from pipeline.train.checkpoint import verify_checkpoint

    assert job.train.checkpoint_upload == "async" and job.train.checkpoint_local_dir == "/dev/shm"
    assert verify_checkpoint(res.checkpoint_uri.removeprefix("file://")) == ""


def test_finetune_coco_recipe_runs(pretrain_smoke, tmp_path) -> None:
    from pipeline.train.checkpoint import load_optional

    job, res = _run("finetune_coco.yaml", tmp_path, [f"init.from={pretrain_smoke[1].checkpoint_uri}"])
    assert job.train.ema and job.scaling.num_workers == 2
    assert res.metrics["step"] == 2 and "val/AP" in res.metrics
    state = load_optional(res.checkpoint_uri, "trainer_state.json")
    assert state["ema_n_averaged"] == 2 and state["world_size"] == 2  # EMA counted both steps, 2 workers


def test_finetune_lvis_recipe_runs(pretrain_smoke, tmp_path) -> None:
    job, res = _run("finetune_lvis.yaml", tmp_path, [f"init.from={pretrain_smoke[1].checkpoint_uri}"])
    assert job.data.augment.policy == "lsj" and not job.model.transformer.with_padding_mask
    assert job.eval.protocol == "lvis" and job.model.num_classes == 1203
    assert job.model.loss.fed_loss and job.model.backbone.vit.use_lsj  # FedLoss on, fixed rotary grid
    assert res.metrics["step"] == 2 and "val/APr" in res.metrics


TUNE_OVERRIDES = [  # one trial: the search machinery (optuna + ASHA, several trials) is tested in test_tune.py
    "search.num_samples=1", "search.max_concurrent=1",
    "search.scheduler={type: asha, time_attr: epoch, max_t: 1, grace_period: 1, reduction_factor: 2}",
]


def test_tune_recipe_runs(ray_local, tmp_path) -> None:
    from pipeline.tune.search import load_search, run_search

    job_level = [*CANNOT_RUN_HERE["data"], *CANNOT_RUN_HERE["steps"], *CANNOT_RUN_HERE["workers"],
                 *IMAGE_SIZES["detr"], *SMALL_BACKBONE["resnet"], "model.backbone.pretrained=false",
                 "scaling.num_workers=1", "synthetic.style=coco", "synthetic.classes=8",
                 f"work_dir={tmp_path}", f"storage_path={tmp_path / 'ray_results'}",
                 f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    overrides = [*TUNE_OVERRIDES, *(f"job.{o}" for o in job_level)]
    USED_OVERRIDES["tune_co_heads.yaml"] = [o.replace(str(tmp_path), "<tmp>") for o in overrides]
    cfg = load_search(str(CONFIGS / "tune_co_heads.yaml"), overrides)
    assert cfg.search.algo == "optuna" and set(cfg.search.space) >= {"model.co.lambda1", "model.co.aux_heads"}
    assert cfg.job.model.transformer.num_queries == 900  # the R50 recipe's queries, kept
    res = run_search(cfg)
    assert len(res.rows) == 1 and res.best is not None, res.rows


# ----------------------------------------------------------------------------------------------------------
# the embedded local recipes (configs/local/) and the Tune presets of paper Tables 7 and 8

LOCAL_OVERRIDES = ["train.max_steps=2", "synthetic.images=4", "synthetic.val_images=2", "eval.max_images=2"]


def _local(recipe: str, tmp: pathlib.Path, extra: list[str] = ()):
    """A configs/local recipe (already CPU-sized): only its budget shrinks."""
    from pipeline.train.driver import run_stage

    overrides = [*LOCAL_OVERRIDES, f"work_dir={tmp}", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *extra]
    USED_OVERRIDES[f"local/{recipe}"] = [o.replace(str(tmp), "<tmp>") for o in overrides]
    job = load_config(str(CONFIGS / "local" / recipe), overrides)
    return job, run_stage(job, register=False)


def test_local_finetune_lvis_runs(ray_local, tmp_path) -> None:
    """configs/local/finetune_lvis.yaml, from scratch (`init.from=`; its default is the chain's registered O365
    model). The other local recipes run in other tests of the default run: pretrain_o365 in the fault tests
    (fault_helpers.tiny_job), finetune_coco in test_predict / test_train_artifacts, tune_co_heads in test_tune
    (slow). The init-from-a-checkpoint chain with class remap runs above (the cluster recipes)."""
    job, res = _local("finetune_lvis.yaml", tmp_path, ["init.from="])
    assert job.eval.protocol == "lvis" and res.metrics["step"] == 2 and "val/APr" in res.metrics


@pytest.mark.parametrize("preset", ["tune_table7.yaml", "tune_table8.yaml"])
def test_tune_table_presets_run(ray_local, tmp_path, preset: str) -> None:
    """The preset's job, fifo budget and results table, with its grid cut to its last point (Table 7: K = 6;
    Table 8: GFL alone), one seed."""
    from pipeline.tune.search import load_search, run_search

    full = load_search(str(CONFIGS / preset))
    last = full.search.space["model.co.aux_heads"].values[-1]
    overrides = [f"search.name={preset.removesuffix('.yaml')}-smoke", "search.max_concurrent=1",
                 "search.space={model.co.aux_heads: {type: grid, values: [[" + ", ".join(last) + "]]}}",
                 "search.scheduler={type: fifo, time_attr: step, max_t: 2, grace_period: 2}",
                 "job.train.max_steps=2", "job.synthetic.images=4", "job.synthetic.val_images=2",
                 f"job.work_dir={tmp_path}", f"job.tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    USED_OVERRIDES[preset] = [o.replace(str(tmp_path), "<tmp>") for o in overrides]
    res = run_search(load_search(str(CONFIGS / preset), overrides))
    assert len(res.rows) == 1 and res.best is not None, res.rows
    assert res.rows[0]["K"] == len(last) and len(last) == (6 if preset == "tune_table7.yaml" else 1)
