"""A reconstruction job: a list of work (voxel files, subjects, trial ranges, seeds) with run settings, run in this
process (`local`) or on a Ray cluster (`ray`, Ray Data with an actor pool), writing the same bytes either way.

    from nsdedge.jobs import Job, Work, run_job
    job = Job("bundle/", [Work("nsd_test_fmriavg_nsdgeneral_sub1.npy", "subj01", out="recons/subj01"),
                          Work("nsd_test_fmriavg_nsdgeneral_sub2.npy", "subj02", out="recons/subj02")],
              steps=20)
    result = run_job(job, backend="ray", actors=4, gpus_per_actor=0.5)

Every image is written by runtime/batch.py's `reconstruct` (row r of a work's voxel file -> `{r:04d}.png` with seed
+ r, atomically, a run record per output directory), whichever backend calls it; so any split of the rows, on any
number of actors in any order, gives the bytes of one local run. Everything is checked in the driver before
anything is written: the bundle (hashed once), every voxel file (scanned in row chunks, never held whole), every
output directory and its run record. Finished images are skipped, so a rerun after a lost worker or an interrupted
job does only what is missing. On Ray, a worker that dies is replaced by Ray Data (actors restart, their batches
are retried); rows whose reconstruction raised an NsdedgeError are collected as failed (run_job returns them, the
CLI ends with one line: run it again); any other error stops the job in one line, keeping what was written.

Ray actors read their rows from the voxel files and write the images themselves: voxel files, the bundle and the
output directories must be on a filesystem every node sees (NFS, Lustre, a single machine).

Bytes and threads: onnxruntime's CPU kernels split some sums across threads, so the same trial computed with
another number of intra-op threads can differ by 1/255 in a few pixels. `threads` fixes it for both backends
(Ray's default: each actor's CPUs, 1 unless cpus_per_actor says more); equal threads give equal bytes, whatever the
number of actors or the order in which batches finish. GPU providers do not depend on it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .errors import InputError, NsdedgeError, first_line

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray")
RAY_INSTALL = "pip install 'nsdedge[ray]'"


@dataclass(frozen=True)
class Work:
    """Rows of one voxel file for one subject, written to `out` (a directory)."""

    voxels: str | Path
    subject: str | None = None
    out: str | Path = "reconstructions"
    trials: str | slice | None = None      # START:STOP, default all rows
    seed: int | None = None                # default: the job's


@dataclass
class Job:
    bundle: str | Path
    work: list[Work]
    steps: int | None = None
    guidance: float | None = None
    ip_scale: float | None = None
    scheduler: str | None = None
    vae: str | None = None
    seed: int = 0
    provider: str = "auto"
    threads: int | None = None    # inference threads per process / actor (None: local all cores, Ray its CPUs)


@dataclass
class JobResult:
    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, int, str]] = field(default_factory=list)   # (output directory, row, why)
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)
    provider: str = ""

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Checked:
    """A work item as the driver checked it: rows still to make, and what the run record must agree with."""

    work: Work
    out: Path
    subject: str
    rows: list[int]
    todo: list[int]
    digest: str
    seed: int


def read_job(path: str | Path) -> Job:
    """A job file (JSON): {"bundle": ..., "settings": {...}, "work": [{"voxels", "subject", "out", "trials",
    "seed"}, ...]}; relative paths are relative to the file. Never executes or unpickles anything."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"{path}: not a readable JSON job file ({first_line(e)})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("work"), list) or not spec["work"]:
        raise InputError(f"{path}: a job file is an object with a non-empty list \"work\"")
    unknown = set(spec) - {"bundle", "settings", "work", "provider"}
    if unknown:
        raise InputError(f"{path}: unknown key {sorted(unknown)[0]!r} (a job has bundle, settings, work, provider)")
    settings = spec.get("settings", {})
    kinds = {"steps": int, "guidance": (int, float), "ip_scale": (int, float), "scheduler": str, "vae": str,
             "seed": int, "threads": int}
    if not isinstance(settings, dict) or any(k not in kinds for k in settings):
        raise InputError(f"{path}: \"settings\" takes {', '.join(kinds)}")
    for k, v in settings.items():
        if isinstance(v, bool) or not isinstance(v, kinds[k]):
            raise InputError(f"{path}: settings.{k} is {v!r}, not a {getattr(kinds[k], '__name__', 'number')}")
    base = path.parent

    def where(p) -> Path:
        return p if Path(p).is_absolute() else base / p
    work = []
    for i, w in enumerate(spec["work"]):
        if not isinstance(w, dict) or "voxels" not in w or set(w) - {"voxels", "subject", "out", "trials", "seed"}:
            raise InputError(f"{path}: work[{i}] must be an object with \"voxels\" and optionally subject, out, "
                             f"trials, seed")
        if not all(isinstance(w.get(k), str) for k in ("voxels", "subject", "out", "trials") if k in w):
            raise InputError(f"{path}: work[{i}]: voxels, subject, out and trials are strings")
        work.append(Work(where(w["voxels"]), w.get("subject"), where(w.get("out", w.get("subject") or f"work{i}")),
                         w.get("trials"), w.get("seed")))
    bundle, provider = spec.get("bundle"), spec.get("provider", "auto")
    if not isinstance(bundle, (str, type(None))) or not isinstance(provider, str):
        raise InputError(f"{path}: \"bundle\" and \"provider\" are strings")
    return Job(where(bundle) if bundle else None, work, provider=provider, **settings)


