"""Many images from a voxel file: checked first, streamed one trial at a time, written atomically, resumable.

    from nsdedge.runtime.batch import reconstruct
    result = reconstruct("bundle/", "nsd_test_fmriavg_nsdgeneral_sub1.npy", "recons/", trials="0:100", steps=20)

Row r of the voxel file becomes `recons/{r:04d}.png`, made with seed + r, so any subset of rows, in any order,
on any number of machines, gives the same bytes as one uninterrupted run (on CPUs, with the same number of
inference threads: onnxruntime's sums depend on it). The output directory holds a run
record, `nsdedge-run.json`: the bundle's manifest hash, the provider, the settings, the voxel file's hash and the
nsdedge version. A rerun skips the images already there; a rerun that differs in any of those is refused, so
one directory never mixes images of two models or two settings. Every setting, the voxel file and the output
location are checked before anything is written (and before the bundle is hashed).
"""

from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..bundle import (atomic_write_bytes, check_new_file, check_not_input, check_writable, create_once,
                      json_text, sha256_file)
from ..errors import InputError, NsdedgeError
from ..voxels import load_voxels, validate_voxels
from .pipeline import VAES, Reconstructor, check_number, check_seed
from .schedulers import NAMES as SCHEDULERS

log = logging.getLogger(__name__)

RUN_RECORD = "nsdedge-run.json"
RECORD_FORMAT = "nsdedge-run"
RECORD_VERSION = 1
PNG_SOFTWARE = "nsdedge"          # the tEXt "Software" of every PNG nsdedge writes
LOW_MEMORY_CHUNK = 32              # low memory: trials denoised with the UNet loaded, then decoded with the VAE loaded


@dataclass(frozen=True)
class Settings:
    """What, besides the bundle and the voxels, decides an image's bytes. None: the bundle's run default."""

    steps: int | None = None
    guidance: float | None = None
    ip_scale: float | None = None
    scheduler: str | None = None
    seed: int = 0
    vae: str | None = None

    def checked(self, last_row: int = 0) -> "Settings":
        """These settings, normalised, or InputError naming the bad one. Row r uses seed + r."""
        steps = self.steps
        if steps is not None:
            if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)) or steps < 1:
                raise InputError(f"steps must be a whole number >= 1, got {steps!r}")
            steps = int(steps)
        guidance, ip_scale = (None if v is None else check_number(k, v)
                              for k, v in (("guidance", self.guidance), ("ip scale", self.ip_scale)))
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise InputError(f"unknown scheduler {self.scheduler!r} (choose from {', '.join(SCHEDULERS)})")
        if self.vae is not None and self.vae not in VAES:
            raise InputError(f"unknown vae {self.vae!r} (choose from {', '.join(VAES)})")
        check_seed(self.seed, last_row + 1)
        return Settings(steps, guidance, ip_scale, self.scheduler, int(self.seed), self.vae)

    def resolved(self, rec: Reconstructor) -> "Settings":
        """Every setting given: the ones left out from the bundle's run defaults; all checked against the bundle
        (steps its scheduler can take, a VAE it has)."""
        d = rec.checked_settings(**{k: v for k, v in asdict(self).items() if k != "seed"})
        return replace(self, **{k: d[k] for k in ("steps", "guidance", "ip_scale", "scheduler", "vae")})


@dataclass
class Trials:
    """Rows of a voxel file, read and checked (numeric, finite, rank), not yet matched to a subject."""

    path: Path
    rows: list[int]                 # row numbers in the file: each image's name and seed offset
    voxels: np.ndarray | None       # (len(rows), V) float32; None: checked (scan_voxels), not held (a job's driver)
    digest: str | None = None       # the file's sha256 when it is already known

    @cached_property
    def sha256(self) -> str:
        """Of the whole file: the run record's identity of the input (read only when a record is kept)."""
        return self.digest or sha256_file(self.path)


def parse_trials(text: str | slice | None, what: str = "trials") -> slice | None:
    """"START:STOP" (either may be empty) -> slice; None -> all rows. `what` names the setting in errors."""
    if text is None or isinstance(text, slice):
        sel = text
    else:
        m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", str(text))
        if not m:
            raise InputError(f"{what} {text!r}: expected START:STOP, e.g. 0:10")
        sel = slice(int(m.group(1)) if m.group(1) else None, int(m.group(2)) if m.group(2) else None)
    if sel is None:
        return None
    if sel.step not in (None, 1) or (sel.start or 0) < 0 or (sel.stop is not None and sel.stop < 0):
        raise InputError(f"{what} {text!r}: START and STOP must be row numbers >= 0")
    if sel.stop is not None and sel.stop <= (sel.start or 0):
        raise InputError(f"{what} {text!r}: STOP must be greater than START")
    return slice(sel.start or 0, sel.stop)


