"""The Ray Data loader on a tiny shard set (written here with pyarrow, following the shard contract):
batches, masks and targets; same augmentation as the non-Ray ShardDataset; a new augmentation every epoch (the
training stream's epochs);
eval keeps crowd boxes; streaming_split; shards on S3 (moto server)."""

from __future__ import annotations

import io
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import storage
from pipeline.data.config import TINY_AUGMENT, DataConfig
from pipeline.data.loader import ShardDataset, build_dataset, iter_batches, shard_files, table_to_samples
from pipeline.data.stream import TrainStream, scan_chunks

SHARD_SCHEMA = pa.schema([  # ARCHITECTURE.md "Contracts others rely on"
    ("image_id", pa.int64()), ("file_name", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("image", pa.binary()), ("boxes", pa.list_(pa.list_(pa.float32()))), ("labels", pa.list_(pa.int32())),
    ("iscrowd", pa.list_(pa.int8())),
])

# image_id: (h, w, boxes xywh, labels, iscrowd)
IMAGES = {
    11: (60, 90, [[5, 5, 30, 20], [40, 30, 45, 25]], [0, 2], [0, 0]),
    12: (80, 64, [], [], []),                                   # no boxes
    13: (72, 96, [[10, 10, 20, 20], [0, 0, 96, 72]], [1, 0], [0, 1]),  # one crowd box
    14: (64, 64, [[1.5, 2.25, 10.75, 8.5]], [2], [0]),
    15: (90, 70, [[20, 30, 40, 50]], [1], [0]),
    16: (64, 100, [[0, 0, 100, 64], [50, 10, 5, 5]], [0, 1], [0, 0]),
}


def encode(h: int, w: int, seed: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def shard_bytes(ids: list[int]) -> bytes:
    rows = {name: [] for name in SHARD_SCHEMA.names}
    for i in ids:
        h, w, boxes, labels, crowd = IMAGES[i]
        for key, value in (("image_id", i), ("file_name", f"{i:012d}.jpg"), ("width", w), ("height", h),
                           ("image", encode(h, w, i, "PNG" if i % 2 else "JPEG")), ("boxes", boxes),
                           ("labels", labels), ("iscrowd", crowd)):
            rows[key].append(value)
    buf = io.BytesIO()
    pq.write_table(pa.table(rows, schema=SHARD_SCHEMA), buf)
    return buf.getvalue()


def write_shards(root: str) -> None:
    storage.write_bytes(storage.join(root, "train", "part-00000.parquet"), shard_bytes([11, 12, 13]))
    storage.write_bytes(storage.join(root, "train", "part-00001.parquet"), shard_bytes([14, 15, 16]))
    storage.write_json(storage.join(root, "manifest.json"), {
        "dataset": "tiny", "splits": {"train": {"images": 6}},
        "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}, {"id": 7, "name": "c"}]})


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("shards"))
    write_shards(root)
    return root


def config(root: str, **kw) -> DataConfig:
    return DataConfig(shards=root, batch_size=2, num_workers=2, map_batch_size=2, augment=TINY_AUGMENT,
                      eval_size=(64, 128), **kw)


def rows_by_id(ds) -> dict[int, tuple[np.ndarray, dict]]:
    """One pass over a Dataset of augmented rows -> {image_id: (uint8 image, target)}."""
    out = {}
    for table in ds.iter_batches(batch_size=4, batch_format="pyarrow"):
        for image, target in zip(*table_to_samples(table)):
            assert target["image_id"] not in out
            out[target["image_id"]] = (image, target)
    return out


def same_sample(a: tuple[np.ndarray, dict], b: tuple[torch.Tensor, dict]) -> bool:
    return (a[0].shape == tuple(b[0].shape) and np.array_equal(a[0], b[0].numpy())
            and torch.equal(a[1]["boxes"], b[1]["boxes"]) and torch.equal(a[1]["labels"], b[1]["labels"]))


def test_shard_files_errors(tmp_path):
    with pytest.raises(ValueError, match="data.shards is empty"):
        shard_files(DataConfig(), "train")
    with pytest.raises(FileNotFoundError, match="no shards at"):
        shard_files(DataConfig(shards=str(tmp_path)), "train")


def test_train_rows_match_shard_dataset_and_change_per_epoch(ray_local, shards):
    cfg = config(shards)
    ds = build_dataset(cfg, "train", train=True)
    local = ShardDataset(cfg, "train", train=True)
    by_index = {local.row(i)["image_id"]: i for i in range(len(local))}

    epoch0 = rows_by_id(ds)                       # first execution: epoch 0
    assert sorted(epoch0) == sorted(IMAGES)
    for image_id, sample in epoch0.items():
        assert same_sample(sample, local[by_index[image_id]]), image_id
    assert epoch0[12][1]["boxes"].shape == (0, 4)  # the image without boxes is a valid sample
    assert 1 not in epoch0[13][1]["iscrowd"].tolist()  # crowd boxes are out of training targets

    # a training worker's stream over epochs 0 and 1 (one Ray Data execution): each epoch is the ShardDataset's
    stream = TrainStream(cfg, scan_chunks(shard_files(cfg, "train")), rank=0, world=1, batch=2, first_epoch=0,
                         epochs=2)
    streamed = {}
    for e in (0, 1):
        ids = [t["image_id"] for b in stream.batches(e) for t in b.targets]
        assert sorted(ids) == sorted(IMAGES), e
    stream.close()
    epoch1 = rows_by_id(build_dataset(cfg, "train", train=True, epoch_seed=1))  # one pass of epoch 1
    local.set_epoch(1)
    for image_id, sample in epoch1.items():
        assert same_sample(sample, local[by_index[image_id]]), image_id
    assert any(not same_sample(epoch0[i], (torch.from_numpy(epoch1[i][0].copy()), epoch1[i][1]))
               for i in IMAGES)

    # the stream's epoch-1 images are the same augmented samples (the epoch comes from the plan, not from Ray)
    stream = TrainStream(cfg, scan_chunks(shard_files(cfg, "train")), rank=0, world=1, batch=1, first_epoch=1,
                         epochs=2)
    for b in stream.batches(1):
        streamed[b.targets[0]["image_id"]] = b
    stream.close()
    assert sorted(streamed) == sorted(IMAGES)
    for image_id, b in streamed.items():
        h, w = b.targets[0]["size"].tolist()
        image, target = epoch1[image_id]
        assert (h, w) == image.shape[-2:] and torch.equal(b.targets[0]["boxes"], target["boxes"])


def test_iter_batches_pads_masks_and_targets(ray_local, shards):
    cfg = config(shards)
    batches = list(iter_batches(build_dataset(cfg, "train", train=True), 4, "cpu", shuffle_buffer=4,
                                shuffle_seed=0))
    assert sorted(t["image_id"] for b in batches for t in b.targets) == sorted(IMAGES)
    assert [len(b) for b in batches] == [4, 2]
    for b in batches:
        bsz, _, height, width = b.images.shape
        assert b.images.dtype == torch.float32 and b.masks.shape == (bsz, height, width)
        for i, t in enumerate(b.targets):
            h, w = t["size"].tolist()
            assert not b.masks[i, :h, :w].any() and b.masks[i].sum() == height * width - h * w
            assert (b.images[i][:, b.masks[i]] == 0).all()           # 0 in the padding after normalisation
            assert b.images[i, :, :h, :w].abs().max() < 3            # ImageNet-normalised pixels
            assert t["boxes"].dtype == torch.float32 and ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
            assert t["labels"].dtype == torch.int64 and len(t["labels"]) == len(t["boxes"])
            assert t["orig_size"].tolist() == list(IMAGES[t["image_id"]][:2])


def test_eval_rows_keep_crowd_and_use_eval_size(ray_local, shards):
    rows = rows_by_id(build_dataset(config(shards), "train", train=False))
    assert sorted(rows) == sorted(IMAGES)
    for image_id, (image, t) in rows.items():
        h, w, boxes, labels, crowd = IMAGES[image_id]
        assert min(image.shape[-2:]) == 64 and t["iscrowd"].tolist() == crowd
        # eval boxes mapped back to source pixels through scale_factor
        size = t["size"].double()
        cx, cy, bw, bh = (t["boxes"].double() * torch.stack([size[1], size[0]] * 2)).unbind(-1)
        sx, sy = t["scale_factor"].double().tolist()
        back = torch.stack([(cx - bw / 2) / sx, (cy - bh / 2) / sy, bw / sx, bh / sy], -1)
        torch.testing.assert_close(back, torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4), atol=1e-3,
                                   rtol=0)


def test_streaming_split_covers_every_image_once(ray_local, shards):
    ds = build_dataset(config(shards), "train", train=True)
    seen: list[list[int]] = [[], []]

    def consume(rank: int, it) -> None:
        for b in iter_batches(it, 1, "cpu"):
            seen[rank] += [t["image_id"] for t in b.targets]

    threads = [threading.Thread(target=consume, args=(r, it)) for r, it in
               enumerate(ds.streaming_split(2, equal=True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(seen[0]) == len(seen[1]) == 3 and sorted(seen[0] + seen[1]) == sorted(IMAGES)


def test_shards_on_s3(ray_local, s3_bucket):
    root = storage.join(s3_bucket, "tiny")
    write_shards(root)
    rows = rows_by_id(build_dataset(config(root), "train", train=False))
    assert sorted(rows) == sorted(IMAGES)
    assert len(ShardDataset(config(root), "train", train=False)) == len(IMAGES)


def test_train_stream_two_workers_resume_reads_only_the_rest(ray_local, shards):
    """Two workers' streams over two epochs: equal counts, each epoch every image once (6 = 2 x 3); a checkpoint
    after one batch each and a resume with one worker: the resumed stream's plan holds only the 4 other images
    (nothing skipped is read), and epoch 1 is complete again."""
    cfg = config(shards)
    chunks = scan_chunks(shard_files(cfg, "train"))
    streams = [TrainStream(cfg, chunks, rank=r, world=2, batch=1, first_epoch=0, epochs=2) for r in range(2)]
    assert [s.batches_in(0) for s in streams] == [3, 3]
    its = [s.batches(0) for s in streams]
    first = [next(it).targets[0]["image_id"] for it in its]  # one step of batch 1 on each worker
    position = streams[0].position(0, rows_done=1)
    assert position == streams[1].position(0, rows_done=1)  # no communication needed
    rest0 = [t["image_id"] for it in its for b in it for t in b.targets]
    assert sorted(first + rest0) == sorted(IMAGES)
    epoch1 = [t["image_id"] for s in streams for b in s.batches(1) for t in b.targets]
    assert sorted(epoch1) == sorted(IMAGES)
    for s in streams:
        s.close()

    resumed = TrainStream(cfg, chunks, rank=0, world=1, batch=1, first_epoch=0, epochs=2,
                          consumed=position["consumed"])
    assert int((resumed.pieces[resumed.pieces[:, 0] == 0, 3] - resumed.pieces[resumed.pieces[:, 0] == 0, 2]).sum()) == 4
    again = [t["image_id"] for b in resumed.batches(0) for t in b.targets]
    assert sorted(again) == sorted(rest0) and not set(again) & set(first)
    assert sorted(t["image_id"] for b in resumed.batches(1) for t in b.targets) == sorted(IMAGES)
    resumed.close()