def check_inputs(job: Job) -> list[tuple]:
    """What can be checked without the bundle: the settings, every voxel file (scanned in row chunks), every output
    directory and the run record it may hold (voxels, settings given, version). Writes nothing."""
    from .runtime.batch import Settings, Trials, check_job, parse_trials
    from .runtime.session import PROVIDER_NAMES
    from .voxels import scan_voxels

    if not job.work:
        raise InputError("a job needs at least one work item")
    if job.provider not in PROVIDER_NAMES:
        raise InputError(f"unknown provider {job.provider!r} (choose from {', '.join(PROVIDER_NAMES)})")
    if job.threads is not None and (isinstance(job.threads, bool) or not isinstance(job.threads, int)
                                    or job.threads < 1):
        raise InputError(f"threads must be a whole number >= 1, got {job.threads!r}")
    settings = Settings(job.steps, job.guidance, job.ip_scale, job.scheduler, job.seed, job.vae)
    outs = [Path(w.out).resolve() for w in job.work]
    if len(set(outs)) != len(outs):
        raise InputError(f"two work items write to {next(o for o in outs if outs.count(o) > 1)}: give each its own out")
    scanned = []
    for w in job.work:                                      # files and settings first: before the bundle is hashed
        if Path(w.out).suffix.lower() == ".png":
            raise InputError(f"{w.out}: a job writes directories of images, not one .png")
        rows, voxels = scan_voxels(w.voxels, parse_trials(w.trials, "trials"))
        seed = job.seed if w.seed is None else w.seed
        tr = Trials(Path(w.voxels), rows, None)
        check_job(tr, w.out, replace(settings, seed=seed))
        scanned.append((w, tr, seed, voxels))
    return scanned


def check(job: Job) -> tuple[list[_Checked], object, object]:
    """Everything checkable before any graph is opened, across all work; writes nothing. Returns the checked work,
    the settings resolved against the bundle's run defaults (batch.Settings) and the bundle's manifest."""
    from .bundle import check_not_input
    from .runtime.batch import Settings, check_record
    from .runtime.pipeline import Reconstructor

    scanned = check_inputs(job)
    if job.bundle is None:
        raise InputError("a job needs a bundle")
    settings = Settings(job.steps, job.guidance, job.ip_scale, job.scheduler, job.seed, job.vae)
    rec = Reconstructor(job.bundle, provider="cpu")          # the manifest, every file hashed once; no graph opened
    resolved = settings.checked().resolved(rec)
    checked = []
    for w, tr, seed, voxels in scanned:
        subject = rec.subject(w.subject)
        if voxels != rec.subjects[subject]:
            raise InputError(f"{w.voxels}: {voxels} voxels per trial, the decoder of {subject} expects "
                             f"{rec.subjects[subject]}")
        out = Path(w.out)
        check_not_input(out, [job.bundle])
        targets = [out / f"{r:04d}.png" for r in tr.rows]
        if out.is_dir():             # an earlier run there: the same bundle, subject, voxels, settings (the provider
            key = {"bundle_manifest_sha256": rec.manifest.sha256, "subject": subject,    # is checked where it runs)
                   **vars(replace(resolved, seed=seed)), "voxels_sha256": tr.sha256}
            check_record(out, key, targets)
        todo = [r for r, t in zip(tr.rows, targets) if not t.exists()]
        checked.append(_Checked(w, out, subject, tr.rows, todo, tr.sha256, seed))
    return checked, resolved, rec.manifest


