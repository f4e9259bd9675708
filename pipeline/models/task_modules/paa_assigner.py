"""Probabilistic anchor assignment (PAA, Kim & Lee 2020; mmdet `PAAHead.paa_reassign`), batched.

Input: the anchors' initial MaxIoU assignment (gt_inds: 0 negative, -1 ignored, g + 1 = GT g) and a per-anchor
score, the sum of the classification and box losses of each initially positive anchor (lower = better). For each
GT of each image:
  1. candidates: on every level, the `topk` initially positive anchors of that GT with the lowest score;
  2. a GT with fewer than 2 candidates gets no positive (mmdet skips it: "gmm needs at least two samples");
  3. the candidates' scores, sorted ascending, are fitted by a 2-component 1-D GMM initialised at (min, max)
     (`gmm.fit_predict_gmm2`, sklearn's GaussianMixture with mmdet's init);
  4. the candidates of the low component ("foreground") are kept up to and including the one of highest mixture
     density (mmdet's `gmm_separation_scheme`); every other initially positive anchor of the GT becomes negative.
Each anchor belongs to at most one GT after MaxIoU, so the GTs' candidates are disjoint and all GTs of all images
are processed at once: per level one top-k over (B, G, n_l), one GMM fit over the B x G rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.models.task_modules.gmm import fit_predict_gmm2


@torch.no_grad()
def paa_positives(scores: Tensor, gt_inds: Tensor, num_level_anchors: Sequence[int], num_gts: int,
                  topk: int = 9) -> Tensor:  # fmt: skip
    """scores (B, N) per-anchor loss (any value off the initial positives); gt_inds (B, N) long from MaxIoU;
    num_level_anchors: anchors per level (level-major anchor order); num_gts: G, the padded GT count.
    Returns keep (B, N) bool: the anchors that stay positive (for their gt_inds GT)."""
    b, n = scores.shape
    inf = torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    gt_ids = torch.arange(1, num_gts + 1, device=scores.device)[None, :, None]  # (1, G, 1)
    vals, idxs, start = [], [], 0
    for n_l in num_level_anchors:
        k = min(topk, n_l)
        if k == 0:
            continue
        of_gt = gt_inds[:, None, start : start + n_l] == gt_ids  # (B, G, n_l)
        cand = torch.where(of_gt, scores[:, None, start : start + n_l], inf)
        v, i = cand.topk(k, dim=2, largest=False)  # ascending; non-candidates (inf) last
        vals.append(v)
        idxs.append(i + start)
        start += n_l
    v = torch.cat(vals, 2).reshape(b * num_gts, -1)  # (R, L k)
    idx = torch.cat(idxs, 2).reshape(b * num_gts, -1)
    v, order = v.sort(dim=1)  # mmdet sorts each GT's candidates by score
    idx = idx.gather(1, order)
    valid = torch.isfinite(v)
    comp, density = fit_predict_gmm2(v, valid)
    fg = valid & (comp == 0) & (valid.sum(1, keepdim=True) >= 2)
    best = torch.where(fg, density, density.new_tensor(-float("inf"))).argmax(1, keepdim=True)  # first on ties
    keep_c = fg & (torch.arange(v.shape[1], device=v.device)[None] <= best)  # fg candidates up to the densest
    rows = torch.arange(b, device=scores.device).repeat_interleave(num_gts)[:, None] * n  # image offset per row
    # scatter-add, not bool indexing: fixed shapes (no host sync); non-candidate slots add 0 wherever they point
    hits = torch.zeros(b * n, dtype=torch.int32, device=scores.device)
    hits.index_add_(0, (idx + rows).reshape(-1), keep_c.reshape(-1).to(torch.int32))
    return (hits > 0).reshape(b, n)
