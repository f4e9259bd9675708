"""Synthetic COCO-format data: determinism, box sanity, the difficulties it promises, the three styles."""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.data.synthetic import COLOURS, SHAPES, TEXTURES, SyntheticConfig, class_names, generate_dataset


def _load(root, split="train"):
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "rb") as f:
        return json.loads(f.read())


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out


def test_class_names_stable_and_shared():
    c80, c365 = class_names(80), class_names(365)
    assert c365[:80] == c80 and len(set(c365)) == 365  # a 365-class set contains every 80-class name
    assert class_names(2) == ["red_circle", "green_square"]
    first = [n.split("_") for n in class_names(12)]
    assert len({s for _, s in first}) == 12 and len({c for c, _ in first}) == 12  # both cues differ
    assert all(len(n.split("_")) == 2 for n in class_names(144))  # solid fill before any texture
    assert len(set(class_names(1203))) == 1203 and class_names(1203)[:576] == class_names(576)  # LVIS-size
    with pytest.raises(ValueError, match=f"classes must be in 1..{len(SHAPES) * len(COLOURS) * len(TEXTURES)}"):
        class_names(len(SHAPES) * len(COLOURS) * len(TEXTURES) + 1)


def test_config_errors():
    with pytest.raises(ValueError, match="style must be one of"):
        SyntheticConfig(style="voc")
    with pytest.raises(ValueError, match="image_size"):
        SyntheticConfig(image_size=(300, 200))


def test_same_seed_same_bytes(tmp_path):
    cfg = SyntheticConfig(images=6, val_images=2, classes=4, seed=3)
    generate_dataset(str(tmp_path / "a"), cfg)
    generate_dataset(f"file://{tmp_path}/b", cfg)
    generate_dataset(str(tmp_path / "c"), SyntheticConfig(images=6, val_images=2, classes=4, seed=4))
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 2 + 8 and a == b
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]


def test_boxes_and_difficulties(tmp_path):
    cfg = SyntheticConfig(images=48, val_images=4, classes=6, seed=0, empty_fraction=0.15, crowd_fraction=0.4)
    ds = generate_dataset(str(tmp_path), cfg)
    doc = _load(tmp_path)
    ids = [c["id"] for c in doc["categories"]]
    assert [c["name"] for c in doc["categories"]] == class_names(6)
    assert ids == [1, 2, 3, 4, 5, 6]
    assert [c["id"] for c in generate_dataset(str(tmp_path / "x"), SyntheticConfig(images=1, classes=12)).categories
            ][9:] == [10, 12, 13]  # COCO-like gaps in category ids
    images = {im["id"]: im for im in doc["images"]}
    val_ids = {im["id"] for im in _load(tmp_path, "val")["images"]}
    assert len(images) == 48 and not val_ids & set(images)  # image ids unique across splits
    by_image: dict[int, list] = {i: [] for i in images}
    for a in doc["annotations"]:
        by_image[a["image_id"]].append(a)
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= im["width"] and y + h <= im["height"]
        assert 0 < a["area"] <= w * h and a["category_id"] in ids
    sizes = [max(a["bbox"][2:]) for a in doc["annotations"] if not a["iscrowd"]]
    assert min(sizes) <= 12 and max(sizes) >= 100  # ~8 px up to half the image
    assert sum(not v for v in by_image.values()) >= 3  # images without objects
    assert sum(a["iscrowd"] for a in doc["annotations"]) >= 3
    assert max(len(v) for v in by_image.values()) >= 6
    shapes = {(im["width"], im["height"]) for im in images.values()}
    assert len(shapes) > 20 and min(w / h for w, h in shapes) < 0.8 < 1.25 < max(w / h for w, h in shapes)
    exts = {os.path.splitext(im["file_name"])[1] for im in images.values()}
    assert exts == {".jpg", ".png"}
    # pixels agree with labels: a box's visible object shows the class colour
    names = {c["id"]: c["name"] for c in doc["categories"]}
    agree = total = 0
    for im in images.values():
        pix = np.asarray(Image.open(os.path.join(ds.splits["train"].images, im["file_name"])).convert("RGB"))
        assert pix.shape[:2] == (im["height"], im["width"])
        for a in by_image[im["id"]]:
            x, y, w, h = (int(v) for v in a["bbox"])
            if a["iscrowd"] or max(w, h) < 12:
                continue
            colour = np.array(COLOURS[names[a["category_id"]].split("_")[0]], np.float32)
            near = np.linalg.norm(pix[y:y + h, x:x + w].astype(np.float32) - colour, axis=-1) < 60
            agree += near.mean() > 0.2
            total += 1
    assert total > 50 and agree / total > 0.95


def test_o365_style_layout(tmp_path):
    ds = generate_dataset(str(tmp_path), SyntheticConfig(images=55, val_images=2, classes=7, style="o365"))
    doc = _load(tmp_path)
    assert [c["name"] for c in doc["categories"]] == sorted(class_names(7))  # another label order than coco
    assert [c["id"] for c in doc["categories"]] == list(range(1, 8))
    patches = set()
    for im in doc["images"]:
        m = re.fullmatch(r"images/v1/(patch\d+)/objects365_v1_\d{8}\.(jpg|png)", im["file_name"])
        assert m, im["file_name"]
        patches.add(m.group(1))
        assert os.path.exists(os.path.join(ds.splits["train"].images, im["file_name"].split("/", 2)[2]))
    assert patches == {"patch0", "patch1"}


def test_lvis_style_fields(tmp_path):
    cfg = SyntheticConfig(images=80, val_images=3, classes=10, style="lvis", seed=1)
    ds = generate_dataset(str(tmp_path), cfg)
    assert ds.splits["train"].images == os.path.join(str(tmp_path), "images")
    doc = _load(tmp_path)
    cats = {c["id"]: c for c in doc["categories"]}
    assert {c["frequency"] for c in cats.values()} == {"r", "c", "f"}
    for c in cats.values():
        mine = [a for a in doc["annotations"] if a["category_id"] == c["id"]]
        assert c["instance_count"] == len(mine) and c["image_count"] == len({a["image_id"] for a in mine})

    def mean_count(f):
        return np.mean([c["instance_count"] for c in cats.values() if c["frequency"] == f])

    assert mean_count("f") > 2 * mean_count("c") > 2 * mean_count("r")  # long tail
    assert all("iscrowd" not in a for a in doc["annotations"])
    n_neg = n_nex = 0
    for im in doc["images"]:
        assert "file_name" not in im
        split, name = im["coco_url"].split("/")[-2:]
        assert split == "train" and os.path.exists(os.path.join(str(tmp_path), "images", split, name))
        present = {a["category_id"] for a in doc["annotations"] if a["image_id"] == im["id"]}
        assert not set(im["neg_category_ids"]) & present and set(im["neg_category_ids"]) <= set(cats)
        assert set(im["not_exhaustive_category_ids"]) <= present
        n_neg += bool(im["neg_category_ids"])
        n_nex += bool(im["not_exhaustive_category_ids"])
    assert n_neg > 20 and n_nex >= 2


def test_png_and_jpeg_decode(tmp_path):
    ds = generate_dataset(str(tmp_path), SyntheticConfig(images=30, val_images=0, classes=3, png_fraction=0.5))
    formats = set()
    for im in _load(tmp_path)["images"]:
        with open(os.path.join(ds.splits["train"].images, im["file_name"]), "rb") as f:
            img = Image.open(io.BytesIO(f.read()))
            formats.add(img.format)
            assert img.size == (im["width"], im["height"])
    assert formats == {"JPEG", "PNG"}