def read_trials(path: str | Path, trials: str | slice | None = None) -> Trials:
    """The selected rows of a voxel file (one trial (V,) is row 0). Never unpickles; InputError if unusable.
    An .npy is memory-mapped: only the selected rows are read and converted."""
    path = Path(path)
    sel = parse_trials(trials)
    x = load_voxels(path, rows=sel)                        # (n, V) float32, checked
    first = sel.start if sel is not None else 0
    return Trials(path, list(range(first, first + len(x))), x)


def check_output(out: str | Path, n: int) -> Path:
    """`out` can take `n` images: a .png for one, else a directory (existing or creatable). Writes nothing."""
    out = Path(out)
    if out.suffix.lower() == ".png":
        if n != 1:
            raise InputError(f"{n} trials cannot go to one PNG ({out}); give a directory as --out")
        if out.is_dir():
            raise InputError(f"{out} is a directory; name a .png file or drop the .png suffix")
    elif out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory")
    check_writable(out / RUN_RECORD if out.is_dir() else out)
    return out


@dataclass
class Progress:
    """Where a batch is: reported once before the first image and after every denoising step."""

    done: int                       # images finished in this run
    todo: int                       # images this run makes
    skipped: int                    # images already in the output directory, left as they were
    step: int = 0                   # denoising steps done of the current image
    steps: int = 0
    denoised: int = 0               # images denoised in this run (low memory: ahead of `done` by up to a chunk)


@dataclass
class BatchResult:
    out: Path
    provider: str
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def run_record(rec: Reconstructor, trials: Trials, subject: str, settings: Settings) -> dict:
    """What makes a directory's images comparable: `key` must match for a rerun; `info` is for people."""
    return {"format": RECORD_FORMAT, "version": RECORD_VERSION,
            "key": {"bundle_manifest_sha256": rec.manifest.sha256, "provider": rec.provider, "subject": subject,
                    **asdict(settings), "voxels_sha256": trials.sha256, "nsdedge": __version__},
            "info": {"bundle": str(rec.path.resolve()), "voxels": str(trials.path.resolve())}}


def check_record(out: Path, key: dict, targets: list[Path]) -> bool:
    """True if `out` holds a run record agreeing with `key` on every field `key` has (before the bundle is open,
    a partial key: the voxels, the settings given, the version); InputError if it holds another run's record, or
    images and no record; False if there is no run yet."""
    path = Path(out) / RUN_RECORD
    if not path.exists():
        ours = [t.name for t in targets if t.exists()]
        if ours:
            raise InputError(f"{out} holds {ours[0]} but no {RUN_RECORD}: not images of an nsdedge run; "
                             f"choose another --out")
        return False
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        before = None
    if not isinstance(before, dict) or before.get("format") != RECORD_FORMAT or \
            not isinstance(before.get("key"), dict):
        raise InputError(f"{out} holds images of an earlier nsdedge (its {RUN_RECORD} names the bundle by path, "
                         f"not by model) or an unreadable record; choose another --out")
    want = json.loads(json_text(key))
    diff = [k for k in sorted(want) if want[k] != before["key"].get(k)]
    if diff:
        shown = ", ".join(f"{k} {before['key'].get(k)!r} -> {want.get(k)!r}" for k in diff[:3])
        raise InputError(f"{out} holds images made with other settings ({RUN_RECORD}: {shown}); "
                         f"choose another --out or delete it")
    return True


