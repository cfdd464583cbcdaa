"""Weights named by Hugging Face hub id, found in the local Hugging Face cache only: nsdedge never downloads.

    --sd stable-diffusion-v1-5/stable-diffusion-v1-5
    --ip-adapter h94/IP-Adapter:models/ip-adapter-plus_sd15.safetensors
    --image-encoder h94/IP-Adapter:models/image_encoder
    --lora latent-consistency/lcm-lora-sdv1-5            (its pytorch_lora_weights.safetensors)
    --tiny-vae madebyollin/taesd@main

An id is ORG/NAME, optionally @REVISION (branch, tag or commit) and :PATH inside the repository. A path that
exists on disk is always a path. The cache is Hugging Face's (`HF_HUB_CACHE`, or `HF_HOME`/hub, or
~/.cache/huggingface/hub), read through huggingface_hub with local_files_only; what is missing there is a one-line
error with the `hf download` command that fetches exactly what is needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.\-/]+?))?(?::(?P<path>.*))?")

# What each kind of weights needs from a repository, relative to the folder an id names: `need`, the files checked;
# `include`, the patterns of the download command. A file kind takes `default` when an id names no file.
SD15_CONFIGS = ("scheduler/scheduler_config.json", "text_encoder/config.json", "tokenizer/tokenizer_config.json",
                "unet/config.json", "vae/config.json")
SD15_WEIGHTS = ("text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors")
SD15_INCLUDE = ("model_index.json", "scheduler/*", "tokenizer/*", "text_encoder/config.json", "unet/config.json",
                "vae/config.json")
KINDS = {
    "sd": {"need": SD15_CONFIGS + SD15_WEIGHTS, "include": SD15_INCLUDE + SD15_WEIGHTS},
    "sd_config": {"need": SD15_CONFIGS, "include": SD15_INCLUDE},
    "image_encoder": {"need": ("config.json", "model.safetensors"), "include": ("*",)},
    "tiny_vae": {"need": ("config.json", "diffusion_pytorch_model.safetensors"),
                 "include": ("config.json", "diffusion_pytorch_model.safetensors")},
    "ip_adapter": {"default": None},
    "lora": {"default": "pytorch_lora_weights.safetensors"},
}

# The weights the README's way to a real reconstruction uses: (argument, hub id) for `doctor` and the docs.
KNOWN = (("--sd", "sd", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
         ("--ip-adapter", "ip_adapter", "h94/IP-Adapter:models/ip-adapter-plus_sd15.safetensors"),
         ("--image-encoder", "image_encoder", "h94/IP-Adapter:models/image_encoder"),
         ("--lora", "lora", "latent-consistency/lcm-lora-sdv1-5"),
         ("--tiny-vae", "tiny_vae", "madebyollin/taesd"))


@dataclass(frozen=True)
class HubRef:
    """Where a hub id was found: the repository, the revision asked for, the commit it resolved to, the path."""

    repo: str
    revision: str | None
    commit: str
    path: str | None
    local: Path

    def record(self) -> dict:
        return {"id": self.repo, "revision": self.revision or "main", "commit": self.commit, "path": self.path}


def parse(text: str) -> tuple[str, str | None, str | None] | None:
    """(repo, revision, path) if `text` has the form of a hub id, else None."""
    m = HUB_ID.fullmatch(str(text))
    if m is None:
        return None
    path = m["path"].strip("/") if m["path"] else None
    return m["repo"], m["revision"], path or None


def download_command(repo: str, revision: str | None, files: list[str] = (), include: list[str] = ()) -> str:
    """The `hf download` command that puts exactly these files (or what these patterns match) in the cache."""
    parts = ["hf", "download", repo, *files, *(f"--include '{pat}'" for pat in include)]
    if revision:
        parts += ["--revision", revision]
    return " ".join(parts)


def _snapshot(repo: str, revision: str | None, cache_dir: str | Path | None) -> Path | None:
    """The cached snapshot folder of repo@revision, or None. Never touches the network."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InputError("hub ids need huggingface_hub (it comes with the export extra): "
                         "pip install 'nsdedge[export]'") from None
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None


def resolve(value: str | Path, kind: str, *, option: str = "", cache_dir: str | Path | None = None
            ) -> tuple[Path, HubRef | None]:
    """A weights argument as a local path: itself when it exists on disk (or is not an id), else the file or
    folder in the local Hugging Face cache. InputError, with the download command, when the cache lacks it."""
    spec = KINDS[kind]
    p = Path(value)
    parsed = None if p.exists() or p.is_absolute() else parse(str(value))
    if parsed is None:
        return p, None
    repo, revision, path = parsed
    name = f"{option} {value}".strip()
    single = "default" in spec or (path or "").endswith((".safetensors", ".ckpt", ".bin"))
    if single and path is None:
        path = spec["default"]
        if path is None:
            raise InputError(f"{name}: name the file inside the repository, e.g. "
                             f"h94/IP-Adapter:models/ip-adapter-plus_sd15.safetensors")
    inside = (lambda f: f"{path}/{f}") if path and not single else (lambda f: f)
    need = [path] if single else [inside(f) for f in spec["need"]]
    snap = _snapshot(repo, revision, cache_dir)
    missing = need if snap is None else [f for f in need if not (snap / f).is_file()]
    if missing:
        where = "is not in the Hugging Face cache" if snap is None else \
            f"is in the Hugging Face cache without {missing[0]}" + \
            (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        cmd = download_command(repo, revision, [path] if single else [],
                               [] if single else [inside(f) for f in spec["include"]])
        raise InputError(f"{name}: no such local path, and {repo}{'@' + revision if revision else ''} {where} "
                         f"({cache_root(cache_dir)}); nsdedge never downloads: run `{cmd}` first")
    local = snap / path if path else snap
    return local, HubRef(repo, revision, snap.name, path, local)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face hub cache this process reads (HF_HUB_CACHE, HF_HOME/hub, or ~/.cache/huggingface/hub)."""
    if cache_dir is not None:
        return Path(cache_dir)
    try:
        from huggingface_hub import constants
    except ImportError:
        import os

        home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
        return Path(os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub")))
    return Path(constants.HF_HUB_CACHE)


def find_known(cache_dir: str | Path | None = None) -> list[dict]:
    """Which of the README's weights this cache holds, complete or not (for `nsdedge doctor`). Reads only."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise InputError("hub ids need huggingface_hub (it comes with the export extra): "
                         "pip install 'nsdedge[export]'") from None
    out = []
    for option, kind, hub_id in KNOWN:
        try:
            local, ref = resolve(hub_id, kind, option=option, cache_dir=cache_dir)
            out.append({"option": option, "id": hub_id, "found": True, "commit": ref.commit, "path": str(local)})
        except InputError as e:
            cmd = re.search(r"run `(.+)` first", str(e))
            out.append({"option": option, "id": hub_id, "found": False, "download": cmd[1] if cmd else None})
    return out
