"""Two-component 1-D Gaussian mixtures fitted by EM, many at once (PAA's per-GT loss split).

`fit_predict_gmm2` is scikit-learn's `GaussianMixture(2, covariance_type="diag", weights_init=(0.5, 0.5),
means_init=(min, max), precisions_init=(1, 1))` followed by `predict` and `score_samples`, which is how mmdet's
`PAAHead.paa_reassign` splits each GT's candidate losses, written for a batch of rows on the device:

  E-step   log p_k(x) = -0.5 (log 2 pi + mu_k^2 P_k - 2 x mu_k P_k + x^2 P_k) + log sqrt(P_k) + log w_k
  M-step   n_k = sum_i r_ik + 10 eps,  mu_k = sum r x / n_k,
           var_k = sum r x^2 / n_k - 2 mu_k (sum r x / n_k) + mu_k^2 + reg_covar,  P_k = 1 / var_k,  w_k = n_k / sum n
  stop     when the mean log-likelihood (computed in the E-step) changes by less than tol (sklearn's lower bound);
           that iteration's M-step still applies, as in sklearn.

The same expressions in the same order as sklearn 1.x (`_estimate_log_gaussian_prob`, `_estimate_gaussian_parameters`),
in float64 (deviation: mmdet hands sklearn float32 losses, so sklearn computes in float32 there; float64 only moves
values within float32 rounding of the data). Each row stops at its own iteration; the loop ends when every row has
stopped, checked on the host every `check_every` iterations (at most max_iter / check_every syncs per call).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOG_2PI = math.log(2 * math.pi)


def _weighted_log_prob(x: Tensor, means: Tensor, prec_chol: Tensor, weights: Tensor) -> Tensor:
    """x (R, M), per-row component parameters (R, 2) -> (R, M, 2) log w_k + log N(x | mu_k, 1 / P_k)."""
    precisions = prec_chol**2
    xv = x[..., None]
    log_prob = (means**2 * precisions)[:, None] - 2.0 * xv * (means * precisions)[:, None] + xv**2 * precisions[:, None]
    return -0.5 * (_LOG_2PI + log_prob) + torch.log(prec_chol)[:, None] + torch.log(weights)[:, None]


def fit_predict_gmm2(
    x: Tensor,
    valid: Tensor,
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    check_every: int = 8,
) -> tuple[Tensor, Tensor]:
    """Fit one 2-component mixture per row of `x` on that row's valid entries.

    x: (R, M) values; valid: (R, M) bool. Rows with fewer than 2 valid entries are not fitted (their outputs are
    meaningless and must be ignored by the caller, as mmdet skips such GTs).
    Returns (component (R, M) long: 0 = the component initialised at the row's minimum, 1 = at its maximum;
    score (R, M) float64: the log density under the fitted mixture, sklearn's `score_samples`).
    """
    r = x.shape[0]
    xd = torch.where(valid, x.double(), 0.0)
    w = valid.double()
    n = w.sum(1)  # (R,)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=x.device)
    lo = torch.where(valid, xd, inf).amin(1)
    hi = torch.where(valid, xd, -inf).amax(1)
    active = n >= 2
    means = torch.stack([torch.where(active, lo, 0.0), torch.where(active, hi, 0.0)], 1)  # (R, 2)
    weights = xd.new_full((r, 2), 0.5)
    prec_chol = xd.new_ones((r, 2))  # precisions_init 1 -> Cholesky factor 1
    lower = xd.new_full((r,), -float("inf"))
    eps10 = 10 * torch.finfo(torch.float64).eps
    for it in range(1, max_iter + 1):
        wlp = _weighted_log_prob(xd, means, prec_chol, weights)  # (R, M, 2)
        log_norm = torch.logsumexp(wlp, -1)  # (R, M)
        resp = torch.exp(wlp - log_norm[..., None]) * w[..., None]
        new_lower = (log_norm * w).sum(1) / n.clamp(min=1)
        nk = resp.sum(1) + eps10  # (R, 2)
        sum_x = (resp * xd[..., None]).sum(1)
        mu = sum_x / nk
        avg_x2 = (resp * (xd * xd)[..., None]).sum(1) / nk
        var = avg_x2 - 2 * (mu * sum_x / nk) + mu**2 + reg_covar
        upd = active[:, None]
        means = torch.where(upd, mu, means)
        weights = torch.where(upd, nk / nk.sum(1, keepdim=True), weights)
        prec_chol = torch.where(upd, 1.0 / torch.sqrt(var.clamp(min=reg_covar)), prec_chol)
        change = new_lower - lower
        lower = torch.where(active, new_lower, lower)
        active = active & ~(change.abs() < tol)
        if it % check_every == 0 and not bool(active.any()):  # one host read per check_every iterations
            break
    wlp = _weighted_log_prob(xd, means, prec_chol, weights)
    return wlp.argmax(-1), torch.logsumexp(wlp, -1)
