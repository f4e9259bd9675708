"""Storage URIs against the local disk and moto's S3 server over HTTP (no in-process mocks)."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from pipeline import storage


def test_split_uri_local(tmp_path):
    assert storage.split_uri(str(tmp_path)) == ("file", str(tmp_path))
    assert storage.split_uri(f"file://{tmp_path}") == ("file", str(tmp_path))
    assert storage.split_uri("s3://bucket/a/b/") == ("s3", "bucket/a/b")
    with pytest.raises(ValueError, match="non-empty string"):
        storage.split_uri("")


@pytest.mark.parametrize("kind", ["local", "file", "s3"])
def test_read_write_list(kind, tmp_path, request):
    if kind == "s3":
        root = request.getfixturevalue("s3_bucket") + "/prefix"
    elif kind == "file":
        root = f"file://{tmp_path}/root"
    else:
        root = str(tmp_path / "root")
    storage.write_json(storage.join(root, "a", "m.json"), {"x": [1, 2]})
    storage.write_bytes(storage.join(root, "a", "b.bin"), b"\x00\x01")
    assert storage.read_json(storage.join(root, "a", "m.json")) == {"x": [1, 2]}
    assert storage.read_bytes(storage.join(root, "a", "b.bin")) == b"\x00\x01"
    assert storage.exists(storage.join(root, "a", "b.bin"))
    names = [n.rsplit("/", 1)[-1] for n in storage.listdir(storage.join(root, "a"))]
    assert names == ["b.bin", "m.json"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        storage.read_bytes(storage.join(root, "missing"))
    storage.remove(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "b.bin"))


def test_pyarrow_fs_reaches_moto(s3_bucket):
    storage.write_bytes(f"{s3_bucket}/x/y.txt", b"hello")
    fs, path = storage.get_pyarrow_fs(f"{s3_bucket}/x/y.txt")
    assert isinstance(fs, pafs.S3FileSystem)
    with fs.open_input_stream(path) as f:
        assert f.read() == b"hello"


def test_unreachable_endpoint_is_one_line(monkeypatch):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(OSError, match="unreachable"):
        storage.check_reachable("s3://bucket/key")
    s3fs.S3FileSystem.clear_instance_cache()
