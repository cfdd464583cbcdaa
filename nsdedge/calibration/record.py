"""Calibration data: the real inputs every graph sees while the fp32 pipeline reconstructs real trials.

Saved as one .npz (no pickles) with keys "<component>/<input>": decoder voxels, the UNet's sample / timestep /
text / ip tokens (both CFG halves: batch 2), its noise predictions, and the VAE's latents. Inputs that stay the
same over the steps of an image (text embeddings, ip tokens, ip scale: 0.8 MB a call at 512^2) are stored once
per image, with "<component>/<input>@calls" giving, for each call, the row it used; every other input has one
row per call. `np.load` it to inspect; `load_calibration` gives it back by component and `calls` call by call.
"""

from __future__ import annotations

import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from ..bundle import atomic_writer

CALIBRATION_NEEDED = ("int8 for TensorRT is static (explicit Q/DQ) and needs calibration data: --calibration-voxels "
                      "FILE (real trials of a subject) or --calibration FILE.npz (from `nsdedge calibrate`)")
CALLS = "@calls"        # suffix of the per-call row index of an input stored once per image


class Recorder:
    """A Reconstructor observer that keeps every graph's inputs (and the UNet's outputs).

    An input fed as the same array object as in the previous call (the pipeline's per-image constants) is kept
    once and indexed; anything else is copied at every call."""

    def __init__(self):
        self._values: dict[str, list[np.ndarray]] = defaultdict(list)     # "<component>/<input>" -> distinct rows
        self._rows: dict[str, list[int]] = defaultdict(list)              # ... -> the row each call used
        self._last: dict[str, object] = {}

    def __call__(self, component: str, inputs: dict, outputs: dict) -> None:
        items = dict(inputs)
        if component == "unet":
            items["noise_pred"] = outputs["noise_pred"]
        for k, v in items.items():
            key = f"{component}/{k}"
            if self._last.get(key) is not v:
                self._values[key].append(np.array(v, np.float32))
                self._last[key] = v
            self._rows[key].append(len(self._values[key]) - 1)

    def by_component(self) -> dict[str, dict[str, Sequence]]:
        """{component: {input: rows, input@calls: row per call (where rows are shared)}}, as `calls` reads it."""
        out: dict[str, dict[str, Sequence]] = defaultdict(dict)
        for key, values in self._values.items():
            comp, _, name = key.rpartition("/")
            out[comp][name] = values
            if len(values) < len(self._rows[key]):
                out[comp][name + CALLS] = self._rows[key]
        return dict(out)

    @property
    def data(self) -> dict[str, list[np.ndarray]]:
        """"<component>/<input>" -> what each call was fed, in order (shared rows are the same array)."""
        return {key: [values[r] for r in self._rows[key]] for key, values in self._values.items()}

    def arrays(self) -> dict[str, np.ndarray]:
        """Flat "<component>/<input>" -> stacked array (a copy; `save` writes without one)."""
        return {f"{c}/{n}": np.asarray(v, np.int64) if n.endswith(CALLS) else np.stack(v)
                for c, d in self.by_component().items() for n, v in d.items()}

    def save(self, path: str | Path) -> None:
        """Write the .npz atomically, one input at a time, without stacking a copy of anything in memory."""
        from ..errors import NsdedgeError

        parts = self.by_component()
        for comp, d in parts.items():
            for name, v in d.items():
                if not name.endswith(CALLS) and len({(row.shape, row.dtype) for row in v}) > 1:
                    raise NsdedgeError(f"calibration: calls of {comp}/{name} differ in shape; record one batch size")
        with atomic_writer(Path(path)) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as z:
            for comp, d in parts.items():
                for name, v in d.items():
                    with z.open(f"{comp}/{name}.npy", "w", force_zip64=True) as entry:
                        if name.endswith(CALLS):
                            np.lib.format.write_array(entry, np.asarray(v, np.int64), allow_pickle=False)
                            continue
                        header = {"descr": np.lib.format.dtype_to_descr(v[0].dtype), "fortran_order": False,
                                  "shape": (len(v), *v[0].shape)}
                        np.lib.format.write_array_header_1_0(entry, header)
                        for row in v:
                            entry.write(np.ascontiguousarray(row).tobytes())


def calls(arrays: dict[str, Sequence], skip: tuple[str, ...] = ("noise_pred",)) -> list[dict[str, np.ndarray]]:
    """One component's recording ({input: rows, input@calls: ...}) -> the feeds of each call, in order. Rows are
    views of what was recorded, not copies. `skip`: recorded outputs, not inputs."""
    names = [n for n in arrays if not n.endswith(CALLS) and n not in skip]
    if not names:
        return []
    rows = {n: arrays.get(n + CALLS, range(len(arrays[n]))) for n in names}
    count = len(rows[names[0]])
    return [{n: arrays[n][int(rows[n][i])] for n in names} for i in range(count)]


def record_calibration(rec, voxels: np.ndarray, subject: str | None = None, *, steps: int | None = None,
                       guidance: float | None = None, scheduler: str | None = None, seed: int = 0) -> Recorder:
    """Run `rec` (an fp32 Reconstructor) over `voxels` and record every stage's inputs. Settings left out: the
    bundle's run defaults (else 20 DDIM steps at guidance 7.5), so a few-step bundle records what it runs."""
    recorder = Recorder()
    before = rec.observer
    rec.observer = recorder
    try:
        rec(voxels, subject, steps=steps, guidance=guidance, scheduler=scheduler, seed=seed)
    finally:
        rec.observer = before
    return recorder


def _open(path: str | Path):
    from ..errors import InputError, first_line

    try:
        f = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a readable calibration .npz ({first_line(e, 120)}); nsdedge never "
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


def is_calibration_file(path: str | Path) -> bool:
    """A calibration file `nsdedge calibrate` wrote (what check_calibration accepts)."""
    from ..errors import InputError

    try:
        check_calibration(path)
        return True
    except InputError:
        return False


def load_calibration(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """{component: {input: array, input@calls: row index (where rows are shared)}} from a file written by
    Recorder.save (or by earlier nsdedge, one row per call throughout); `calls` turns one into feeds."""
    from ..errors import InputError

    out: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    with _open(path) as f:
        for k in f.files:
            comp, _, name = k.rpartition("/")
            try:
                out[comp][name] = f[k]
            except ValueError:
                raise InputError(f"{path}: array {k!r} is pickled or unreadable; nsdedge never unpickles") from None
    for comp, d in out.items():
        for name, rows in [(n, r) for n, r in d.items() if n.endswith(CALLS)]:
            base = d.get(name.removesuffix(CALLS))
            if base is None or rows.ndim != 1 or rows.dtype.kind not in "iu" or \
                    (len(rows) and not (0 <= rows.min() and rows.max() < len(base))):
                raise InputError(f"{path}: {comp}/{name} does not index {comp}/{name.removesuffix(CALLS)}")
    return dict(out)
