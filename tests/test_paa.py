"""PAA auxiliary head: the batched GMM against scikit-learn's GaussianMixture, the batched probabilistic anchor
assignment against mmdet's per-GT loop (with sklearn), and the head's losses, gradients and exported positives."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.mixture import GaussianMixture

from pipeline.models.aux_heads.paa import PAAHead
from pipeline.models.aux_heads.table import PAAConfig
from pipeline.models.task_modules.gmm import fit_predict_gmm2
from pipeline.models.task_modules.paa_assigner import paa_positives

SIZES = [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]  # a 96 x 128 batch, strides 8..128
STRIDES = (8, 16, 32, 64, 128)
C, NC = 32, 3


def _sklearn_gmm(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mmdet PAAHead.paa_reassign's GMM: init (0.5, 0.5), means (min, max), precisions 1, diag."""
    x = values.reshape(-1, 1)
    gmm = GaussianMixture(2, weights_init=np.array([0.5, 0.5]), means_init=np.array([[x.min()], [x.max()]]),
                          precisions_init=np.ones((2, 1)), covariance_type="diag")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on some rows, as in mmdet
        gmm.fit(x)
    return gmm.predict(x), gmm.score_samples(x)


def test_gmm_equals_sklearn_gaussian_mixture():
    rng = np.random.default_rng(0)
    m_max, rows, masks = 40, [], []
    for _ in range(120):
        m = int(rng.integers(2, m_max + 1))
        v = np.sort(np.concatenate([rng.normal(0.3, 0.1, m), rng.gamma(2.0, 1.0, m)])[rng.permutation(2 * m)[:m]])
        rows.append(np.pad(v * rng.uniform(0.5, 5.0), (0, m_max - m)))
        masks.append(np.arange(m_max) < m)
    x, valid = torch.tensor(np.array(rows)), torch.tensor(np.array(masks))
    comp, score = fit_predict_gmm2(x, valid)
    both = 0
    for i in range(len(rows)):
        m = int(valid[i].sum())
        ref_comp, ref_score = _sklearn_gmm(x[i, :m].numpy())
        assert np.array_equal(comp[i, :m].numpy(), ref_comp), i
        np.testing.assert_allclose(score[i, :m].numpy(), ref_score, rtol=0, atol=1e-6)
        both += int(0 < ref_comp.sum() < m)
    assert both > 60  # most rows really split in two


def _loop_paa(scores, gt_inds, num_level, topk=9):
    """mmdet PAAHead.paa_reassign for one image, loop for loop: per GT, per level top-k lowest scores, sort, GMM
    (sklearn), the foreground candidates up to the one of highest density."""
    pos_inds = torch.nonzero(gt_inds > 0).squeeze(1)
    pos_gt = gt_inds[pos_inds] - 1
    bounds = np.cumsum([0] + list(num_level))
    kept = []
    for g in range(int(pos_gt.max()) + 1 if len(pos_inds) else 0):
        cand, vals = [], []
        for lvl in range(len(num_level)):
            mask = (pos_gt == g) & (pos_inds >= int(bounds[lvl])) & (pos_inds < int(bounds[lvl + 1]))
            v, i = scores[pos_inds[mask]].topk(min(int(mask.sum()), topk), largest=False)
            cand.append(pos_inds[mask][i])
            vals.append(v)
        cand, vals = torch.cat(cand), torch.cat(vals)
        if len(cand) < 2:
            continue
        vals, order = vals.sort()
        cand = cand[order]
        comp, dens = _sklearn_gmm(vals.numpy())
        fg = torch.from_numpy(comp == 0)
        if fg.any():
            thr = int(torch.from_numpy(dens)[fg].argmax())
            kept += cand[fg][: thr + 1].tolist()
    return sorted(kept)


def test_paa_positives_equal_the_per_gt_loop():
    gen = torch.Generator().manual_seed(0)
    num_level = [h * w for h, w in SIZES]
    n = sum(num_level)
    checked = kept_total = 0
    for trial in range(4):
        b, g = 3, 2 + 2 * trial
        gt_inds = torch.randint(-1, g + 1, (b, n), generator=gen)  # any MaxIoU-like assignment (0 neg, -1 ignored)
        gt_inds[0, : n // 2] = 0  # uneven candidate counts, and an image half negative
        gt_inds[2] = torch.where(gt_inds[2] == 1, 0, gt_inds[2])  # a GT without any candidate
        gt_inds[1, (gt_inds[1] == 2).nonzero()[1:, 0]] = 0  # a GT with exactly one candidate: no positive
        scores = torch.rand(b, n, generator=gen, dtype=torch.float64) * 3
        keep = paa_positives(scores, gt_inds, num_level, g)
        assert not (keep & (gt_inds <= 0)).any()  # only initial candidates stay positive
        for i in range(b):
            ref = _loop_paa(scores[i], gt_inds[i], num_level)
            assert keep[i].nonzero().squeeze(1).tolist() == ref, (trial, i)
            kept_total += len(ref)
            checked += 1
    assert checked == 12 and kept_total > 50


def _feats(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, C, h, w, generator=g).requires_grad_() for h, w in SIZES]


def test_forward_train_losses_gradients_and_positives():
    torch.manual_seed(0)
    head = PAAHead(NC, C, C, PAAConfig(), STRIDES, loss_index=2, with_coord_feat=True)
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.5], [0.2, 0.3, 0.15, 0.2], [0.7, 0.6, 0.3, 0.3]]),
         "labels": torch.tensor([1, 2, 0])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]  # fmt: skip
    losses, pos = head.forward_train(_feats(), targets, torch.tensor([[96, 128], [96, 128]]))
    assert set(losses) == {"loss_cls2", "loss_bbox2", "loss_iou2"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    n = sum(h * w for h, w in SIZES)
    assert pos.head == "paa" and [c.shape for c in pos.coords] == [(n, 4)] * 2 and len(pos.feats) == 2
    kept = pos.labels[0] < NC
    assert int(kept.sum()) >= 3 and (pos.labels[1] == NC).all()
    # the kept positives are a subset of the MaxIoU(0.1) candidates, with their GT's label and box
    gt = torch.tensor([[0.3, 0.25, 0.7, 0.75], [0.125, 0.2, 0.275, 0.4], [0.55, 0.45, 0.85, 0.75]]) * torch.tensor(
        [128.0, 96.0, 128.0, 96.0])
    res = head.assigner.assign(pos.coords[0], gt, targets[0]["labels"])
    assert (res.gt_inds[kept] > 0).all()
    assert torch.equal(pos.labels[0][kept], targets[0]["labels"][res.gt_inds[kept] - 1])
    torch.testing.assert_close(pos.targets[0][kept], gt[res.gt_inds[kept] - 1])
    assert int(kept.sum()) < int((res.gt_inds > 0).sum())  # PAA dropped some candidates
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in head.parameters())
    assert head.atss_centerness.weight.grad.abs().sum() > 0 and head.atss_cls.weight.grad.abs().sum() > 0


def test_batch_without_gts_gives_zero_box_losses():
    torch.manual_seed(0)
    head = PAAHead(NC, C, C, PAAConfig(), STRIDES)
    none = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    losses, pos = head.forward_train(_feats(), [none, none], torch.tensor([[96, 128]] * 2))
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox0"] == 0 and losses["loss_iou0"] == 0 and losses["loss_cls0"] > 0
    assert all((lab == NC).all() for lab in pos.labels)
