"""Where the images of a batch-inference job come from.

    src = resolve_source("s3://bucket/photos/")          # every image file under the prefix (recursive)
    src = resolve_source("/data/list.txt")               # one path / URI per line (relative to the list's folder)
    src = resolve_source(".codetr/shards/coco-...", split="val")   # a split of the project's Parquet shards
    src.kind, src.items  # items: [{"image_id": 1, "path": "..."}] for files; shard files for shards
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LIST_EXTENSIONS = (".txt", ".lst", ".list")


@dataclass
class ImageSource:
    """kind: "files" (items = [{"image_id", "path"}], ids 1..N in listing order) or "shards" (shard_files =
    the split's Parquet files; image ids are the shards' own)."""

    kind: str
    uri: str
    items: list[dict] = field(default_factory=list)
    shard_files: list[str] = field(default_factory=list)


def resolve_source(uri: str, split: str = "val") -> ImageSource:
    """A folder / prefix, an image list file or a shard root -> ImageSource; one-line errors for bad input."""
    if not uri:
        raise ValueError("--images is empty: expected a folder or prefix, a list file (.txt) or a shard root")
    if storage.exists(storage.join(uri, "manifest.json")):
        from pipeline.data.config import DataConfig
        from pipeline.data.loader import shard_files

        return ImageSource("shards", uri, shard_files=shard_files(DataConfig(shards=uri), split))
    if uri.lower().endswith(LIST_EXTENSIONS):
        if not storage.exists(uri):
            raise FileNotFoundError(f"image list {uri!r} does not exist")
        base = uri.rsplit("/", 1)[0] if "/" in uri else "."
        lines = [ln.strip() for ln in storage.read_bytes(uri).decode().splitlines()]
        paths = [p if ("://" in p or p.startswith("/")) else storage.join(base, p)
                 for p in lines if p and not p.startswith("#")]
        return ImageSource("files", uri, items=_numbered(paths))
    paths = list_images(uri)
    if not paths:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {uri!r}")
    return ImageSource("files", uri, items=_numbered(paths))


def list_images(uri: str) -> list[str]:
    """Image files under a folder or prefix (recursive, sorted), as URIs of the same protocol."""
    fs, path = storage.get_fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"image folder {uri!r} does not exist")
    protocol, _ = storage.split_uri(uri)
    found = sorted(p for p in fs.find(path) if p.lower().endswith(IMAGE_EXTENSIONS))
    return found if protocol == "file" else [f"{protocol}://{p}" for p in found]


def _numbered(paths: list[str]) -> list[dict]:
    return [{"image_id": i + 1, "path": p} for i, p in enumerate(paths)]
