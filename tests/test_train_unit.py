"""Fast unit tests of the training stage machinery (no Ray): optimizer groups, lr schedule, class-head remap,
checkpoint round trip, and the jobs' one-line errors on bad input (run as subprocesses)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

from pipeline.train import checkpoint as ckpt_io
from pipeline.train.config import TrainConfig
from pipeline.train.init import remap_state
from pipeline.train.optim import build_optimizer, lr_factor, param_groups, set_lr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------------
# optimizer and schedule


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
        self.head = nn.Linear(4, 2)
        for p in self.backbone[0].parameters():  # a frozen stem, as frozen_stages does
            p.requires_grad_(False)


def test_param_groups_backbone_lr_and_frozen_params_excluded():
    net = _Net()
    groups = param_groups(net, lr=2e-4, weight_decay=1e-4, lr_mults={"backbone": 0.1})
    by_mult = {g["lr_mult"]: g for g in groups}
    assert set(by_mult) == {1.0, 0.1}
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    trainable_backbone = [p for n, p in net.named_parameters() if n.startswith("backbone") and p.requires_grad]
    assert ids(by_mult[0.1]["params"]) == ids(trainable_backbone)
    assert ids(by_mult[1.0]["params"]) == ids(net.head.parameters())
    frozen = ids(net.backbone[0].parameters())
    assert not frozen & set().union(*(ids(g["params"]) for g in groups))
    assert by_mult[0.1]["lr"] == pytest.approx(2e-5) and by_mult[1.0]["lr"] == pytest.approx(2e-4)
    assert all(g["weight_decay"] == 1e-4 for g in groups)  # norms included (mmcv default constructor)

    opt = build_optimizer(net, TrainConfig(lr=1e-3, lr_mults={"backbone": 0.1}))
    set_lr(opt, 0.5)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([5e-5, 5e-4])
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in net.parameters())


def test_build_optimizer_is_fused_adamw_and_resumes_a_loop_adamw_state():
    # Fused AdamW (one kernel per group) takes the same steps as torch's per-tensor loop, and a checkpoint's
    # optimizer state written by the loop implementation (runs before the switch) loads and continues.
    cfg = TrainConfig(lr=1e-2, weight_decay=0.05, lr_mults={"backbone": 0.1})
    torch.manual_seed(0)
    nets = [_Net(), _Net()]
    nets[1].load_state_dict(nets[0].state_dict())
    fused = build_optimizer(nets[0], cfg)
    loop = torch.optim.AdamW(param_groups(nets[1], cfg.lr, cfg.weight_decay, cfg.lr_mults), lr=cfg.lr,
                             weight_decay=cfg.weight_decay, foreach=False)
    assert fused.defaults["fused"] and all(g["fused"] for g in fused.param_groups)
    x = torch.randn(2, 3, 6, 6)
    loss = lambda net: net.head(net.backbone(x).mean((2, 3))).square().mean()  # noqa: E731
    for _ in range(3):
        for net, opt in zip(nets, (fused, loop)):
            loss(net).backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    resumed = build_optimizer(nets[1], cfg)
    resumed.load_state_dict(loop.state_dict())
    loss(nets[1]).backward()
    resumed.step()
    assert all(int(s["step"]) == 4 for s in resumed.state.values())


def test_lr_factor_step_decay_and_linear_warmup():
    epochs = TrainConfig(lr_steps=(11,), lr_gamma=0.1)
    assert lr_factor(10_000, 10, epochs) == 1.0
    assert lr_factor(0, 11, epochs) == pytest.approx(0.1)

    steps = TrainConfig(lr_steps=(100, 200), lr_step_unit="step", lr_gamma=0.1)
    assert [lr_factor(s, 0, steps) for s in (99, 100, 199, 200)] == pytest.approx([1.0, 0.1, 0.1, 0.01])

    warm = TrainConfig(lr_steps=(), warmup_steps=500, warmup_ratio=0.001)
    assert lr_factor(0, 0, warm) == pytest.approx(0.001)
    assert lr_factor(250, 0, warm) == pytest.approx(1 - 0.999 * 0.5)  # mmcv 'linear' warmup
    assert lr_factor(500, 0, warm) == 1.0
    both = TrainConfig(lr_steps=(0,), lr_gamma=0.1, warmup_steps=10, warmup_ratio=0.5)
    assert lr_factor(5, 0, both) == pytest.approx(0.1 * 0.75)


# ---------------------------------------------------------------------------------------------------------------
# class-head remap


class _Heads(nn.Module):
    """Parameters named like the model's class-dependent ones (n classes, n + 1 with background, 4 n boxes)."""

    def __init__(self, n: int, d: int = 6) -> None:
        super().__init__()
        self.backbone = nn.Linear(d, d)
        self.cls_branches = nn.ModuleList([nn.Linear(d, n)])
        self.label_embedding = nn.Embedding(n, d)
        self.fc_cls = nn.Linear(d, n + 1)
        self.fc_reg = nn.Linear(d, 4 * n)
        self.atss_cls = nn.Conv2d(d, n, 3)


