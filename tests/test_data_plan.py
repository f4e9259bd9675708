"""Epoch plans (pipeline/data/plan.py) against a plain list reference: every worker's rows, resumes at any
position and world size, exactly once; and no private Ray attribute anywhere in pipeline/data/."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from pipeline.data.plan import ChunkTable, EpochPlan, complement, merge, row_order, sub_range

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def table(rows: list[int], files: int = 3) -> ChunkTable:
    n = len(rows)
    return ChunkTable(tuple(f"s3://b/train/part-{i:05d}.parquet" for i in range(files)),
                      np.arange(n) % files, np.arange(n) // files, np.asarray(rows))


def sequence(plan: EpochPlan) -> list[tuple[int, int]]:
    """The reference: the epoch's rows as (chunk, row) in reading order, built with plain lists."""
    out = []
    for k in plan.order.tolist():
        rows = int(plan.chunks.rows[k])
        order = row_order(rows, seed=plan.seed, epoch=plan.epoch, chunk=k, shuffle=plan.shuffle)
        out += [(k, int(r)) for r in order]
    return out


def rows_of(plan: EpochPlan, share) -> list[tuple[int, int]]:
    """What a worker reads for `share`: its pieces resolved to (chunk, row)."""
    out = []
    for chunk, lo, hi in plan.pieces(share).tolist():
        order = row_order(int(plan.chunks.rows[chunk]), seed=plan.seed, epoch=plan.epoch, chunk=chunk,
                          shuffle=plan.shuffle)
        out += [(chunk, int(r)) for r in order[lo:hi]]
    return out


def test_interval_helpers():
    assert merge([(5, 7), (0, 2), (2, 3), (6, 9), (4, 4)]) == [(0, 3), (5, 9)]
    assert complement([(0, 3), (5, 9)], 12) == [(3, 5), (9, 12)]
    assert complement([], 4) == [(0, 4)] and complement([(0, 4)], 4) == []
    assert sub_range([(0, 3), (10, 14)], 2, 3) == [(2, 3), (10, 12)]
    assert sub_range([(0, 3), (10, 14)], 5, 10) == [(12, 14)]


def test_order_depends_on_seed_and_epoch_only():
    t = table([7, 5, 9, 3, 8])
    a, b = EpochPlan(t, 0, 1, True), EpochPlan(t, 0, 1, True)
    assert sequence(a) == sequence(b)
    assert sequence(a) != sequence(EpochPlan(t, 0, 2, True)) != sequence(EpochPlan(t, 1, 1, True))
    assert sorted(sequence(a)) == [(k, r) for k in range(5) for r in range(int(t.rows[k]))]  # a permutation
    assert sequence(EpochPlan(t, 0, 1, False)) == [(k, r) for k in range(5) for r in range(int(t.rows[k]))]


@pytest.mark.parametrize("world,batch", [(1, 1), (1, 4), (2, 2), (3, 2), (4, 3)])
def test_worker_slices_are_equal_disjoint_contiguous_and_drop_less_than_a_round(world, batch):
    plan = EpochPlan(table([7, 5, 9, 3, 8, 6]), 3, 0, True)
    ref = sequence(plan)
    per = plan.rows_per_rank([], world, batch)
    assert per % batch == 0 and 0 <= plan.total - world * per < world * batch
    got = [rows_of(plan, plan.rank_share([], r, world, batch)) for r in range(world)]
    for r, rows in enumerate(got):
        assert rows == ref[r * per:(r + 1) * per]  # worker r: the r-th contiguous slice, in the epoch's order
    flat = [x for rows in got for x in rows]
    assert len(flat) == len(set(flat)) == world * per


@pytest.mark.parametrize("w1,w2,batch,steps", [(2, 2, 2, 3), (2, 3, 2, 2), (4, 1, 1, 5), (1, 2, 3, 4), (3, 2, 2, 0)])
def test_resume_reads_exactly_the_rest(w1, w2, batch, steps):
    """A run of w1 workers trains `steps` batches each, checkpoints, and resumes with w2 workers: together they
    train no row twice, and the resumed run reads only rows the first did not train."""
    plan = EpochPlan(table([7, 5, 9, 3, 8, 6, 11]), 0, 4, True)
    first = [rows_of(plan, plan.rank_share([], r, w1, batch))[:steps * batch] for r in range(w1)]
    consumed = plan.advance([], w1, batch, steps * batch)
    trained = [x for rows in first for x in rows]
    assert sorted(rows_of(plan, consumed)) == sorted(trained)  # the position names exactly the trained rows
    assert len(consumed) <= w1  # a few integers, not a list of ids
    second = [x for r in range(w2) for x in rows_of(plan, plan.rank_share(consumed, r, w2, batch))]
    assert not set(second) & set(trained) and len(second) == len(set(second))
    left = plan.total - len(trained)
    assert len(second) == w2 * (left // w2 // batch * batch)
    # and a second resume of the resumed run: still disjoint
    consumed2 = plan.advance(consumed, w2, batch, plan.rows_per_rank(consumed, w2, batch) // 2 // batch * batch)
    third = [x for r in range(w1) for x in rows_of(plan, plan.rank_share(consumed2, r, w1, batch))]
    assert not set(third) & set(rows_of(plan, consumed2))


def test_advance_rejects_more_rows_than_a_slice():
    plan = EpochPlan(table([4, 4]), 0, 0, True)
    with pytest.raises(ValueError, match="rows_per_rank=6 outside 0..4"):
        plan.advance([], 2, 2, 6)


def test_fingerprint_and_round_trip():
    t = table([7, 5, 9])
    assert ChunkTable.from_dict(t.to_dict()).fingerprint() == t.fingerprint()
    assert table([7, 5, 8]).fingerprint() != t.fingerprint()


def test_no_private_ray_attributes_in_data_package():
    """The data plane uses Ray's public API only: no `_`-prefixed attribute of a Ray object or module, no Ray
    internals import, no process-wide DataContext flag."""
    bad = []
    data_dir = os.path.join(REPO, "pipeline", "data")
    for root, _, files in os.walk(data_dir):
        for name in files:
            if not name.endswith(".py"):
                continue
            with open(os.path.join(root, name)) as f:
                text = f.read()
            for pattern in (r"ray[\w.]*\._\w", r"_execution_idx", r"use_datasource_v2",
                            r"DataContext\.get_current\(\)\.\w+\s*="):
                bad += [f"{name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not bad, bad
