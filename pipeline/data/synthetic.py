"""Synthetic COCO-format detection data that a small detector can genuinely learn.

    ds = generate_dataset("file:///tmp/synth", SyntheticConfig(images=200, classes=5, seed=0))
    ds.splits["train"].annotations   # .../annotations/instances_train.json
    ds.splits["train"].images        # the --images root to give the shard builder

Classes are (shape x colour x texture) combinations named e.g. "red_circle" or "blue_star_striped"
(`class_names`). The first C names in one fixed order are used, so a 365-class set and an 80-class set share
the 80 names; stage chaining remaps class heads by name. The order walks a Latin square over shape x colour
with solid fill before any texture, so small sets (C <= 144) differ in shape and colour, and C <= 12 classes
differ in both. Styles mimic the real sources the shard builder reads:

- coco:  `file_name` "000000000001.jpg" under `images/<split>/`; non-contiguous category ids (one id skipped
         every 10, as COCO's 1..90 for 80 classes); a few crowd regions (`iscrowd=1`, one box over a cluster).
- o365:  ids 1..C in alphabetical name order (a label order unlike coco's); images in patch folders
         `images/<split>/patchK/` while `file_name` reads "images/v1/patchK/objects365_v1_<id>.jpg", as in
         Objects365 v2 whose names do not match the download layout.
- lvis:  ids 1..C alphabetical; no `file_name`, images found by `coco_url` ".../<split>/<id>.jpg" under
         `images/`; no crowd; long-tailed classes with `frequency` r/c/f (first ~34% of classes f, next ~38% c,
         rest r, sampled with weights 1 / 0.25 / 0.04), `image_count`/`instance_count` from the first split;
         per image `neg_category_ids` (verified absent) and `not_exhaustive_category_ids` (one drawn instance
         of that class left unannotated).

Difficulties: object sizes log-uniform from `min_object_size` px to half the shorter image side, truncation
at image borders (>= 50% of an object inside), overlaps with occlusion (no annotated object keeps < 40% of its
pixels visible; boxes and areas are those of the visible pixels, as COCO's), cluttered backgrounds (gradient,
low-frequency blotches, noise, muted distractor lines and polygons), image sizes drawn per side from
`image_size` (varied aspect ratios), ~6% images without objects, JPEG (quality 90) with ~10% PNG.
Every image is drawn from `numpy.random.default_rng((seed, crc32(split), index))`: same arguments, same bytes.
"""

from __future__ import annotations

import io
import json
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from pipeline import storage

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon",
          "cross", "ring", "ellipse", "pentagon", "arrow", "crescent")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 225), "yellow": (240, 215, 20),
    "cyan": (20, 205, 215), "magenta": (215, 40, 205), "orange": (250, 135, 15), "purple": (115, 35, 170),
    "white": (248, 248, 248), "black": (15, 15, 15), "pink": (250, 160, 195), "brown": (125, 75, 25),
}
# appended textures extend the class list (1,296 names: an LVIS-size 1,203-class set) without renaming the first
TEXTURES = ("solid", "striped", "dotted", "checkered", "hstriped", "vstriped", "ringed", "grid", "antistriped")
STYLES = ("coco", "o365", "lvis")
# (width / height) of a shape's box before jitter
_BASE_ASPECT = {"ellipse": 2.0, "arrow": 1.6}