def _cats(names: list[str]) -> list[dict]:
    return [{"id": 1000 + i, "name": n} for i, n in enumerate(names)]


def test_remap_state_365_to_80_by_category_name():
    torch.manual_seed(0)
    src_names = [f"class{i}" for i in range(365)]
    matched = [f"class{i}" for i in range(300, 240, -1)]  # 60 shared names, in another order
    dst_names = matched[:30] + [f"new{i}" for i in range(20)] + matched[30:]
    src_model, dst_model = _Heads(365), _Heads(80)
    src = src_model.state_dict()
    fresh = {k: v.clone() for k, v in dst_model.state_dict().items()}

    out, report = remap_state(src, dst_model, _cats(src_names), _cats(dst_names))

    assert report["classes_matched_by_name"] == 60 and report["classes_fresh"] == 20
    assert report["remapped_params"] == 9 and report["fresh_params"] == [] and report["missing_in_source"] == 0
    assert report["copied"] == 2  # backbone weight + bias
    assert torch.equal(out["backbone.weight"], src["backbone.weight"])
    for j, name in enumerate(dst_names):
        i = src_names.index(name) if name in src_names else -1
        rows = {
            "cls_branches.0.weight": (j, i, 1), "cls_branches.0.bias": (j, i, 1),
            "label_embedding.weight": (j, i, 1), "fc_cls.weight": (j, i, 1), "atss_cls.weight": (j, i, 1),
            "fc_reg.weight": (j, i, 4), "fc_reg.bias": (j, i, 4),
        }
        for key, (dj, si, g) in rows.items():
            got = out[key][dj * g:(dj + 1) * g]
            want = src[key][si * g:(si + 1) * g] if si >= 0 else fresh[key][dj * g:(dj + 1) * g]
            assert torch.equal(got, want), (key, name)
    # background row (the last of fc_cls, n + 1 outputs) is kept from the source
    assert out["fc_cls.weight"].shape == (81, 6)
    assert torch.equal(out["fc_cls.weight"][-1], src["fc_cls.weight"][-1])
    assert torch.equal(out["fc_cls.bias"][-1], src["fc_cls.bias"][-1])
    dst_model.load_state_dict(out)  # shapes fit the new model


