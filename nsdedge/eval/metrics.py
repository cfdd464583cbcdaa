"""Reconstruction metrics: PixCorr, SSIM, 2-way identification and the feature-network metrics.

numpy (and scipy for SSIM) here; the feature networks live in features.py and need torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
    f = lambda x: gaussian_filter(x, sigma, truncate=3.5)  # (skimage's window: 3.5 sigma)
    mu_a, mu_b = f(a), f(b)
    va, vb, cov = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2, f(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))
    pad = int(3.5 * sigma + 0.5)      # skimage crops the border where the window runs off the image
    return float(s[pad:-pad, pad:-pad].mean())


# -- the field's eight metrics (REFERENCE.md, "Reconstruction metrics") -------------------------------------
GRAY = np.array([0.2125, 0.7154, 0.0721])      # skimage.color.rgb2gray's weights (ITU-R 709)


@dataclass(frozen=True)
class Preset:
    """How images are sized before each metric; the published tables differ here."""

    name: str
    base: int | None                  # every image is resized to this first (MindEye evaluates at 256)
    pixel: int                        # PixCorr and SSIM are computed at this size
    sizes: dict[str, int] = field(default_factory=dict)   # input side of each feature network


PRESETS = {
    # MindEye (Reconstruction_Metrics): 256 first, then each network's own Resize
    "mindeye": Preset("mindeye", 256, 425, {"alexnet": 256, "inception": 342, "clip": 224, "effnet": 255,
                                             "swav": 224}),
    # Brain-Diffuser: feature networks get 224 x 224
    "braindiffuser": Preset("braindiffuser", None, 425, {"alexnet": 224, "inception": 224, "clip": 224,
                                                          "effnet": 224, "swav": 224}),
}


@dataclass(frozen=True)
class Metric:
    name: str
    network: str | None               # None: a pixel metric
    node: str | None
    kind: str                         # "pixcorr" | "ssim" | "2way" (higher is better) | "distance" (lower)


METRICS = (
    Metric("PixCorr", None, None, "pixcorr"),
    Metric("SSIM", None, None, "ssim"),
    Metric("AlexNet(2)", "alexnet", "features.4", "2way"),
    Metric("AlexNet(5)", "alexnet", "features.11", "2way"),
    Metric("InceptionV3", "inception", "avgpool", "2way"),
    Metric("CLIP", "clip", "image_embeds", "2way"),
    Metric("EffNet-B", "effnet", "avgpool", "distance"),
    Metric("SwAV", "swav", "avgpool", "distance"),
)


def pixcorr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two images' flattened pixels."""
    return float(np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1])


