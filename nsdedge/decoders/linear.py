"""A linear (ridge) decoder: z-scored voxels -> 16 x 768 tokens, optionally low rank, with rescaling.

Notation (Brain-Diffuser, scripts/clipvision_regression.py):
    z = (x - x_mean) / x_std                         per-voxel z-scoring, training statistics
    y = z W + b              (full rank, W (V, D))   or  y = (z U) Vt + b  (rank R: U (V, R), Vt (R, D))
    y' = (y - pred_mean) / pred_std * target_std + target_mean     per-output rescaling (optional)
D = tokens * width = 16 * 768. All of it folds into one MatMul + Add (two MatMuls for low rank).

On disk: a safetensors file of these arrays with string metadata (format, kind, subject, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle import atomic_writer
from ..errors import WeightsError

DECODER_FORMAT = "nsdedge-decoder"
TOKENS, WIDTH = 16, 768


@dataclass
class LinearDecoder:
    subject: str
    x_mean: np.ndarray                 # (V,)
    x_std: np.ndarray                  # (V,)
    bias: np.ndarray                   # (D,)
    weight: np.ndarray | None = None   # (V, D) full rank
    u: np.ndarray | None = None        # (V, R) low rank
    vt: np.ndarray | None = None       # (R, D)
    pred_mean: np.ndarray | None = None
    pred_std: np.ndarray | None = None
    target_mean: np.ndarray | None = None
    target_std: np.ndarray | None = None
    tokens: int = TOKENS
    width: int = WIDTH
    meta: dict = field(default_factory=dict)

    @property
    def voxels(self) -> int:
        return int(self.x_mean.shape[0])

    @property
    def rank(self) -> int | None:
        return None if self.u is None else int(self.u.shape[1])

    @property
    def rescaled(self) -> bool:
        return self.pred_std is not None

    def _out_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """y' = y * s + t for the rescaling (identity when there is none)."""
        d = self.tokens * self.width
        if not self.rescaled:
            return np.ones(d), np.zeros(d)
        s = self.target_std.astype(np.float64) / self.pred_std.astype(np.float64)
        return s, self.target_mean.astype(np.float64) - self.pred_mean.astype(np.float64) * s

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, V) voxels -> (N, tokens, width) float32, the reference computation (unfolded, float64)."""
        z = (np.asarray(x, np.float64) - self.x_mean) / self.x_std
        y = z @ self.weight if self.weight is not None else (z @ self.u) @ self.vt
        s, t = self._out_scale()
        y = (y + self.bias) * s + t
        return y.reshape(len(x), self.tokens, self.width).astype(np.float32)

    def folded(self) -> tuple[list[np.ndarray], np.ndarray]:
        """([W'] or [U', Vt'], c) in float32 with x @ W' + c == predict(x)."""
        inv = 1.0 / self.x_std.astype(np.float64)
        s, t = self._out_scale()
        mz = self.x_mean * inv                                           # (V,)
        if self.weight is not None:
            w = self.weight.astype(np.float64)
            mats = [(w * inv[:, None]) * s[None, :]]
            shift = mz @ w
        else:
            u, vt = self.u.astype(np.float64), self.vt.astype(np.float64)
            mats = [u * inv[:, None], vt * s[None, :]]
            shift = (mz @ u) @ vt
        c = (self.bias - shift) * s + t
        return [m.astype(np.float32) for m in mats], c.astype(np.float32)

    def save(self, path: str | Path) -> None:
        arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in
                  [("x_mean", self.x_mean), ("x_std", self.x_std), ("bias", self.bias), ("weight", self.weight),
                   ("u", self.u), ("vt", self.vt), ("pred_mean", self.pred_mean), ("pred_std", self.pred_std),
                   ("target_mean", self.target_mean), ("target_std", self.target_std)] if v is not None}
        meta = {"format": DECODER_FORMAT, "kind": "ridge", "subject": self.subject, "voxels": str(self.voxels),
                "tokens": str(self.tokens), "width": str(self.width), "rank": str(self.rank or 0),
                "extra": json.dumps(self.meta)}
        from safetensors.numpy import save

        with atomic_writer(Path(path)) as f:                  # follows the umask, like every file nsdedge writes
            f.write(save(arrays, metadata=meta))


def read_safetensors(path: Path, framework: str = "numpy", tensors: bool = True) -> tuple[dict, dict]:
    """(metadata, tensors) of a decoder file (tensors {} unless asked), or WeightsError naming it."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise WeightsError(f"{path}: no such decoder file")
    try:
        with safe_open(str(path), framework=framework) as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors decoder ({e})") from None


def is_decoder_file(path: Path) -> bool:
    """A decoder file nsdedge wrote (`fit`, `fit-federated`): safetensors with nsdedge's format in its metadata."""
    try:
        return read_safetensors(Path(path), tensors=False)[0].get("format") == DECODER_FORMAT
    except WeightsError:
        return False


def read_decoder(path: str | Path) -> LinearDecoder:
    """Read a decoder file written by `nsdedge fit`; check keys and shapes, naming the file and key."""
    path = Path(path)
    meta, arrays = read_safetensors(path)
    if meta.get("format") != DECODER_FORMAT or meta.get("kind") != "ridge":
        raise WeightsError(f"{path}: not an nsdedge ridge decoder (metadata format={meta.get('format')!r}, "
                           f"kind={meta.get('kind')!r})")
    try:
        v, tokens, width = int(meta["voxels"]), int(meta["tokens"]), int(meta["width"])
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{path}: bad decoder metadata: {e}") from None
    if (tokens, width) != (TOKENS, WIDTH):
        raise WeightsError(f"{path}: decoder makes {tokens} x {width} tokens; IP-Adapter-Plus takes {TOKENS} x {WIDTH}")
    d = tokens * width
    if "weight" in arrays:
        shapes = {"weight": (v, d)}
    elif "u" in arrays and "vt" in arrays:
        r = arrays["u"].shape[1] if arrays["u"].ndim == 2 else -1
        shapes = {"u": (v, r), "vt": (r, d)}
    else:
        raise WeightsError(f"{path}: missing key weight (or u and vt for a low-rank decoder)")
    shapes.update({"x_mean": (v,), "x_std": (v,), "bias": (d,)})
    rescale = [k for k in ("pred_mean", "pred_std", "target_mean", "target_std") if k in arrays]
    if rescale and len(rescale) != 4:
        raise WeightsError(f"{path}: rescaling needs pred_mean, pred_std, target_mean and target_std; has {rescale}")
    shapes.update({k: (d,) for k in rescale})
    for k, shape in shapes.items():
        if k not in arrays:
            raise WeightsError(f"{path}: missing key {k}")
        if tuple(arrays[k].shape) != shape:
            raise WeightsError(f"{path}: key {k} has shape {tuple(arrays[k].shape)}, expected {shape}")
    if not all(np.isfinite(a).all() for a in arrays.values()) or (arrays["x_std"] <= 0).any():
        raise WeightsError(f"{path}: decoder holds NaN/Inf or a non-positive x_std")
    return LinearDecoder(subject=meta.get("subject", "subj01"), tokens=tokens, width=width,
                         meta=json.loads(meta.get("extra", "{}")),
                         **{k: arrays.get(k) for k in ("x_mean", "x_std", "bias", "weight", "u", "vt", "pred_mean",
                                                       "pred_std", "target_mean", "target_std")})


def synthetic_decoder(subject: str, voxels: int, rank: int, seed: int) -> LinearDecoder:
    """A seeded random low-rank decoder whose tokens have about unit variance (a preset's stand-in subject)."""
    rng = np.random.default_rng(seed)
    d = TOKENS * WIDTH
    u = rng.standard_normal((voxels, rank)) / np.sqrt(voxels)
    vt = rng.standard_normal((rank, d)) / np.sqrt(rank)
    return LinearDecoder(subject=subject, x_mean=rng.standard_normal(voxels) * 0.1,
                         x_std=np.exp(rng.standard_normal(voxels) * 0.1), bias=rng.standard_normal(d) * 0.1,
                         u=u, vt=vt, meta={"synthetic": True, "seed": seed})
