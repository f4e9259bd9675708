"""Host syncs of a training step: the CPU-side counter, the query head's budget, and the sync-free rewrites
(batched Hungarian matching, mask-based QFL / GIoU, the vectorised denoising mask) against loop references.

The budget test runs one K=0 micro-step of a tiny Co-DINO (resnet10t, 50 queries, 64x96, batch 2) through
`backward_micro_batch` under `HostSyncCounter`: the query head, matcher, denoising and losses may sync once (the
matcher's single `.cpu()` of all cost matrices). Before issue 16 they synced 59 times per step (bench/host_syncs.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from pipeline.models.losses import giou_loss, quality_focal_loss
from pipeline.models.query_head.denoising import CdnQueryGenerator
from pipeline.models.query_head.matcher import HungarianMatcher, MatchProblem
from pipeline.train.host_syncs import HostSyncCounter

ROOT = Path(__file__).resolve().parents[1]
OWN_BUDGET = 1  # the matcher's one device->host copy per step


def _bench():
    spec = importlib.util.spec_from_file_location("host_syncs_bench", ROOT / "bench" / "host_syncs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counter_counts_sites_and_restores_torch():
    from pipeline.dist import all_agree

    original_item, original_bool = torch.Tensor.item, torch.Tensor.__bool__
    x = torch.arange(6.0)
    with HostSyncCounter() as syncs:
        x.sum().item()
        float(x[0])
        y = x[x > 2]  # bool-mask indexing: data-dependent shape
        x[x > 2] = 0.0  # masked_fill: no sync
        torch.where(x > 1, x, 0.0)  # three-argument where: no sync
        assert all_agree(torch.tensor(True))  # bool() of a tensor inside pipeline/dist.py
        host = x.cpu()
        host.numpy()  # numpy() of a counted .cpu() result is not counted again
    assert y.shape == (3,)
    kinds = {}
    for (_site, kind), n in syncs.by_site().items():
        kinds[kind] = kinds.get(kind, 0) + n
    assert kinds == {"item": 1, "float": 1, "getitem[bool mask]": 1, "bool": 1, "cpu": 1}, syncs.table()
    dist_sites = [site for (site, kind) in syncs.counts if site.startswith("pipeline/dist.py:")]
    assert dist_sites and syncs.total_under("pipeline/dist.py") == 1
    assert torch.Tensor.item is original_item and torch.Tensor.__bool__ is original_bool
    assert "item" not in torch.Tensor.__dict__


def test_query_head_syncs_once_per_training_step():
    bench = _bench()
    overrides = ["model.backbone.name=resnet10t", "model.transformer.num_queries=50", "model.transformer.ffn_dim=128",
                 "model.dn.num_dn_queries=10", "model.test.topk=50", "model.test.max_per_img=50"]  # fmt: skip
    device = torch.device("cpu")
    model, nc = bench.build("[]", str(ROOT / "configs/model/co_dino_tiny.yaml"), overrides, device)
    syncs, _ = bench.count_step(model, bench.make_batch((64, 96), nc, device), device)
    own = {k: n for k, n in syncs.by_site().items() if k[0].startswith(bench.OWN_FILES)}
    assert sum(own.values()) <= OWN_BUDGET, syncs.table()
    cpu_copies = [n for (site, kind), n in own.items() if kind == "cpu" and "matcher.py" in site]
    assert cpu_copies == [1], syncs.table()  # all decoder layers + encoder proposals in one copy


def _problem(layers: int, b: int, q: int, nc: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, b, q, nc, generator=g) * 2
    boxes = torch.rand(layers, b, q, 4, generator=g) * 0.5 + 0.2
    return logits, boxes


def test_match_many_equals_one_solve_per_layer_and_image():
    m = HungarianMatcher()
    counts, nc = [3, 0, 6], 7
    g = torch.Generator().manual_seed(5)
    gt_labels = [torch.randint(0, nc, (n,), generator=g) for n in counts]
    gt_boxes = [torch.rand(n, 4, generator=g) * 0.4 + 0.3 for n in counts]
    sizes = torch.tensor([[480, 640], [320, 320], [200, 500]])
    dec = _problem(3, 3, 9, nc, seed=1)
    enc = _problem(1, 3, 4, nc, seed=2)  # fewer queries than GT in image 2: K = min(Q, N)
    binary = [torch.zeros_like(lab) for lab in gt_labels]
    results = m.match_many([MatchProblem(*dec, gt_labels), MatchProblem(*enc, binary)], gt_boxes, sizes)
    starts = np.cumsum([0, *counts])
    for (logits, boxes), labels, got in zip((dec, enc), (gt_labels, binary), results):
        expected = []
        for layer in range(logits.shape[0]):
            for i, n in enumerate(counts):
                if n == 0:
                    continue
                cost = m.cost_matrix(
                    logits[layer, i], boxes[layer, i], labels[i], gt_boxes[i], tuple(sizes[i].tolist())
                )
                rows, cols = linear_sum_assignment(cost.numpy())
                expected += [(layer, i, r, c + starts[i]) for r, c in zip(rows, cols)]
        pairs = list(zip(got.layer.tolist(), got.image.tolist(), got.query.tolist(), got.gt.tolist()))
        assert pairs == expected
    assert len(results[1].query) == 3 + 4  # image 0: 3 GT, image 2: 4 queries for 6 GT
    with pytest.raises(ValueError, match="NaN/inf"):
        bad = dec[0].clone()
        bad[0, 0, 0, 0] = float("nan")
        m.match_many([MatchProblem(bad, dec[1], gt_labels)], gt_boxes, sizes)


def _qfl_reference(logits, labels, scores, beta=2.0):
    """The pre-issue-16 implementation (nonzero + index_put)."""
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * prob.pow(beta)
    pos = ((labels >= 0) & (labels < logits.shape[1])).nonzero().squeeze(1)
    if pos.numel() > 0:
        pl = labels[pos].long()
        scale = (scores[pos] - prob[pos, pl]).abs().pow(beta)
        pos_loss = F.binary_cross_entropy_with_logits(logits[pos, pl], scores[pos], reduction="none") * scale
        loss = loss.index_put((pos, pl), pos_loss)
    return loss.sum(dim=1)


@pytest.mark.parametrize("num_pos", [0, 4, 12])
def test_mask_based_qfl_equals_the_nonzero_version(num_pos):
    g = torch.Generator().manual_seed(num_pos)
    n, c = 12, 5
    logits = (torch.randn(n, c, generator=g) * 3).requires_grad_(True)
    labels = torch.full((n,), c)
    labels[:num_pos] = torch.randint(0, c, (num_pos,), generator=g)
    scores = torch.rand(n, generator=g) * (labels < c)
    ours = quality_focal_loss(logits, labels, scores)
    ref = _qfl_reference(logits, labels, scores)
    assert torch.equal(ours, ref)
    (grad,) = torch.autograd.grad(ours.sum(), logits)
    (ref_grad,) = torch.autograd.grad(ref.sum(), logits)
    assert torch.allclose(grad, ref_grad, atol=1e-7)


def test_giou_loss_without_positive_weights_keeps_the_mmdet_fallback():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 4.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0, 2.0, 1.0], [1.0, 1.0, 2.0, 2.0]])
    zero = giou_loss(pred, target, torch.zeros(2, 4), avg_factor=torch.tensor(1.0))
    assert zero.item() == 0.0 and zero.requires_grad
    one = giou_loss(pred, target, torch.tensor([[1.0] * 4, [0.0] * 4]), avg_factor=torch.tensor(1.0))
    assert one.item() == pytest.approx(0.5, abs=1e-6)  # IoU 2/4, enclosing = union


def test_denoising_mask_equals_the_group_loop():
    def loop_mask(max_gt: int, groups: int, queries: int) -> torch.Tensor:
        pad = 2 * max_gt * groups
        mask = torch.zeros(pad + queries, pad + queries, dtype=torch.bool)
        mask[pad:, :pad] = True
        for grp in range(groups):
            rows = slice(2 * max_gt * grp, 2 * max_gt * (grp + 1))
            mask[rows, : 2 * max_gt * grp] = True
            mask[rows, 2 * max_gt * (grp + 1) : pad] = True
        return mask

    for queries in (0, 7):
        gen = CdnQueryGenerator(num_classes=3, embed_dims=8, num_matching_queries=queries, num_dn_queries=10)
        for max_gt in (0, 1, 3, 11):
            groups = gen.num_groups(max_gt)
            got = gen.attention_mask(max_gt, groups, torch.device("cpu"))
            assert torch.equal(got, loop_mask(max_gt, groups, queries)), (queries, max_gt)