def gray_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of the grayscale images (rgb2gray), data range 1: MindEye's and Brain-Diffuser's setting."""
    return ssim(np.asarray(a, np.float64) @ GRAY, np.asarray(b, np.float64) @ GRAY, data_range=1.0)


def correlation_distance(real: np.ndarray, pred: np.ndarray) -> float:
    """Mean over images of 1 - Pearson r between an image's real and predicted features
    (scipy.spatial.distance.correlation, as MindEye computes EffNet-B and SwAV)."""
    real = np.asarray(real, np.float64).reshape(len(real), -1)
    pred = np.asarray(pred, np.float64).reshape(len(pred), -1)
    real = real - real.mean(1, keepdims=True)
    pred = pred - pred.mean(1, keepdims=True)
    r = (real * pred).sum(1) / np.sqrt((real ** 2).sum(1) * (pred ** 2).sum(1))
    return float(np.mean(1.0 - r))


def missing_weights(weights_dir: Path | None, metrics=METRICS) -> dict[str, list[str]]:
    """{network: [metric names]} for the feature networks whose weights are not in `weights_dir`."""
    from .features import NETWORKS

    out: dict[str, list[str]] = {}
    for m in metrics:
        if m.network and NETWORKS[m.network].find(weights_dir) is None:
            out.setdefault(m.network, []).append(m.name)
    return out


def evaluate(recons, reference, preset: str = "mindeye", weights_dir: Path | None = None, fidelity: bool = False,
             metrics=METRICS, batch: int = 32, progress=None) -> dict:
    """The metrics of `recons` against `reference` (two ImageSets paired by index).

    fidelity: the reference is another bundle's output rather than the stimuli; PSNR is added.
    Feature metrics whose weights are missing are skipped and listed under "skipped"; a weight file that is
    there but wrong raises WeightsError. progress(done, total) is called after each batch.
    """
    from .features import NETWORKS
    from .images import pair_keys, resize

    p = PRESETS[preset]
    keys = pair_keys(recons, reference)
    missing = missing_weights(weights_dir, metrics)
    extractors = {}
    wanted = sorted({m.network for m in metrics if m.network and m.network not in missing})
    if wanted:
        from .features import FeatureExtractor

        for name in wanted:
            extractors[name] = FeatureExtractor(NETWORKS[name], NETWORKS[name].find(weights_dir))
    pix, ss, ps = [], [], []
    feats = {(m.network, m.node): ([], []) for m in metrics if m.network in extractors}
    done = 0
    for i in range(0, len(keys), batch):
        chunk = keys[i:i + batch]
        rec, ref = recons.read(chunk), reference.read(chunk)        # (b, H, W, 3) float32 in [0, 1]
        if fidelity:
            ps += [psnr(np.round(a * 255), np.round(b * 255)) for a, b in zip(rec, ref)]
        if p.base:
            rec = np.stack([resize(x, p.base) for x in rec])
            ref = np.stack([resize(x, p.base) for x in ref])
        for a, b in zip(rec, ref):
            a, b = resize(a, p.pixel), resize(b, p.pixel)
            pix.append(pixcorr(b, a))
            ss.append(gray_ssim(a, b))
        for name, ex in extractors.items():
            fr, fp = ex(ref, p.sizes.get(name)), ex(rec, p.sizes.get(name))
            for (net, node), (real, pred) in feats.items():
                if net == name:
                    real.append(fr[node])
                    pred.append(fp[node])
        done += len(chunk)
        if progress:
            progress(done, len(keys))
    values: dict[str, float | None] = {}
    for m in metrics:
        if m.kind == "pixcorr":
            values[m.name] = float(np.mean(pix))
        elif m.kind == "ssim":
            values[m.name] = float(np.mean(ss))
        elif m.network in extractors:
            real, pred = (np.concatenate(x) for x in feats[(m.network, m.node)])
            values[m.name] = (two_way_identification(real, pred) if m.kind == "2way"
                              else correlation_distance(real, pred))
        else:
            values[m.name] = None
    if fidelity:
        finite = [x for x in ps if np.isfinite(x)]
        values["PSNR"] = float(np.mean(finite)) if finite else float("inf")
    return {
        "preset": p.name, "mode": "fidelity" if fidelity else "stimuli", "n": len(keys),
        "recons": str(recons.path), "reference": str(reference.path),
        "metrics": values,
        "kinds": {m.name: m.kind for m in metrics},
        "skipped": {name: list(NETWORKS[name].files) for name in missing},
        "weights": {name: str(ex.path) for name, ex in extractors.items()},
    }


def format_metrics(result: dict) -> str:
    """A table laid out like the papers': 2-way identification in percent, the rest as numbers."""
    names = list(result["metrics"])
    cells = []
    for name in names:
        v = result["metrics"][name]
        kind = result["kinds"].get(name)
        if v is None:
            cells.append("-")
        elif kind == "2way":
            cells.append(f"{100 * v:.2f}%")
        elif name == "PSNR":
            cells.append("inf" if not np.isfinite(v) else f"{v:.2f} dB")
        else:
            cells.append(f"{v:.3f}")
    widths = [max(len(a), len(b)) for a, b in zip(names, cells)]
    head = "  ".join(n.rjust(w) for n, w in zip(names, widths))
    row = "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    title = f"{result['n']} images, preset {result['preset']}, {result['mode']}"
    return f"{title}\n{head}\n{row}"
