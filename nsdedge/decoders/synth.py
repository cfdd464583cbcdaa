"""Synthetic NSD-like data with known answers.

Latent factors F (N, k) generate both the voxels and the target tokens:
    voxels  X = F B + noise * E          (N, V),  B (k, V), E ~ N(0, 1); each voxel then has variance ~ 1 + noise^2
    tokens  Y = LayerNorm(F A)           (N, 16, 768), as IP-Adapter-Plus's Resampler ends in a LayerNorm
so a decoder that recovers F from X recovers Y. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .linear import TOKENS, WIDTH


@dataclass
class SynthData:
    x_train: np.ndarray   # (n_train, V) float32
    y_train: np.ndarray   # (n_train, 16, 768) float32
    x_test: np.ndarray
    y_test: np.ndarray


def make_synthetic(n_train: int = 400, n_test: int = 100, voxels: int = 2000, factors: int = 32,
                   noise: float = 1.0, seed: int = 0) -> SynthData:
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    f = rng.standard_normal((n, factors))
    b = rng.standard_normal((factors, voxels)) / np.sqrt(factors)
    a = rng.standard_normal((factors, TOKENS * WIDTH)) / np.sqrt(factors)
    x = (f @ b + noise * rng.standard_normal((n, voxels))).astype(np.float32)
    y = (f @ a).reshape(n, TOKENS, WIDTH)
    y = (y - y.mean(-1, keepdims=True)) / y.std(-1, keepdims=True)          # LayerNorm, unit affine
    y = y.astype(np.float32)
    return SynthData(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def make_subjects(voxels: tuple[int, ...] = (15724, 14278, 13039, 12682), n_train: int = 400, n_test: int = 100,
                  factors: int = 32, noise: float = 1.0, seed: int = 0) -> list[SynthData]:
    """Several subjects of different voxel counts (NSD subjects 1, 2, 5, 7 by default) driven by shared latent
    factors: each subject sees its own trials F_s and has its own voxel map B_s (k, V_s), but one token map A
    turns factors into tokens for all of them, as one image gives the same IP-Adapter tokens whoever sees it.
    So what a decoder learns after its input layer (factors -> tokens) is common to every subject: the premise of
    training it across subjects."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((factors, TOKENS * WIDTH)) / np.sqrt(factors)
    out = []
    for v in voxels:
        n = n_train + n_test
        f = rng.standard_normal((n, factors))
        b = rng.standard_normal((factors, v)) / np.sqrt(factors)
        x = (f @ b + noise * rng.standard_normal((n, v))).astype(np.float32)
        y = (f @ a).reshape(n, TOKENS, WIDTH)
        y = ((y - y.mean(-1, keepdims=True)) / y.std(-1, keepdims=True)).astype(np.float32)
        out.append(SynthData(x[:n_train], y[:n_train], x[n_train:], y[n_train:]))
    return out
