"""The bundle on disk: manifest schema, checksums, atomic write. Standard library and numpy only.

A bundle is complete or absent: `BundleWriter` fills a temporary sibling directory and renames it
into place only after the manifest (with every file's size and sha256) has been written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from . import __version__
from .errors import BundleError, InputError, first_line

log = logging.getLogger(__name__)

FORMAT = "nsdedge-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CONSTANTS = "constants.npz"
ENGINES = "engines"              # TensorRT engines and onnxruntime's TensorRT caches, written by nsdedge
SUBJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")   # a subject name is part of a file name


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_plain_name(name: str) -> str:
    """File names in a manifest are plain names inside the bundle; anything else is refused."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\x00" in name or os.path.isabs(name)):
        raise BundleError(f"manifest names a file that is not a plain name inside the bundle: {name!r}")
    return name


def check_subject(name: str) -> str:
    """A subject names a bundle file (decoder-<subject>.onnx): letters, digits, '_', '.', '-', at most 64."""
    if not isinstance(name, str) or not SUBJECT.fullmatch(name):
        raise InputError(f"subject {name!r}: use letters, digits, '_', '.' or '-' (at most 64, no path separators), "
                         f"e.g. subj01")
    return name


def json_text(obj: Any) -> str:
    """Strict JSON (RFC 8259 has no NaN or Infinity): NaN -> null, +-inf -> "inf" / "-inf"."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(obj), indent=2, allow_nan=False) + "\n"


def _new_name(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[IO[bytes]]:
    """A binary file that becomes `path` (by a rename in the same directory) only when the block ends cleanly.

    The temporary file is created with mode 0666, which the kernel narrows by the process umask, so the result
    has the permissions of any file the user writes; the umask is never read or changed."""
    path = Path(path)
    while True:
        tmp = _new_name(path, ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def create_once(path: Path, data: bytes) -> bool:
    """Write `path` atomically only if it does not exist yet: False (nothing written) if it does, also when another
    process creates it at the same moment (a hard link from a complete temporary file never replaces a file; where
    the filesystem has no hard links, a rename after an existence check)."""
    path = Path(path)
    tmp = _new_name(path, ".once")
    atomic_write_bytes(tmp, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        if path.exists():
            return False
        os.replace(tmp, path)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename."""
    with atomic_writer(path) as f:
        f.write(data)


def check_writable(path: Path) -> None:
    """InputError unless `path` could be created: its nearest existing ancestor is a writable directory."""
    base = Path(path).absolute().parent
    while not base.exists():
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{path}: cannot write there ({base} is not a writable directory)")


MAX_RESOLUTION = 2048              # pixels per side a bundle is exported at: SD 1.5 makes 512; beyond, a trace takes
                                   # hours or all memory


def check_new_file(path: Path, *, inputs: Iterable[Path | None] = (), ours: Callable[[Path], bool] | None = None,
                   flag: str = "--out") -> Path:
    """Before any work: InputError unless nsdedge may write the file `path`. It must not be a directory, nor one of
    the command's `inputs` or inside an input directory (a bundle); its directory must be writable; and a file
    already there is replaced only if `ours(path)` recognises it as one nsdedge wrote (nsdedge never replaces
    what it did not write)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory; {flag} names a file")
    check_not_input(path, inputs, flag)
    check_writable(path)
    if (path.exists() or path.is_symlink()) and not (path.is_file() and not path.is_symlink() and ours and ours(path)):
        raise InputError(f"{path}: exists and is not a file nsdedge wrote, so nsdedge will not replace it; move it "
                         f"away or choose another {flag}")
    return path


def check_not_input(path: Path, inputs: Iterable[Path | None], flag: str = "--out") -> None:
    """InputError if `path` is one of `inputs` (the same file by any name) or lies inside an input directory."""
    where = Path(path).resolve()
    for given in filter(None, inputs):
        src = Path(given)
        if not src.exists():
            continue
        if (where.exists() and os.path.samefile(where, src)) or (src.is_dir() and where.is_relative_to(src.resolve())):
            raise InputError(f"{path}: is {'inside ' * src.is_dir()}an input of this command ({given}); "
                             f"choose another {flag}")


def is_nsdedge_json(path: Path) -> bool:
    """A JSON report nsdedge wrote (bench, eval): an object with its "nsdedge_version" (or, from before that
    was written, a "command" that ran nsdedge)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):         # RecursionError: JSON nested too deep
        return False
    return isinstance(d, dict) and ("nsdedge_version" in d or "nsdedge" in str(d.get("command", "")))


