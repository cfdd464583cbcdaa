"""Reconstruction metrics. numpy only here; feature networks (issue "evaluation") come later."""

from __future__ import annotations

import numpy as np


def two_way_identification(real: np.ndarray, pred: np.ndarray) -> float:
    """2-way identification (MindEye, Brain-Diffuser): r = corrcoef(real, pred)[:n, n:];
    score = mean over j of (count of r[i, j] < r[j, j]) / (n - 1). Ties count as failures."""
    real = np.asarray(real, np.float64).reshape(len(real), -1)
    pred = np.asarray(pred, np.float64).reshape(len(pred), -1)
    n = len(real)
    if n < 2 or len(pred) != n:
        raise ValueError(f"need two sets of the same n >= 2 items, got {len(real)} and {len(pred)}")
    r = np.corrcoef(real, pred)[:n, n:]
    diag = np.diag(r)
    return float(((r < diag[None, :]).sum(axis=0) / (n - 1)).mean())


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, sigma: float = 1.5) -> float:
    """SSIM with a Gaussian window (sigma 1.5) and population covariance, as scikit-image's
    structural_similarity(gaussian_weights=True, use_sample_covariance=False); RGB averaged over channels."""
    from scipy.ndimage import gaussian_filter

    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim == 3:
        return float(np.mean([ssim(a[..., c], b[..., c], data_range, sigma) for c in range(a.shape[-1])]))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    f = lambda x: gaussian_filter(x, sigma, truncate=3.5)  # noqa: E731  (skimage's window: 3.5 sigma)
    mu_a, mu_b = f(a), f(b)
    va, vb, cov = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2, f(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))
    pad = int(3.5 * sigma + 0.5)      # skimage crops the border where the window runs off the image
    return float(s[pad:-pad, pad:-pad].mean())