def test_remap_state_covers_every_class_parameter_of_the_model():
    """Every parameter of the real model whose shape depends on the class count is remapped, none left fresh."""
    from pipeline.config import load_config
    from pipeline.models import build_model

    job = load_config(os.path.join(REPO, "configs/local/pretrain_o365.yaml"))
    torch.manual_seed(0)
    big = build_model(load_config(os.path.join(REPO, "configs/local/pretrain_o365.yaml"),
                                  ["model.num_classes=7"]).model)
    small = build_model(load_config(os.path.join(REPO, "configs/local/pretrain_o365.yaml"),
                                    ["model.num_classes=3"]).model)
    del job
    differ = {k for k, v in small.state_dict().items() if big.state_dict()[k].shape != v.shape}
    assert differ, "the class count changes no parameter shape?"
    out, report = remap_state(big.state_dict(), small, _cats(["a", "b", "c", "d", "e", "f", "g"]),
                              _cats(["g", "x", "b"]))
    assert report["fresh_params"] == []
    assert report["remapped_params"] >= len(differ)
    assert report["classes_matched_by_name"] == 2
    small.load_state_dict(out)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip(tmp_path):
    net = _Net()
    opt = torch.optim.AdamW(net.head.parameters(), lr=1e-3)
    net.head(torch.randn(3, 4)).sum().backward()
    opt.step()
    ema = {k: v + 1 for k, v in net.state_dict().items()}
    state = {"epoch": 2, "step": 17, "data_position": {"epoch": 2, "consumed": [[0, 6], [40, 46]], "chunks": "ab12"},
             "best_ap": 0.25}
    cats = _cats(["cat", "dog"])
    d = ckpt_io.save_checkpoint(str(tmp_path / "ckpt"), model_state=net.state_dict(), trainer_state=state,
                                config_yaml="train: {lr: 0.001}\n", categories=cats,
                                optimizer_state=opt.state_dict(), ema_state=ema)
    assert sorted(os.listdir(d)) == sorted([ckpt_io.MODEL, ckpt_io.EMA, ckpt_io.OPTIMIZER, ckpt_io.STATE,
                                            ckpt_io.CONFIG, ckpt_io.CATEGORIES, ckpt_io.MANIFEST])
    for uri in (d, os.path.join(d, ckpt_io.MODEL), "file://" + d):
        loaded = ckpt_io.load_model_state(uri)
        assert loaded.keys() == net.state_dict().keys()
        assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    assert all(torch.equal(ckpt_io.load_model_state(d, prefer_ema=True)[k], v) for k, v in ema.items())
    assert ckpt_io.load_optional(d, ckpt_io.STATE) == state
    assert ckpt_io.load_optional(d, ckpt_io.CATEGORIES) == cats
    assert ckpt_io.load_optional(d, ckpt_io.CONFIG) == "train: {lr: 0.001}\n"
    opt2 = torch.optim.AdamW(_Net().head.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt_io.load_optional(d, ckpt_io.OPTIMIZER))
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert ckpt_io.load_optional(str(tmp_path), ckpt_io.STATE) is None
    with pytest.raises(FileNotFoundError, match="model.pt"):
        ckpt_io.load_model_state(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# jobs: bad input -> one line on stderr, exit code 2, before any Ray instance is started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_job(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "MLFLOW_"))}
    base["PYTHONWARNINGS"] = "ignore"
    return subprocess.run([sys.executable, os.path.join(REPO, "jobs", "pretrain_o365.py"), *args],
                          cwd=REPO, env={**base, **(env or {})}, capture_output=True, text=True, timeout=120)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    return lines[0]


def test_job_unknown_config_key_is_one_line_error():
    proc = _run_job(["--set", "train.bogus=1"])
    _assert_one_line_error(proc, "train.bogus", "valid keys")


def test_job_unreachable_s3_uri_is_one_line_error(tmp_path):
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}
    proc = _run_job(["--set", f"work_dir={tmp_path}", "--set", "data.shards=s3://no-such-bucket/shards",
                     "--set", "tracking.enabled=false"], env)
    _assert_one_line_error(proc, "s3://no-such-bucket/shards", "unreachable")


def test_job_infeasible_worker_count_is_one_line_error(tmp_path):
    proc = _run_job(["--set", f"work_dir={tmp_path}", "--set", "scaling.num_workers=64",
                     "--set", "tracking.enabled=false"])
    _assert_one_line_error(proc, "64 workers", "CPUs")