def class_names(num_classes: int) -> list[str]:
    """The first `num_classes` names of the fixed class order (stable across versions and styles)."""
    names = []
    for texture in TEXTURES:
        for k in range(len(SHAPES) * len(COLOURS)):  # Latin square: every (shape, colour) pair once
            shape = SHAPES[k % len(SHAPES)]
            colour = list(COLOURS)[(k % len(SHAPES) + k // len(SHAPES)) % len(COLOURS)]
            names.append(f"{colour}_{shape}" + ("" if texture == "solid" else f"_{texture}"))
    if not 1 <= num_classes <= len(names):
        raise ValueError(f"classes must be in 1..{len(names)} (shapes x colours x textures), got {num_classes}")
    return names[:num_classes]


@dataclass(frozen=True)
class SyntheticConfig:
    images: int = 200                    # images in the first split ("train")
    val_images: int | None = None        # images in every other split; None -> max(2, images // 5)
    classes: int = 5
    seed: int = 0
    style: str = "coco"                  # coco | o365 | lvis
    image_size: tuple[int, int] = (160, 320)  # min, max pixels per side (each side drawn independently)
    splits: tuple[str, ...] = ("train", "val")
    min_object_size: int = 8             # px, longer side of the smallest object
    mean_objects: float = 4.0            # objects per non-empty image: 1 + Poisson(mean - 1), capped
    max_objects: int = 15
    empty_fraction: float = 0.06
    crowd_fraction: float = 0.08         # images with one crowd region (coco / o365 style)
    png_fraction: float = 0.1
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {list(STYLES)}, got {self.style!r}")
        if self.images < 1 or (self.val_images is not None and self.val_images < 0):
            raise ValueError(f"images must be >= 1 and val_images >= 0, got {self.images}, {self.val_images}")
        lo, hi = self.image_size
        if not 32 <= lo <= hi:
            raise ValueError(f"image_size must be (min, max) with 32 <= min <= max, got {self.image_size}")
        if not 2 <= self.min_object_size <= lo // 2:
            raise ValueError(f"min_object_size must be in 2..{lo // 2}, got {self.min_object_size}")
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits must be distinct names, got {self.splits}")
        class_names(self.classes)


@dataclass(frozen=True)
class SplitPaths:
    annotations: str  # URI of the instances JSON
    images: str       # URI to pass as the shard builder's --images


@dataclass(frozen=True)
class SyntheticDataset:
    root: str
    categories: list[dict] = field(default_factory=list)
    splits: dict[str, SplitPaths] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# drawing


def _shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    """(h, w) bool mask of `shape` filling a w x h box."""
    img = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(img)
    box = (0, 0, w - 1, h - 1)

    def poly(points: list[tuple[float, float]]) -> None:
        d.polygon([(x * (w - 1), y * (h - 1)) for x, y in points], fill=255)

    def regular(n: int, r_in: float | None = None, rot: float = -np.pi / 2) -> list[tuple[float, float]]:
        k = 2 * n if r_in else n
        radii = [0.5 if i % 2 == 0 or not r_in else r_in for i in range(k)]
        return [(0.5 + r * np.cos(rot + 2 * np.pi * i / k), 0.5 + r * np.sin(rot + 2 * np.pi * i / k))
                for i, r in enumerate(radii)]

    if shape in ("circle", "ellipse", "ring", "crescent"):
        d.ellipse(box, fill=255)
        if shape == "ring":
            d.ellipse((0.28 * w, 0.28 * h, 0.72 * w, 0.72 * h), fill=0)
        elif shape == "crescent":
            d.ellipse((0.35 * w, -0.05 * h, 1.3 * w, 1.05 * h), fill=0)
    elif shape == "square":
        d.rectangle(box, fill=255)
    elif shape == "triangle":
        poly([(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)])
    elif shape == "diamond":
        poly([(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)])
    elif shape == "star":
        poly(regular(5, r_in=0.2))
    elif shape == "hexagon":
        poly(regular(6, rot=0.0))
    elif shape == "pentagon":
        poly(regular(5))
    elif shape == "cross":
        poly([(0.33, 0), (0.67, 0), (0.67, 0.33), (1, 0.33), (1, 0.67), (0.67, 0.67), (0.67, 1), (0.33, 1),
              (0.33, 0.67), (0, 0.67), (0, 0.33), (0.33, 0.33)])
    elif shape == "arrow":
        poly([(0, 0.35), (0.6, 0.35), (0.6, 0.05), (1, 0.5), (0.6, 0.95), (0.6, 0.65), (0, 0.65)])
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    return np.asarray(img) > 127


def _texture(texture: str, colour: np.ndarray, w: int, h: int) -> np.ndarray:
    """(h, w, 3) uint8 fill: the class colour, patterned with a contrasting shade."""
    lum = float(colour @ np.array([0.299, 0.587, 0.114]))
    second = colour * 0.45 if lum > 110 else colour + (255 - colour) * 0.6
    if texture == "solid":
        return np.broadcast_to(colour.astype(np.uint8), (h, w, 3))
    p = max(3, round(min(w, h) / 5))
    yy, xx = np.mgrid[0:h, 0:w]
    if texture == "striped":
        alt = ((xx + yy) // p) % 2 == 1
    elif texture == "dotted":
        alt = ((xx % p) - p / 2) ** 2 + ((yy % p) - p / 2) ** 2 < (p / 3.2) ** 2
    elif texture == "checkered":
        alt = ((xx // p) + (yy // p)) % 2 == 1
    elif texture == "hstriped":
        alt = (yy // p) % 2 == 1
    elif texture == "vstriped":
        alt = (xx // p) % 2 == 1
    elif texture == "ringed":
        alt = (np.hypot(xx - w / 2, yy - h / 2) // p) % 2 == 1
    elif texture == "grid":
        alt = ((xx % p) < max(1, p // 4)) | ((yy % p) < max(1, p // 4))
    elif texture == "antistriped":
        alt = ((xx - yy) // p) % 2 == 1
    else:
        raise ValueError(f"unknown texture {texture!r}; expected one of {list(TEXTURES)}")
    return np.where(alt[..., None], second, colour).astype(np.uint8)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Cluttered, muted background: gradient + low-frequency blotches + distractors + noise. (h, w, 3) uint8."""
    grey = rng.uniform(70, 180)
    c0, c1 = (grey + 0.35 * (rng.uniform(40, 220, 3) - grey) for _ in range(2))
    t = np.linspace(0, 1, w)[None, :] * np.cos(a := rng.uniform(0, np.pi)) + np.linspace(0, 1, h)[:, None] * np.sin(a)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    blotch = rng.uniform(-25, 25, (max(2, h // 40), max(2, w // 40), 3)).astype(np.float32)
    img += np.stack([np.asarray(Image.fromarray(blotch[..., c]).resize((w, h), Image.BILINEAR)) for c in range(3)], -1)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(3, 16)):
        g = rng.uniform(50, 200)
        col = tuple(int(v) for v in np.clip(g + 0.3 * (rng.uniform(0, 255, 3) - g), 0, 255))
        pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(rng.integers(2, 6))]
        if len(pts) == 2 or rng.random() < 0.4:
            d.line(pts, fill=col, width=int(rng.integers(1, 4)))
        else:
            d.polygon(pts, fill=col)
    arr = np.asarray(canvas).astype(np.int16) + rng.integers(-10, 11, (h, w, 1), dtype=np.int16)
    return np.clip(arr, 0, 255).astype(np.uint8)


class _Scene:
    """Canvas plus an instance map (-1 = background) for visible-pixel boxes and occlusion checks."""

    def __init__(self, canvas: np.ndarray):
        self.canvas = canvas
        self.h, self.w = canvas.shape[:2]
        self.ids = np.full((self.h, self.w), -1, np.int32)
        self.full_area: list[int] = []

    def place(self, mask: np.ndarray, fill: np.ndarray, x0: int, y0: int, inst: int | None = None) -> int | None:
        """Paint `mask` at (x0, y0) unless that leaves any earlier instance < 40% visible or puts < 50% of the
        new object outside the image. `inst` adds to an existing instance (crowd members). Returns the id."""
        mh, mw = mask.shape
        ya, yb, xa, xb = max(y0, 0), min(y0 + mh, self.h), max(x0, 0), min(x0 + mw, self.w)
        if yb <= ya or xb <= xa:
            return None
        m = mask[ya - y0:yb - y0, xa - x0:xb - x0]
        if m.sum() < 0.5 * mask.sum():
            return None
        region = self.ids[ya:yb, xa:xb]
        covered = np.bincount(region[m & (region >= 0)], minlength=len(self.full_area))
        if inst is None and len(self.full_area):
            visible = np.bincount(self.ids[self.ids >= 0], minlength=len(self.full_area))
            if np.any((covered > 0) & (visible - covered < 0.4 * np.asarray(self.full_area))):
                return None
        if inst is None:
            inst = len(self.full_area)
            self.full_area.append(0)
        self.full_area[inst] += int(mask.sum())
        region[m] = inst
        self.canvas[ya:yb, xa:xb][m] = fill[ya - y0:yb - y0, xa - x0:xb - x0][m]
        return inst

    def visible_box(self, inst: int) -> tuple[list[float], int] | None:
        """(xywh box of the visible pixels, visible pixel count), or None if fewer than 4 pixels show."""
        m = self.ids == inst
        area = int(m.sum())
        if area < 4:
            return None
        ys, xs = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        return [float(xs[0]), float(ys[0]), float(xs[-1] - xs[0] + 1), float(ys[-1] - ys[0] + 1)], area


def _object(rng: np.random.Generator, name: str, size: float, jitter: float = 0.08) -> tuple[np.ndarray, np.ndarray]:
    """(mask (h, w) bool, fill (h, w, 3) uint8) of one instance of class `name` whose longer side is `size`."""
    colour, shape, *tex = name.split("_")
    aspect = _BASE_ASPECT.get(shape, 1.0) * float(np.exp(rng.uniform(-0.15, 0.15)))
    w, h = (size, size / aspect) if aspect >= 1 else (size * aspect, size)
    w, h = max(2, round(w)), max(2, round(h))
    rgb = np.clip(np.array(COLOURS[colour], np.float32) * rng.uniform(1 - jitter, 1 + jitter), 0, 255)
    return _shape_mask(shape, w, h), _texture(tex[0] if tex else "solid", rgb, w, h)


def render_image(rng: np.random.Generator, names: list[str], weights: np.ndarray, cfg: SyntheticConfig,
                 crowd: bool) -> tuple[np.ndarray, list[dict]]:
    """Draw one image. Returns (HWC uint8 RGB, [dict(label, bbox xywh, area, iscrowd)]) with labels indexing
    `names`; the boxes are those of the visible pixels."""
    w, h = (int(v) for v in rng.integers(cfg.image_size[0], cfg.image_size[1] + 1, 2))
    scene = _Scene(_background(rng, w, h))
    max_size = 0.5 * min(w, h)
    labels: list[int] = []
    crowd_ids: set[int] = set()
    if rng.random() >= cfg.empty_fraction:
        if crowd and rng.random() < cfg.crowd_fraction:  # one crowd region: a cluster under a single box
            c = int(rng.choice(len(names), p=weights))
            region = rng.uniform(0.2, 0.45) * min(w, h)
            rx, ry = rng.uniform(0, w - region), rng.uniform(0, h - region)
            inst = None
            for _ in range(rng.integers(6, 15)):
                m, f = _object(rng, names[c], rng.uniform(region / 5, region / 3))
                x0, y0 = int(rx + rng.uniform(0, region - m.shape[1])), int(ry + rng.uniform(0, region - m.shape[0]))
                got = scene.place(m, f, x0, y0, inst)
                inst = got if got is not None else inst
            if inst is not None:
                labels.append(c)
                crowd_ids.add(inst)
        n = min(cfg.max_objects, 1 + int(rng.poisson(max(cfg.mean_objects - 1, 0))))
        for _ in range(n):
            c = int(rng.choice(len(names), p=weights))
            size = float(np.exp(rng.uniform(np.log(cfg.min_object_size), np.log(max(max_size, cfg.min_object_size)))))
            m, f = _object(rng, names[c], size)
            for _try in range(4):
                x0 = int(rng.uniform(-0.25 * m.shape[1], w - 0.75 * m.shape[1]))
                y0 = int(rng.uniform(-0.25 * m.shape[0], h - 0.75 * m.shape[0]))
                if scene.place(m, f, x0, y0) is not None:
                    labels.append(c)
                    break
    anns = []
    for inst, label in enumerate(labels):
        vis = scene.visible_box(inst)
        if vis is not None:
            anns.append({"label": label, "bbox": vis[0], "area": vis[1], "iscrowd": int(inst in crowd_ids)})
    return scene.canvas, anns


# --------------------------------------------------------------------------------------------------------------
# dataset assembly


def _categories(cfg: SyntheticConfig) -> list[dict]:
    """Category entries in the style's own order and id scheme (see module docstring)."""
    names = class_names(cfg.classes)
    if cfg.style == "coco":
        return [{"id": i + 1 + i // 10, "name": n, "supercategory": n.split("_")[1]} for i, n in enumerate(names)]
    cats: list[dict] = [{"id": i + 1, "name": n} for i, n in enumerate(sorted(names))]
    if cfg.style == "lvis":
        rank = {n: i for i, n in enumerate(names)}
        for c in cats:
            i = rank[c["name"]]
            c["frequency"] = "f" if i < round(0.34 * cfg.classes) else "c" if i < round(0.72 * cfg.classes) else "r"
            c.update(synset=f"{c['name']}.n.01", synonyms=[c["name"]], **{"def": c["name"].replace("_", " ")})
    return cats


def _class_weights(cfg: SyntheticConfig, cats: list[dict]) -> np.ndarray:
    """Sampling probability per class in `class_names` order: uniform, or long-tailed for lvis."""
    names = class_names(cfg.classes)
    if cfg.style != "lvis":
        return np.full(len(names), 1.0 / len(names))
    freq = {c["name"]: c["frequency"] for c in cats}
    w = np.array([{"f": 1.0, "c": 0.25, "r": 0.04}[freq[n]] for n in names])
    return w / w.sum()


def _encode(pixels: np.ndarray, png: bool, quality: int) -> bytes:
    buf = io.BytesIO()
    if png:
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def generate_dataset(out_uri: str, cfg: SyntheticConfig,
                     progress: Callable[[str, int, int], None] | None = None) -> SyntheticDataset:
    """Write `<out>/annotations/instances_<split>.json` and the encoded images of every split in `cfg.splits`.
    Image and annotation ids are unique across splits. `progress(split, done, total)` is called per batch."""
    probe = storage.join(out_uri, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_bytes(probe, b"")
        storage.remove(probe)
    except Exception as e:  # noqa: BLE001 - any transport / permission error becomes one readable line
        raise OSError(f"cannot write to {out_uri!r}: {type(e).__name__}: {e}") from e
    cats = _categories(cfg)
    names = class_names(cfg.classes)
    cat_id = {c["name"]: c["id"] for c in cats}
    weights = _class_weights(cfg, cats)
    image_id, ann_id = 0, 0
    per_split: dict[str, tuple[list[dict], list[dict]]] = {}
    paths: dict[str, SplitPaths] = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        for s, split in enumerate(cfg.splits):
            n = cfg.images if s == 0 else cfg.val_images if cfg.val_images is not None else max(2, cfg.images // 5)
            images: list[dict] = []
            annotations: list[dict] = []
            pending = []
            for index in range(n):
                rng = np.random.default_rng((cfg.seed, zlib.crc32(split.encode()), index))
                pixels, anns = render_image(rng, names, weights, cfg, crowd=cfg.style != "lvis")
                png = bool(rng.random() < cfg.png_fraction)
                image_id += 1
                entry: dict = {"id": image_id, "width": int(pixels.shape[1]), "height": int(pixels.shape[0])}
                ext = "png" if png else "jpg"
                if cfg.style == "o365":
                    rel = f"patch{index // 50}/objects365_v1_{image_id:08d}.{ext}"
                    entry["file_name"] = f"images/v1/{rel}"
                elif cfg.style == "lvis":
                    rel = f"{image_id:012d}.{ext}"
                    entry["coco_url"] = f"http://images.cocodataset.org/{split}/{rel}"
                    entry.update(_lvis_image_fields(rng, anns, len(names), cat_id, names))
                else:
                    rel = f"{image_id:012d}.{ext}"
                    entry.update(file_name=rel, license=0, date_captured="2025-01-01 00:00:00")
                images.append(entry)
                for a in anns:
                    ann_id += 1
                    x, y, bw, bh = a["bbox"]
                    ann = {"id": ann_id, "image_id": image_id, "category_id": cat_id[names[a["label"]]],
                           "bbox": a["bbox"], "area": float(a["area"]),
                           "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]}
                    if cfg.style != "lvis":
                        ann["iscrowd"] = a["iscrowd"]
                    annotations.append(ann)
                data = _encode(pixels, png, cfg.jpeg_quality)
                pending.append(pool.submit(storage.write_bytes, storage.join(out_uri, "images", split, rel), data))
                if len(pending) >= 64 or index == n - 1:
                    for fut in pending:
                        fut.result()
                    pending = []
                    if progress:
                        progress(split, index + 1, n)
            per_split[split] = images, annotations
            paths[split] = SplitPaths(
                annotations=storage.join(out_uri, "annotations", f"instances_{split}.json"),
                images=storage.join(out_uri, "images", *([] if cfg.style == "lvis" else [split])),
            )
    if cfg.style == "lvis":  # LVIS counts come from its training split (here: the first split)
        images, annotations = per_split[cfg.splits[0]]
        for c in cats:
            mine = [a["image_id"] for a in annotations if a["category_id"] == c["id"]]
            c.update(image_count=len(set(mine)), instance_count=len(mine))
    for split, (images, annotations) in per_split.items():
        doc = {"info": {"description": f"synthetic-{cfg.style}", "version": "1.0", "year": 2025,
                        "contributor": "pipeline.data.synthetic", "seed": cfg.seed, "split": split},
               "licenses": [{"id": 0, "name": "CC0", "url": ""}], "images": images,
               "annotations": annotations, "categories": cats}
        storage.write_bytes(paths[split].annotations, json.dumps(doc, separators=(",", ":")).encode())
    return SyntheticDataset(root=out_uri, categories=cats, splits=paths)


def _lvis_image_fields(rng: np.random.Generator, anns: list[dict], num_classes: int, cat_id: dict[str, int],
                       names: list[str]) -> dict:
    """LVIS per-image lists. Mutates `anns`: for a not-exhaustive class one drawn instance loses its box."""
    present = sorted({a["label"] for a in anns})
    not_exhaustive = []
    multi = [c for c in present if sum(a["label"] == c for a in anns) >= 2]
    if multi and rng.random() < 0.15:
        c = multi[int(rng.integers(len(multi)))]
        anns.remove(next(a for a in reversed(anns) if a["label"] == c))
        not_exhaustive.append(cat_id[names[c]])
    absent = [c for c in range(num_classes) if c not in present]
    k = min(len(absent), int(rng.integers(0, 4)))
    neg = sorted(cat_id[names[c]] for c in rng.choice(absent, size=k, replace=False)) if k else []
    return {"neg_category_ids": neg, "not_exhaustive_category_ids": not_exhaustive,
            "flickr_url": "", "date_captured": "2025-01-01 00:00:00"}
