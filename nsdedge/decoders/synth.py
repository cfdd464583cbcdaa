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