def _settings_kw(settings) -> dict:
    return {k: getattr(settings, k) for k in ("steps", "guidance", "ip_scale", "scheduler", "vae")}


def run_job(job: Job, backend: str = "local", *, actors: int = 1, gpus_per_actor: float = 0.0,
            cpus_per_actor: float | None = None, ray_address: str | None = None, batch_size: int = 4,
            progress: Callable[[int, int], None] | None = None) -> JobResult:
    """Run `job` in this process (`local`) or on Ray (`ray`: `actors` workers, each holding the bundle's sessions,
    `batch_size` trials per call). `progress(done, todo)` after every image (local) or batch (ray)."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend == "ray":
        _require_ray()
        if actors < 1 or batch_size < 1 or gpus_per_actor < 0 or (cpus_per_actor is not None and cpus_per_actor <= 0):
            raise InputError("--actors and the batch size must be >= 1, GPUs and CPUs per actor positive")
    checked, settings, manifest = check(job)
    result = JobResult(skipped=sum(len(c.rows) - len(c.todo) for c in checked), outputs=[c.out for c in checked])
    todo = sum(len(c.todo) for c in checked)
    t0 = time.perf_counter()
    if progress:
        progress(0, todo)
    if todo:
        run = _run_local if backend == "local" else _run_ray
        run(job, checked, settings, manifest, result, progress, todo, actors=actors, gpus_per_actor=gpus_per_actor,
            cpus_per_actor=cpus_per_actor, ray_address=ray_address, batch_size=batch_size)
    result.seconds = time.perf_counter() - t0
    return result


LOCAL_CHUNK = 64                     # rows read per call: memory stays flat however long the voxel file


def _run_local(job, checked, settings, manifest, result, progress, todo, **_) -> None:
    from .runtime.batch import Trials, reconstruct
    from .runtime.pipeline import Reconstructor
    from .voxels import load_voxels

    rec = Reconstructor(job.bundle, provider=job.provider, verify=False, threads=job.threads)    # hashed by check()
    if rec.manifest.sha256 != manifest.sha256:
        raise NsdedgeError(f"{job.bundle} changed while the job started; run it again")
    result.provider = rec.provider
    done = 0

    def step(p) -> None:
        if progress and p.done:
            progress(done + p.done, todo)
    for c in checked:
        for run in _runs(c.todo, LOCAL_CHUNK):
            x = load_voxels(c.work.voxels, rows=slice(run[0], run[-1] + 1))
            tr = Trials(Path(c.work.voxels), run, x, c.digest)
            r = reconstruct(rec, tr, c.out, subject=c.subject, seed=c.seed, progress=step, **_settings_kw(settings))
            done += len(r.written)
            result.written += len(r.written)
            result.skipped += len(r.skipped)


def _runs(rows: list[int], limit: int) -> list[list[int]]:
    """Consecutive rows in runs of at most `limit` (one contiguous read each)."""
    out: list[list[int]] = []
    for r in rows:
        if out and r == out[-1][-1] + 1 and len(out[-1]) < limit:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (ray[data]: pyarrow, pandas)
    except ImportError as e:
        raise NsdedgeError(f"--backend ray needs Ray Data ({e.name} is missing): {RAY_INSTALL}") from None
    return ray


class Shard:
    """A Ray actor: opens the bundle once, then reconstructs batches of (work, row) through batch.reconstruct."""

    def __init__(self, bundle: str, provider: str, manifest_sha256: str, work: list[dict], settings: dict,
                 threads: int | None):
        from .runtime.pipeline import Reconstructor

        self.rec = Reconstructor(bundle, provider=provider, verify=False, threads=threads)
        if self.rec.manifest.sha256 != manifest_sha256:
            raise NsdedgeError(f"{bundle} on this node is not the bundle the job was started with")
        self.work, self.settings = work, settings

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from .runtime.batch import Trials, reconstruct
        from .voxels import load_voxels

        out = {"work": [], "row": [], "status": [], "error": []}
        for i in sorted(set(int(w) for w in batch["work"])):
            w = self.work[i]
            rows = sorted(int(r) for r, k in zip(batch["row"], batch["work"]) if int(k) == i)
            for run in _runs(rows, len(rows)):
                try:
                    x = load_voxels(w["voxels"], rows=slice(run[0], run[-1] + 1))
                    tr = Trials(Path(w["voxels"]), run, x, w["digest"])
                    r = reconstruct(self.rec, tr, w["out"], subject=w["subject"], seed=w["seed"], **self.settings)
                    written = {p.name for p in r.written}
                    status = ["written" if f"{row:04d}.png" in written else "skipped" for row in run]
                    error = [""] * len(run)
                except NsdedgeError as e:             # reported per row; the driver stops with one line
                    status, error = ["failed"] * len(run), [str(e)] * len(run)
                out["work"] += [i] * len(run)
                out["row"] += run
                out["status"] += status
                out["error"] += error
        out["provider"] = [self.rec.provider] * len(out["row"])
        return {k: np.asarray(v) for k, v in out.items()}


# Environment variables a Ray actor gets from the driver (runtime_env), where the driver has them: a Ray cluster
# started elsewhere starts its workers with the nodes' environment, not the driver's, and onnxruntime reads this one
# as it starts (README: Privacy)
ACTOR_ENV = ("ORT_DISABLE_TELEMETRY",)


def _actor_env() -> dict:
    env = {k: os.environ[k] for k in ACTOR_ENV if k in os.environ}
    return {"runtime_env": {"env_vars": env}} if env else {}


def _run_ray(job, checked, settings, manifest, result, progress, todo, *, actors, gpus_per_actor, cpus_per_actor,
             ray_address, batch_size) -> None:
    ray = _require_ray()
    started = False
    try:
        if not ray.is_initialized():      # a Ray of our own (or RAY_ADDRESS / ray_address); its start notices: errors
            ray.init(address=ray_address, include_dashboard=False, logging_level=logging.ERROR)
            started = True
        cpus = cpus_per_actor if cpus_per_actor is not None else 1.0
        work = [{"voxels": str(Path(c.work.voxels).absolute()), "subject": c.subject, "out": str(c.out.absolute()),
                 "seed": c.seed, "digest": c.digest} for c in checked]
        items = [{"work": i, "row": r} for i, c in enumerate(checked) for r in c.todo]
        actors = min(actors, len(items))
        blocks = min(len(items), max(actors, -(-len(items) // batch_size)))    # every actor gets work
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds.context.enable_progress_bars = False
        ds = ds.map_batches(
            Shard, batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus_per_actor or None, num_cpus=cpus,
            **_actor_env(),
            fn_constructor_kwargs={"bundle": str(Path(job.bundle).absolute()), "provider": job.provider,
                                   "manifest_sha256": manifest.sha256, "work": work,
                                   "settings": _settings_kw(settings),
                                   "threads": job.threads or max(1, int(cpus))})
        done = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, row, status, error, provider in zip(batch["work"], batch["row"], batch["status"], batch["error"],
                                                       batch["provider"]):
                result.provider = str(provider)
                if status == "written":
                    result.written += 1
                elif status == "skipped":
                    result.skipped += 1
                else:
                    result.failed.append((str(checked[int(i)].out), int(row), str(error)))
                done += 1
            if progress:
                progress(done, todo)
    except Exception as e:  # noqa: BLE001  Ray wraps worker failures in its own exception types
        if isinstance(e, NsdedgeError):
            raise
        log.debug("the Ray job stopped", exc_info=True)
        cause = getattr(e, "cause", None) or e
        msg = str(cause).strip().splitlines()
        raise NsdedgeError(f"the Ray job stopped ({type(cause).__name__}: {msg[-1] if msg else ''}); finished "
                           f"images are kept: run it again to make the rest") from None
    finally:
        if started:
            ray.shutdown()
