"""Calibration data: the real inputs every graph sees while the fp32 pipeline reconstructs real trials.

Saved as one .npz (no pickles) with keys "<component>/<input>" stacked over calls: decoder voxels, the UNet's
sample / timestep / text / ip tokens at every step (both CFG halves: batch 2), its noise predictions, and the
VAE's latents. `np.load` it to inspect; `load_calibration` gives it back by component.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from ..bundle import atomic_write_bytes


CALIBRATION_NEEDED = ("int8 for TensorRT is static (explicit Q/DQ) and needs calibration data: --calibration-voxels "
                      "FILE (real trials of a subject) or --calibration FILE.npz (from `nsdedge calibrate`)")


class Recorder:
    """A Reconstructor observer that keeps every graph's inputs (and the UNet's outputs)."""

    def __init__(self):
        self.data: dict[str, list[np.ndarray]] = defaultdict(list)

    def __call__(self, component: str, inputs: dict, outputs: dict) -> None:
        for k, v in inputs.items():
            self.data[f"{component}/{k}"].append(np.array(v, np.float32))
        if component == "unet":
            self.data["unet/noise_pred"].append(np.array(outputs["noise_pred"], np.float32))

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.stack(v) for k, v in self.data.items()}

    def save(self, path: str | Path) -> None:
        import io

        buf = io.BytesIO()
        np.savez_compressed(buf, **self.arrays())
        atomic_write_bytes(Path(path), buf.getvalue())


def record_calibration(rec, voxels: np.ndarray, subject: str | None = None, *, steps: int = 20,
                       guidance: float = 7.5, scheduler: str = "ddim", seed: int = 0) -> Recorder:
    """Run `rec` (an fp32 Reconstructor) over `voxels` and record every stage's inputs."""
    recorder = Recorder()
    before = rec.observer
    rec.observer = recorder
    try:
        rec(voxels, subject, steps=steps, guidance=guidance, scheduler=scheduler, seed=seed)
    finally:
        rec.observer = before
    return recorder


def _open(path: str | Path):
    import zipfile

    from ..errors import InputError

    try:
        f = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a readable calibration .npz ({str(e).splitlines()[0][:120]}); nsdedge never "
                         f"unpickles") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: not a calibration file (an .npz written by `nsdedge calibrate`)")
    if not {"unet/sample", "unet/timestep", "unet/encoder_hidden_states"} <= set(f.files):
        f.close()
        raise InputError(f"{path}: holds no UNet inputs; record one with `nsdedge calibrate`")
    return f


def check_calibration(path: str | Path) -> None:
    """Raise InputError unless `path` is a calibration file; reads the names only, not the arrays."""
    _open(path).close()


def load_calibration(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """{component: {input name: (calls, ...) array}} from a file written by Recorder.save."""
    from ..errors import InputError

    out: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    with _open(path) as f:
        for k in f.files:
            comp, _, name = k.rpartition("/")
            try:
                out[comp][name] = f[k]
            except ValueError:
                raise InputError(f"{path}: array {k!r} is pickled or unreadable; nsdedge never unpickles") from None
    return dict(out)
