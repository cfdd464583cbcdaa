"""Fitting the ridge decoder (Brain-Diffuser recipe, scripts/clipvision_regression.py), memory-aware.

    Z = (X - mean) / std            per-voxel z-scoring with training statistics (ddof=1)
    K = Zc Zc^T = U diag(s) U^T     ONE eigendecomposition of the N x N Gram matrix, shared by every
                                    alpha and every token (dual ridge: N << V for NSD)
    W(alpha) = Zc^T U diag(1/(s+alpha)) U^T Yc,   b = mean(Y)
    LOO residual (closed form): e_i = (y_i - yhat_i) / (1 - H_ii),  H = U diag(s/(s+alpha)) U^T + 11^T/N

An alpha is chosen per token (16 of them) by the leave-one-out error. The LOO predictions at the chosen
alphas are honest held-out predictions; their per-dimension mean and std are stored so Brain-Diffuser's
rescaling works on a single live trial. `rank` keeps the top R directions of the fitted values
(reduced-rank ridge): W_R = W V_R V_R^T, stored as U = W V_R (V x R) and Vt = V_R^T (R x D).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import InputError
from .linear import TOKENS, WIDTH, LinearDecoder

log = logging.getLogger(__name__)

DEFAULT_ALPHAS = (1e1, 1e2, 1e3, 3e3, 1e4, 3e4, 6e4, 1e5, 3e5, 1e6)   # Brain-Diffuser used 60000 for all tokens


@dataclass
class FitReport:
    alphas: list[float]          # chosen alpha per token
    loo_error: list[float]       # LOO mean squared error per token at the chosen alpha
    seconds: float


def fit_ridge(x: np.ndarray, y: np.ndarray, *, subject: str = "subj01", alphas=DEFAULT_ALPHAS,
              rank: int | None = None, rescale: bool = True,
              progress: Callable[[str], None] = lambda s: None) -> tuple[LinearDecoder, FitReport]:
    """x (N, V) voxels, y (N, 16, 768) or (N, 12288) tokens -> a fitted LinearDecoder."""
    t0 = time.perf_counter()
    x = np.asarray(x)
    n, v = x.shape
    y = np.asarray(y, np.float64).reshape(n, -1)
    if y.shape[1] != TOKENS * WIDTH:
        raise InputError(f"embeddings must be (N, {TOKENS}, {WIDTH}), got {y.shape[1]} values per trial")
    if n < 3:
        raise InputError(f"need at least 3 training trials, got {n}")
    if rank is not None and not 1 <= rank <= min(n, v):
        raise InputError(f"--rank must be between 1 and {min(n, v)}, got {rank}")
    alphas = sorted(float(a) for a in alphas)
    if not alphas or not all(0 < a < math.inf for a in alphas):         # (NaN fails the comparison too)
        raise InputError(f"alphas must be positive finite numbers, got {alphas}")

    progress("z-scoring voxels")
    x_mean = x.mean(axis=0, dtype=np.float64)
    x_std = x.std(axis=0, ddof=1, dtype=np.float64)
    x_std[x_std == 0] = 1.0                         # constant voxels carry nothing; keep them finite
    z = (x - x_mean) / x_std                        # (N, V) float64, centred
    y_mean = y.mean(axis=0)
    yc = y - y_mean                                 # (N, D)

    progress(f"Gram matrix and its eigendecomposition ({n} x {n})")
    s, u = np.linalg.eigh(z @ z.T)                  # K = U diag(s) U^T
    s = np.clip(s, 0, None)
    uty = u.T @ yc                                  # (N, D), shared by every alpha
    u2 = u * u                                      # for diag(H) = sum_k U_ik^2 s_k/(s_k+alpha)

    progress(f"leave-one-out error for {len(alphas)} alphas x {TOKENS} tokens")
    best = np.full(TOKENS, np.inf)
    chosen = np.zeros(TOKENS)
    loo_pred = np.empty_like(yc)
    for a in alphas:
        shrink = s / (s + a)
        h = u2 @ shrink + 1.0 / n            # (N,) leverages; 1/n is the unpenalised intercept's share
        fitted = u @ (shrink[:, None] * uty)                    # (N, D)
        resid = (yc - fitted) / (1.0 - h)[:, None]
        err = (resid ** 2).reshape(n, TOKENS, WIDTH).mean(axis=(0, 2))
        better = err < best
        best[better], chosen[better] = err[better], a
        for t in np.flatnonzero(better):
            sl = slice(t * WIDTH, (t + 1) * WIDTH)
            loo_pred[:, sl] = yc[:, sl] - resid[:, sl]
        del fitted, resid

    progress("weights at the chosen alphas")
    weight = np.empty((v, TOKENS * WIDTH))
    for a in np.unique(chosen):
        cols = np.concatenate([np.arange(t * WIDTH, (t + 1) * WIDTH) for t in np.flatnonzero(chosen == a)])
        weight[:, cols] = z.T @ (u @ (uty[:, cols] / (s + a)[:, None]))
    dec = LinearDecoder(subject=subject, x_mean=x_mean, x_std=x_std, bias=y_mean, weight=weight,
                        meta={"alphas": chosen.tolist(), "loo_error": best.tolist(), "train_trials": n})
    if rescale:
        p = loo_pred + y_mean
        dec.pred_mean, dec.pred_std = p.mean(axis=0), np.maximum(p.std(axis=0), 1e-8)
        dec.target_mean, dec.target_std = y_mean, y.std(axis=0)
    if rank is not None:
        progress(f"reduced rank {rank}")
        fitted = z @ weight                                         # (N, D)
        ev, evec = np.linalg.eigh(fitted @ fitted.T)                # right singular vectors via the N x N Gram
        top = np.argsort(ev)[::-1][:rank]
        sig = np.sqrt(np.clip(ev[top], 1e-300, None))
        vt = (evec[:, top].T @ fitted) / sig[:, None]               # (R, D), orthonormal rows
        dec.u, dec.vt, dec.weight = weight @ vt.T, vt, None
        dec.meta["rank"] = rank
    report = FitReport(alphas=chosen.tolist(), loo_error=best.tolist(), seconds=time.perf_counter() - t0)
    log.info("ridge fit %s: %d trials x %d voxels in %.1f s, alphas %s", subject, n, v, report.seconds,
             sorted(set(report.alphas)))
    return dec, report