def check_job(trials: Trials, out: str | Path, settings: Settings) -> Settings:
    """All that can be checked before the bundle is opened: the settings, the output location, and an existing
    run record's agreement on the voxels, the settings given and the nsdedge version. Writes nothing."""
    settings = settings.checked(trials.rows[-1])
    out = check_output(out, len(trials.rows))
    if out.suffix.lower() == ".png":
        check_new_file(out, inputs=[trials.path], ours=is_nsdedge_png)
    if out.suffix.lower() != ".png" and out.is_dir():
        given = {k: v for k, v in asdict(settings).items() if v is not None}
        check_record(out, {**given, "voxels_sha256": trials.sha256, "nsdedge": __version__},
                     [out / f"{r:04d}.png" for r in trials.rows])
    return settings


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 as PNG, marked as nsdedge's (a tEXt "Software" chunk) so a later run may replace it."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", PNG_SOFTWARE)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def is_nsdedge_png(path: Path) -> bool:
    """A PNG that png_bytes wrote: its chunks before the image data are read, the image is never decoded."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            while len(head := f.read(8)) == 8:
                length, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind in (b"IDAT", b"IEND") or length > 1 << 20:
                    return False
                if kind == b"tEXt" and f.read(length) == b"Software\0" + PNG_SOFTWARE.encode("latin-1"):
                    return True
                f.seek(4 if kind == b"tEXt" else length + 4, 1)        # past the data (unless read) and the CRC
    except OSError:
        return False
    return False


def _png(path: Path, image: np.ndarray) -> None:
    atomic_write_bytes(path, png_bytes(image))


def reconstruct(bundle: str | Path | Reconstructor, voxels: str | Path | Trials, out: str | Path, *,
                subject: str | None = None, trials: str | slice | None = None, steps: int | None = None,
                guidance: float | None = None, ip_scale: float | None = None, scheduler: str | None = None,
                seed: int = 0, vae: str | None = None, provider: str = "auto", low_memory: bool = False,
                verify: bool = True, progress: Callable[[Progress], None] | None = None) -> BatchResult:
    """Reconstruct the selected rows of `voxels` into `out` (a directory, or a .png for one trial).

    `bundle`: a bundle directory (opened with `provider`, `low_memory`, `verify`) or an open Reconstructor.
    `voxels`: a voxel file with `trials` (START:STOP, default all), or Trials from read_trials. Settings left
    out (None) are the bundle's run defaults. Images already in `out` are kept. Everything is checked before the
    bundle is hashed and before anything is written; the run record is written with the first image."""
    if isinstance(voxels, Trials):
        if trials is not None:
            raise InputError("give trials to read_trials, or a voxel file with trials; not Trials and trials")
        tr = voxels
    else:
        tr = read_trials(voxels, trials)
    settings = check_job(tr, out, Settings(steps, guidance, ip_scale, scheduler, seed, vae))
    check_not_input(out, [bundle.path if isinstance(bundle, Reconstructor) else bundle])   # images in a bundle spoil it
    out = Path(out)
    single = out.suffix.lower() == ".png"
    targets = [out] if single else [out / f"{r:04d}.png" for r in tr.rows]
    rec = bundle if isinstance(bundle, Reconstructor) else Reconstructor(
        bundle, provider=provider, low_memory=low_memory, verify=verify)
    subject = rec.subject(subject)
    settings = settings.resolved(rec)
    if tr.voxels is None:
        raise InputError(f"{tr.path}: these trials were checked but not read; use read_trials")
    x = validate_voxels(tr.voxels, str(tr.path), rec.subjects[subject])
    record = None if single else run_record(rec, tr, subject, settings)
    resumed = not single and out.is_dir() and check_record(out, record["key"], targets)
    todo = [i for i, t in enumerate(targets) if single or not t.exists()]
    result = BatchResult(out, rec.provider, skipped=[] if single else [t for t in targets if t.exists()])
    if result.skipped:
        log.info("%d of %d images already in %s; skipping them", len(result.skipped), len(targets), out)
    if todo:            # the graphs open before the first progress line, so that a damaged one is the error alone
        for c in [rec.manifest.subjects[subject], *([] if rec.low_memory else ["unet", VAES[settings.vae]])]:
            rec.session(c)
    state = Progress(0, len(todo), len(result.skipped), 0, settings.steps)
    if progress:
        progress(state)

    def step(done: int, total: int) -> None:
        state.step = done
        if progress:
            progress(state)

    def write(i: int, image: np.ndarray) -> None:
        nonlocal resumed
        targets[i].parent.mkdir(parents=True, exist_ok=True)
        if record is not None and not resumed:         # with the first image: a failed start leaves nothing
            if not create_once(out / RUN_RECORD, json_text(record).encode()):
                check_record(out, record["key"], targets)    # another worker of the same job wrote it first
            resumed = True
        _png(targets[i], image)
        result.written.append(targets[i])
        state.done, state.step = state.done + 1, 0
        state.denoised = max(state.denoised, state.done)
        if progress:
            progress(state)

    run = dict(steps=settings.steps, guidance=settings.guidance, ip_scale=settings.ip_scale,
               scheduler=settings.scheduler, callback=step)
    try:
        if not rec.low_memory:                          # every graph open: one trial after another, end to end
            for i in todo:
                tokens = rec.decode(x[i:i + 1], subject, name=str(tr.path))
                write(i, rec.generate(tokens, seed=settings.seed + tr.rows[i], vae=settings.vae, **run)[0])
        else:                                           # stage-major: each graph loaded once per chunk of trials
            for start in range(0, len(todo), LOW_MEMORY_CHUNK):
                chunk = todo[start:start + LOW_MEMORY_CHUNK]
                with rec.keep(rec.manifest.subjects[subject]):   # row by row, as above: the same bytes
                    tokens = np.concatenate([rec.decode(x[i:i + 1], subject, name=str(tr.path)) for i in chunk])
                latents = []
                with rec.keep("unet"):
                    for j, i in enumerate(chunk):
                        latents.append(rec.denoise(tokens[j:j + 1], seed=settings.seed + tr.rows[i], **run))
                        state.denoised, state.step = state.denoised + 1, 0
                with rec.keep(VAES[settings.vae]):
                    for i, z in zip(chunk, latents):
                        write(i, rec.decode_latents(z, vae=settings.vae)[0])
    except OSError as e:
        raise NsdedgeError(f"{e.filename or out}: cannot write ({e.strerror})") from None
    return result