def is_bundle(path: Path) -> bool:
    """True if `path` is a directory whose manifest says it is an nsdedge bundle (no other check)."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, RecursionError, AttributeError):
        return False


def check_replaceable(out: Path) -> None:
    """`--force` replaces a bundle, never anything else: raise BundleError unless `out` is absent or an nsdedge
    bundle holding only what nsdedge wrote (its manifest's files, the manifest and engines/)."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir() or not is_bundle(out):
        raise BundleError(f"{out} exists and is not an nsdedge bundle (no {MANIFEST} of format {FORMAT}); "
                          f"nsdedge replaces only bundles it wrote: choose another --out")
    try:
        files = json.loads((out / MANIFEST).read_text()).get("files", {})
        files = files if isinstance(files, dict) else {}
        others = sorted(p.name for p in out.iterdir() if p.name not in {MANIFEST, ENGINES, *files})
        # a file the manifest names counts as nsdedge's only if it is still the bytes nsdedge wrote
        others += sorted(name for name, info in files.items() if (out / name).exists() and not (
            (out / name).is_file() and not (out / name).is_symlink() and isinstance(info, dict)
            and (out / name).stat().st_size == info.get("size") and sha256_file(out / name) == info.get("sha256")))
    except OSError as e:
        raise BundleError(f"{out}: cannot read the existing bundle ({e.strerror})") from None
    if others:
        raise BundleError(f"{out} holds files that are not the bundle's as nsdedge wrote them ({', '.join(others[:3])}"
                          f"{', ...' if len(others) > 3 else ''}); move them away or choose another --out")


@dataclass
class Component:
    """One graph of the bundle, as the manifest describes it."""

    name: str
    file: str
    precision: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    source: str
    data_files: list[str] = field(default_factory=list)
    parity: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = {"file": self.file, "data_files": self.data_files, "precision": self.precision,
             "inputs": self.inputs, "outputs": self.outputs, "source": self.source, "parity": self.parity}
        d.update(self.extra)
        return d

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> "Component":
        known = {"file", "data_files", "precision", "inputs", "outputs", "source", "parity"}
        try:
            return cls(name=name, file=check_plain_name(d["file"]), precision=d["precision"],
                       inputs=d["inputs"], outputs=d["outputs"], source=d["source"],
                       data_files=[check_plain_name(x) for x in d.get("data_files", [])],
                       parity=d.get("parity", {}), extra={k: v for k, v in d.items() if k not in known})
        except (KeyError, TypeError) as e:
            raise BundleError(f"manifest component {name!r} is malformed: missing or bad {e}") from None


@dataclass
class Manifest:
    """What `manifest.json` holds; `files` maps every file of the bundle to its size and sha256."""

    image_size: tuple[int, int]
    latent_channels: int
    vae_scale_factor: int          # spatial: image side / latent side (8 for SD 1.5, less for tiny VAEs)
    vae_scaling_factor: float      # latent scaling: SD 1.5's 0.18215
    scheduler_config: dict[str, Any]
    prompt: str
    negative_prompt: str
    precision: str
    components: dict[str, Component]
    source: dict[str, Any]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    nsdedge_version: str = __version__
    schema_version: int = SCHEMA_VERSION
    sha256: str = ""               # of manifest.json as read: names the whole bundle (every file's hash is in it)

    @property
    def latent_size(self) -> tuple[int, int]:
        return (self.image_size[0] // self.vae_scale_factor, self.image_size[1] // self.vae_scale_factor)

    @property
    def subjects(self) -> dict[str, str]:
        """subject name -> decoder component name."""
        return {c.extra["subject"]: n for n, c in self.components.items() if "subject" in c.extra}

    def to_json(self) -> dict[str, Any]:
        d = {"format": FORMAT, "schema_version": self.schema_version, "nsdedge_version": self.nsdedge_version,
             "image_size": list(self.image_size), "latent_channels": self.latent_channels,
             "vae_scale_factor": self.vae_scale_factor, "vae_scaling_factor": self.vae_scaling_factor,
             "scheduler_config": self.scheduler_config, "prompt": self.prompt,
             "negative_prompt": self.negative_prompt, "precision": self.precision,
             "components": {n: c.to_json() for n, c in self.components.items()},
             "constants": CONSTANTS, "source": self.source, "files": self.files}
        d.update(self.extra)
        return d

    @classmethod
    def from_json(cls, d: Any) -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise BundleError(f"not an nsdedge bundle manifest (format {d.get('format') if isinstance(d, dict) else None!r})")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise BundleError(f"bundle schema version {d.get('schema_version')!r} is not supported "
                              f"(this nsdedge reads version {SCHEMA_VERSION}); re-export the bundle")
        known = {"format", "schema_version", "nsdedge_version", "image_size", "latent_channels",
                 "vae_scale_factor", "vae_scaling_factor", "scheduler_config", "prompt", "negative_prompt",
                 "precision", "components", "constants", "source", "files"}
        try:
            files = {check_plain_name(k): _file_entry(k, v) for k, v in d["files"].items()}
            return cls(image_size=tuple(int(x) for x in d["image_size"]), latent_channels=int(d["latent_channels"]),
                       vae_scale_factor=int(d["vae_scale_factor"]), vae_scaling_factor=float(d["vae_scaling_factor"]),
                       scheduler_config=dict(d["scheduler_config"]), prompt=d["prompt"],
                       negative_prompt=d["negative_prompt"], precision=d["precision"],
                       components={n: Component.from_json(n, c) for n, c in d["components"].items()},
                       source=d.get("source", {}), files=files, nsdedge_version=d.get("nsdedge_version", "?"),
                       extra={k: v for k, v in d.items() if k not in known})._checked()
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"bundle manifest is malformed: {type(e).__name__}: {e}") from None

    def _checked(self) -> "Manifest":
        """The values the runtime computes with, in range (the checksums prove the files, not the manifest)."""
        def bad(what: str) -> None:
            raise BundleError(f"bundle manifest is malformed: {what}")
        if len(self.image_size) != 2 or min(self.image_size) < 1 or self.vae_scale_factor < 1 \
                or any(side % self.vae_scale_factor for side in self.image_size):
            bad(f"image_size {list(self.image_size)} must be two positive multiples of vae_scale_factor "
                f"{self.vae_scale_factor}")
        if self.latent_channels < 1 or not (math.isfinite(self.vae_scaling_factor) and self.vae_scaling_factor > 0):
            bad(f"latent_channels {self.latent_channels} and vae_scaling_factor {self.vae_scaling_factor} must be "
                f"positive")
        problem = schedule_problem(self.scheduler_config)
        if problem:
            bad(problem)
        # what every bundle runs: a UNet taking the latent, the timestep, the text and the ip tokens, and a VAE
        ports = {"unet": {"sample", "timestep", "encoder_hidden_states", "ip_tokens"}, "vae_decoder": {"latent"},
                 "taesd_decoder": {"latent"}}
        if "unet" not in self.components or not {"vae_decoder", "taesd_decoder"} & set(self.components):
            bad(f"components {sorted(self.components)} must include unet and vae_decoder (or taesd_decoder)")
        for name, c in self.components.items():
            if not isinstance(c.parity, dict) or not all(isinstance(p, dict) and "name" in p
                                                         for p in [*c.inputs, *c.outputs]):
                bad(f"component {name!r}: parity must be an object, inputs and outputs lists of named ports")
            voxels = c.extra.get("voxels")
            if "subject" in c.extra and (not isinstance(c.extra["subject"], str) or type(voxels) is not int
                                         or voxels < 1):
                bad(f"component {name!r}: a decoder needs a subject name and a whole number of voxels")
            missing = sorted(ports.get(name, set()) - {p["name"] for p in c.inputs})
            if missing:
                bad(f"component {name!r} has no input {missing[0]!r}")
            sample = next((p.get("shape") for p in c.inputs if p["name"] in ("sample", "latent")), None)
            if isinstance(sample, list) and len(sample) > 1 and isinstance(sample[1], int) \
                    and sample[1] != self.latent_channels:
                bad(f"component {name!r} takes {sample[1]} latent channels, latent_channels says "
                    f"{self.latent_channels}")
        run = self.extra.get("run_defaults", {})
        kinds = {"steps": int, "guidance": (int, float), "ip_scale": (int, float), "scheduler": str, "vae": str}
        if not isinstance(run, dict) or not all(k in kinds and isinstance(v, kinds[k]) and not isinstance(v, bool)
                                                and (not isinstance(v, float) or math.isfinite(v))
                                                for k, v in run.items()) or run.get("steps", 1) < 1:
            bad(f"run_defaults {run!r} must map steps, guidance, ip_scale, scheduler, vae to values of their kind")
        return self


def schedule_problem(cfg: dict) -> str | None:
    """What is wrong with a diffusers scheduler config for nsdedge's schedulers, or None: the noise schedule they
    compute from it must have one alpha_bar per training timestep, finite, falling and in (0, 1)."""
    import numpy as np

    from .runtime.schedulers import alphas_cumprod

    n_train = cfg.get("num_train_timesteps", 1000)
    if type(n_train) is not int or not 2 <= n_train <= 100_000:
        return f"scheduler_config num_train_timesteps {n_train!r} must be a whole number in [2, 100000]"
    for k, default in (("beta_start", 0.0001), ("beta_end", 0.02)):
        v = cfg.get(k, default)
        if type(v) not in (int, float) or not 0 < v < 1:
            return f"scheduler_config {k} {v!r} must be a number in (0, 1)"
    try:
        with np.errstate(all="ignore"):
            ac = alphas_cumprod(cfg)
        int(cfg.get("steps_offset", 0))
    except (TypeError, ValueError, OverflowError) as e:
        return f"scheduler_config: {first_line(e)}"
    if len(ac) != n_train or not np.all((ac > 0) & (ac < 1)) or not np.all(np.diff(ac) < 0):
        return (f"scheduler_config {({k: cfg[k] for k in cfg if 'beta' in k})!r} must give one alpha_bar per "
                f"training timestep, falling and in (0, 1)")
    return None


def _file_entry(name: str, entry: Any) -> dict[str, Any]:
    """A `files` entry: {"size": bytes, "sha256": 64 hex digits}."""
    if (not isinstance(entry, dict) or type(entry.get("size")) is not int or entry["size"] < 0
            or not isinstance(entry.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
        raise BundleError(f"bundle manifest is malformed: files[{name!r}] must be {{\"size\": bytes, \"sha256\": hex}}")
    return entry


def read_manifest(bundle: Path, verify: bool = True) -> Manifest:
    """Read and check a bundle: schema version, every file present with its size, and its sha256 if `verify`."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: " + ("is a file, not a bundle directory" if bundle.exists()
                                            else "bundle directory does not exist"))
    try:
        text = path.read_bytes()
        raw = json.loads(text)
    except FileNotFoundError:
        raise BundleError(f"{bundle}: no {MANIFEST} (not a bundle, or an export that did not finish)") from None
    except (OSError, ValueError, RecursionError) as e:
        raise BundleError(f"{path}: unreadable manifest: {e}") from None
    try:
        m = Manifest.from_json(raw)
    except BundleError as e:
        raise BundleError(f"{path}: {e}") from None
    m.sha256 = hashlib.sha256(text).hexdigest()
    needed = {CONSTANTS} | {f for c in m.components.values() for f in [c.file, *c.data_files]}
    missing = sorted(needed - set(m.files))
    if missing:
        raise BundleError(f"{bundle}: manifest has no checksum for {', '.join(missing)}")
    for name, info in m.files.items():
        p = bundle / name
        if p.is_symlink():      # a bundle holds its own files; a link could point anywhere
            raise BundleError(f"{bundle}: {name} is a symbolic link; a bundle holds plain files only")
        if not p.is_file():
            raise BundleError(f"{bundle}: missing file {name}")
        size = p.stat().st_size
        if size != info.get("size"):
            raise BundleError(f"{bundle}: {name} has {size} bytes, manifest says {info.get('size')}")
        if verify and sha256_file(p) != info.get("sha256"):
            raise BundleError(f"{bundle}: {name} fails its sha256 checksum (corrupted or modified)")
    return m


class BundleWriter:
    """Fill `tmp` (a sibling of `out`), then `commit(manifest)` hashes every file and renames into place.

    Used as a context manager: leaving it with an exception, or without commit, removes `tmp`. With `force`, an
    existing `out` is replaced only if it is an nsdedge bundle (check_replaceable); anything else is refused.
    """

    def __init__(self, out: Path, force: bool = False):
        self.out = Path(os.path.abspath(out))         # (.. resolved: the parents made are the real ones)
        if self.out.exists() or self.out.is_symlink():
            if not force:
                raise BundleError(f"{self.out} exists; pass --force to replace it")
            check_replaceable(self.out)
        self.made = [p for p in self.out.parents if not p.exists()]   # created here: removed again on failure
        self.out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            self.tmp = _new_name(self.out, ".partial")
            try:
                self.tmp.mkdir(0o777)            # narrowed by the umask like any directory the user makes
                break
            except FileExistsError:
                continue
        self.force = force
        self.committed = False

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
            for p in self.made:                  # deepest first; only while still empty (nothing of anyone's)
                try:
                    p.rmdir()
                except OSError:
                    break

    def write_manifest(self, manifest: Manifest) -> None:
        """Hash every file now in `tmp` and write the manifest there (the bundle is then readable in place)."""
        path = self.tmp / MANIFEST
        path.write_text("{}")                    # created with the user's usual file mode
        mode = stat.S_IMODE(path.stat().st_mode)
        manifest.files = {}
        for p in sorted(self.tmp.iterdir()):
            if p.is_file() and p.name != MANIFEST:
                os.chmod(p, mode)                # some writers (onnxruntime's quantizer) create files 0600
                manifest.files[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        path.write_text(json_text(manifest.to_json()))

    def commit(self, manifest: Manifest) -> Path:
        self.write_manifest(manifest)
        old = None
        if self.out.exists() or self.out.is_symlink():
            if not self.force:
                raise BundleError(f"{self.out} appeared during export; pass --force to replace it")
            check_replaceable(self.out)          # again: it may have changed during a long export
            old = _new_name(self.out, ".old")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        log.info("bundle written to %s", self.out)
        return self.out
