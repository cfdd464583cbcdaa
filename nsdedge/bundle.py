"""The bundle on disk: manifest schema, checksums, atomic write. Standard library and numpy only.

A bundle is complete or absent: `BundleWriter` fills a temporary sibling directory and renames it
into place only after the manifest (with every file's size and sha256) has been written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import BundleError

log = logging.getLogger(__name__)

FORMAT = "nsdedge-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CONSTANTS = "constants.npz"


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())        # mkstemp makes 0600; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
            files = {check_plain_name(k): v for k, v in d["files"].items()}
            return cls(image_size=tuple(int(x) for x in d["image_size"]), latent_channels=int(d["latent_channels"]),
                       vae_scale_factor=int(d["vae_scale_factor"]), vae_scaling_factor=float(d["vae_scaling_factor"]),
                       scheduler_config=dict(d["scheduler_config"]), prompt=d["prompt"],
                       negative_prompt=d["negative_prompt"], precision=d["precision"],
                       components={n: Component.from_json(n, c) for n, c in d["components"].items()},
                       source=d.get("source", {}), files=files, nsdedge_version=d.get("nsdedge_version", "?"),
                       extra={k: v for k, v in d.items() if k not in known})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"bundle manifest is malformed: {type(e).__name__}: {e}") from None


def read_manifest(bundle: Path, verify: bool = True) -> Manifest:
    """Read and check a bundle: schema version, every file present with its size, and its sha256 if `verify`."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: bundle directory does not exist")
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{bundle}: no {MANIFEST} (not a bundle, or an export that did not finish)") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: unreadable manifest: {e}") from None
    m = Manifest.from_json(raw)
    needed = {CONSTANTS} | {f for c in m.components.values() for f in [c.file, *c.data_files]}
    missing = sorted(needed - set(m.files))
    if missing:
        raise BundleError(f"{bundle}: manifest has no checksum for {', '.join(missing)}")
    for name, info in m.files.items():
        p = bundle / name
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

    Used as a context manager: leaving it with an exception, or without commit, removes `tmp`.
    """

    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out).absolute()
        if self.out.exists() and not force:
            raise BundleError(f"{self.out} exists; pass --force to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".partial", dir=self.out.parent))
        os.chmod(self.tmp, 0o777 & ~_umask())    # mkdtemp makes 0700; a bundle is as readable as any directory
        self.force = force
        self.committed = False

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def write_manifest(self, manifest: Manifest) -> None:
        """Hash every file now in `tmp` and write the manifest there (the bundle is then readable in place)."""
        manifest.files = {}
        umask = _umask()
        for p in sorted(self.tmp.iterdir()):
            if p.is_file() and p.name != MANIFEST:
                os.chmod(p, 0o666 & ~umask)      # some writers (onnxruntime's quantizer) create files 0600
                manifest.files[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        (self.tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")

    def commit(self, manifest: Manifest) -> Path:
        self.write_manifest(manifest)
        old = None
        if self.out.exists():
            if not self.force:
                raise BundleError(f"{self.out} appeared during export; pass --force to replace it")
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        log.info("bundle written to %s", self.out)
        return self.out

