"""A build killed midway (SIGKILL of the build process) and re-run ends with exactly the shards of an
uninterrupted build; a tampered shard is rebuilt, the others are reused; --rebuild starts from scratch."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.data.shards import build_shards, read_manifest

ROOT = Path(__file__).parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("shard_build_scale", ROOT / "bench" / "shard_build_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parts(out: str) -> dict[str, object]:
    d = os.path.join(out, "train")
    return {f: pq.read_table(os.path.join(d, f)) for f in sorted(os.listdir(d))}


def _job(ann: str, images: str, out: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "jobs" / "build_shards.py"), "--annotations", ann, "--images", images,
           "--out", out, "--split", "train", "--rows-per-shard", "20", "--serial", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_killed_build_resumes_to_identical_shards(tmp_path, capsys):
    ann, images = _bench().generate_o365_like(str(tmp_path / "src"), 1000, seed=3)
    ref = str(tmp_path / "ref")
    ref_manifest = build_shards(ann, images, ref, "train", rows_per_shard=20, parallel=False, verbose=False)
    assert ref_manifest.splits["train"].num_shards == 50

    out = str(tmp_path / "out")
    done = Path(out) / "_build" / "train" / "done"
    proc = _job(ann, images, out)
    deadline = time.monotonic() + 120
    while not (done.is_dir() and len(os.listdir(done)) >= 5):
        assert proc.poll() is None, f"build ended before it could be killed:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "no shard finished within 120 s"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the build's own process group (start_new_session)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    killed_at = len(os.listdir(done))
    assert 5 <= killed_at < 50  # killed midway
    assert not os.path.exists(os.path.join(out, "manifest.json")) or "train" not in read_manifest(out).splits

    proc = _job(ann, images, out)  # --resume is the default
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    reused = int(log.split(" of 50 shard(s) reused")[0].rsplit(" ", 1)[-1])
    assert killed_at - 1 <= reused < 50  # the shard being written at the kill may have no record yet

    got, want = _parts(out), _parts(ref)
    assert list(got) == list(want)
    for name in want:
        assert got[name].equals(want[name]), name
    ids = [i for t in got.values() for i in t["image_id"].to_pylist()]
    assert len(ids) == len(set(ids)) == 1000
    assert read_manifest(out).to_dict()["splits"] == ref_manifest.to_dict()["splits"]
    assert read_manifest(out).categories == ref_manifest.categories
    assert not (Path(out) / "_build" / "train" / "spill").exists()  # spill files removed after success

    # A shard whose bytes changed no longer matches its record: it alone is written again.
    victim = Path(out) / "train" / "part-00007.parquet"
    victim.write_bytes(victim.read_bytes()[:-100])
    m = build_shards(ann, images, out, "train", rows_per_shard=20, parallel=False, verbose=True)
    assert "49 of 50 shard(s) reused" in capsys.readouterr().out
    assert got["part-00007.parquet"].equals(pq.read_table(victim))
    assert m.to_dict()["splits"] == ref_manifest.to_dict()["splits"]


def test_rebuild_ignores_earlier_shards(tmp_path, capsys):
    ann, images = _bench().generate_o365_like(str(tmp_path / "src"), 120, seed=4)
    out = str(tmp_path / "out")
    first = build_shards(ann, images, out, "train", rows_per_shard=40, parallel=False, verbose=False)
    build_shards(ann, images, out, "train", rows_per_shard=40, parallel=False)
    assert "3 of 3 shard(s) reused" in capsys.readouterr().out
    again = build_shards(ann, images, out, "train", rows_per_shard=40, parallel=False, resume=False)
    assert "0 of 3 shard(s) reused" in capsys.readouterr().out
    assert again.to_dict() == first.to_dict()
    # a different shard size changes every fingerprint: nothing is reused, and the old 4th..6th parts go
    m = build_shards(ann, images, out, "train", rows_per_shard=20, parallel=False)
    assert "0 of 6 shard(s) reused" in capsys.readouterr().out
    m = build_shards(ann, images, out, "train", rows_per_shard=60, parallel=False, verbose=False)
    assert sorted(os.listdir(os.path.join(out, "train"))) == ["part-00000.parquet", "part-00001.parquet"]
    assert m.splits["train"].num_images == 120
