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
