"""One place that turns a URI into a filesystem.

Every part of the pipeline (shard builder, loader, checkpoints, MLflow artefacts) reads and writes through
these helpers, so the same code reaches a local directory, AWS S3, MinIO or a test endpoint.

URIs accepted:
    /abs/or/relative/path       -> local filesystem (made absolute)
    file:///abs/path            -> local filesystem
    s3://bucket/prefix          -> s3fs; endpoint and credentials from the standard AWS environment variables
                                   (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
                                   AWS_SESSION_TOKEN, AWS_DEFAULT_REGION / AWS_REGION)
    <any fsspec protocol>://... -> fsspec.filesystem(protocol)
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
import pyarrow.fs as pafs

from pipeline.retry import RETRY

LOCAL_PROTOCOLS = ("", "file", "local")


def split_uri(uri: str) -> tuple[str, str]:
    """Split `uri` into (protocol, path without protocol). Local paths come back absolute as ("file", path)."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"storage URI must be a non-empty string, got {uri!r}")
    if "://" not in uri:
        return "file", os.path.abspath(os.path.expanduser(uri))
    protocol, path = uri.split("://", 1)
    protocol = protocol.lower()
    if protocol in LOCAL_PROTOCOLS:
        return "file", os.path.abspath(path if path.startswith("/") else "/" + path)
    return protocol, path.rstrip("/") if len(path) > 1 else path


def is_local(uri: str) -> bool:
    return split_uri(uri)[0] == "file"


def _s3_options() -> dict[str, Any]:
    """s3fs options from the AWS environment (s3fs/botocore read keys themselves; the endpoint needs help) and
    the retry policy of `pipeline.retry` (botocore standard mode: throttling, 5xx and connection errors)."""
    # AWS_RETRY_MODE / AWS_MAX_ATTEMPTS, when set, win: botocore reads them when the config leaves them out
    retries: dict[str, Any] = {}
    if not os.environ.get("AWS_RETRY_MODE"):
        retries["mode"] = RETRY.s3_retry_mode
    if not os.environ.get("AWS_MAX_ATTEMPTS"):
        retries["max_attempts"] = RETRY.s3_max_attempts
    opts: dict[str, Any] = {  # s3fs's own `retries` is a class attribute, left at its default (pipeline.retry)
        "config_kwargs": {"retries": retries, "connect_timeout": RETRY.s3_connect_timeout_s,
                          "read_timeout": RETRY.s3_read_timeout_s},
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        opts["client_kwargs"] = {"region_name": region}
    return opts


def get_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, protocol-less path) for `uri`."""
    protocol, path = split_uri(uri)
    if protocol == "file":
        return fsspec.filesystem("file"), path
    if protocol in ("s3", "s3a"):
        return fsspec.filesystem("s3", **_s3_options()), path
    try:
        fs = fsspec.filesystem(protocol)
    except (ValueError, ImportError) as e:
        raise ValueError(f"unsupported storage protocol {protocol!r} in {uri!r}: {e}") from e
    return fs, path


class RetryingS3FileSystem(pafs.S3FileSystem):
    """A native `pyarrow.fs.S3FileSystem` with the retry strategy of `pipeline.retry`, kept across pickling.

    pyarrow 25's `S3FileSystem.__reduce__` leaves `retry_strategy` out, so a filesystem sent to Ray Train workers
    (`storage_filesystem`) or Ray Data read tasks would fall back to 3 attempts; this subclass rebuilds it.
    `kwargs`: the `S3FileSystem` keyword arguments other than `retry_strategy`."""

    def __init__(self, kwargs: dict[str, Any], max_attempts: int) -> None:
        super().__init__(**kwargs, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts))
        self._kwargs, self._max_attempts = dict(kwargs), max_attempts

    def __reduce__(self) -> tuple[Any, ...]:
        return RetryingS3FileSystem, (self._kwargs, self._max_attempts)


def get_pyarrow_fs(uri: str) -> tuple[Any, str]:
    """(pyarrow.fs.FileSystem, protocol-less path) for `uri`, e.g. for Ray Train's `storage_filesystem`.

    S3 gets a native `pyarrow.fs.S3FileSystem` (`RetryingS3FileSystem`: retries and timeouts of `pipeline.retry`)
    with `endpoint_override` from AWS_ENDPOINT_URL (its constructor does not read that variable itself); other
    protocols are wrapped from fsspec.
    """
    protocol, path = split_uri(uri)
    if protocol == "file":
        return pafs.LocalFileSystem(), path
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {"connect_timeout": RETRY.s3_connect_timeout_s,
                                  "request_timeout": RETRY.s3_read_timeout_s}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs["endpoint_override"] = host or endpoint
            kwargs["scheme"] = scheme if host else "https"
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
            kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
            if os.environ.get("AWS_SESSION_TOKEN"):
                kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or RETRY.pyarrow_s3_max_attempts)  # env wins, as above
        return RetryingS3FileSystem(kwargs, attempts), path
    fs, path = get_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its protocol (`join("s3://b/x", "y") == "s3://b/x/y"`)."""
    if "://" in uri:
        protocol, path = uri.split("://", 1)
        return f"{protocol}://" + posixpath.join(path, *parts) if path else f"{protocol}://" + "/".join(parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = get_fs(uri)
    return bool(fs.exists(path))


def makedirs(uri: str) -> None:
    """Create a local directory; object stores have no directories (s3fs would try to create the bucket)."""
    fs, path = get_fs(uri)
    if is_local(uri):
        fs.makedirs(path, exist_ok=True)


def read_bytes(uri: str) -> bytes:
    fs, path = get_fs(uri)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such file: {uri}") from e


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri`. Local files are written to a temp name and renamed (never half-written);
    object stores publish an object only when its upload completes, which gives the same guarantee."""
    fs, path = get_fs(uri)
    if is_local(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_json(uri: str, obj: Any, indent: int | None = 2) -> None:
    write_bytes(uri, json.dumps(obj, indent=indent, sort_keys=False).encode("utf-8"))


def listdir(uri: str) -> list[str]:
    """Full URIs of the entries directly under `uri` (sorted); [] if it does not exist."""
    fs, path = get_fs(uri)
    if not fs.exists(path):
        return []
    protocol, _ = split_uri(uri)
    names = sorted(fs.ls(path, detail=False))
    if protocol == "file":
        return names
    return [f"{protocol}://{n}" for n in names]


def remove(uri: str, recursive: bool = True) -> None:
    fs, path = get_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def check_writable(uri: str) -> None:
    """Raise a one-line error unless a small object can be written (and removed) under `uri`."""
    probe = join(uri, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"")
        remove(probe, recursive=False)
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else ""
        raise OSError(f"cannot write under {uri!r}: {type(e).__name__}: {first}") from e


def check_reachable(uri: str) -> None:
    """Raise a one-line error if the location of `uri` (or its parent) cannot be reached."""
    fs, path = get_fs(uri)
    try:
        fs.exists(path)
    except Exception as e:  # noqa: BLE001 - any transport error becomes one readable line
        raise OSError(f"storage URI {uri!r} is unreachable: {type(e).__name__}: {e}") from e
