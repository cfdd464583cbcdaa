"""Where the weights come from: a diffusers SD 1.5 folder, an IP-Adapter-Plus file, a CLIP vision folder.

Everything is loaded into the real diffusers / transformers classes; the exporter does not care whether
they came from disk or from a preset (presets.py builds the same classes with seeded random weights).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import WeightsError, first_line
from .ip_adapter import IPAdapterWeights, read_ip_adapter

log = logging.getLogger(__name__)

# IP-Adapter's demo prompts (tencent-ailab/IP-Adapter, ip_adapter_demo.ipynb)
DEFAULT_PROMPT = "best quality, high quality"
DEFAULT_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"


@dataclass
class Sources:
    """The real modules an export needs, plus where each came from."""

    unet: object                    # diffusers UNet2DConditionModel (without the adapter)
    vae: object                     # diffusers AutoencoderKL
    text_encoder: object | None     # transformers CLIPTextModel (None: `prompt_embeds` given)
    tokenizer: object | None
    scheduler_config: dict
    ip_adapter: IPAdapterWeights
    image_encoder: object | None    # transformers CLIPVisionModelWithProjection (None: `uncond_hidden` given)
    decoders: list = field(default_factory=list)   # LinearDecoder or BrainGuardMLP, each with .subject
    provenance: dict[str, str] = field(default_factory=dict)
    resolution: int | None = None
    # the few-step path (export/few_step.py)
    lora: dict | None = None        # a distillation LoRA's tensors, fused into the UNet at export
    lora_scale: float = 1.0
    lora_name: str = "LoRA"         # how errors name it (its file)
    tiny_vae: object | None = None  # diffusers AutoencoderTiny (TAESD)
    full_vae: bool = True           # False: the bundle carries the tiny VAE only
    run_defaults: dict = field(default_factory=dict)   # settings the bundle is meant to run with
    hub: dict = field(default_factory=dict)            # option -> hub id, revision, commit, path (hub.py)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_multiple(self) -> int:
        """Latent sides must be multiples of this (the UNet's downsampling)."""
        return 2 ** (len(self.unet.config.down_block_types) - 1)


def file_digest(path: Path, limit: int = 1 << 26) -> str:
    """sha256 of a file (of its first 64 MiB and its size for larger ones: provenance, not integrity)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        h.update(f.read(limit))
    if size > limit:
        h.update(str(size).encode())
        return "sha256-head:" + h.hexdigest()
    return "sha256:" + h.hexdigest()


def folder_digest(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(folder)).encode())
        h.update(file_digest(p).encode())
    return "sha256-tree:" + h.hexdigest()


def quiet_libraries() -> None:
    """diffusers / transformers / torch.onnx print progress bars and advice on every load, onnx_ir an INFO line per
    pass: the CLI, which owns its process and shows its own progress, calls this; the library never does."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def load_sd15(path: str | Path, config: str | Path | None = None) -> dict:
    """SD 1.5 from a diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) or from a
    single-file original checkpoint (.safetensors, or .ckpt read with weights_only) through diffusers'
    own converter. A single file carries no configs or tokenizer: `config` names a diffusers SD 1.5
    folder that describes it (only its configs and tokenizer are read); by default the file's own folder."""
    path = Path(path)
    if path.is_file():
        return _load_single_file(path, Path(config) if config else path.parent)
    if not path.is_dir():
        raise WeightsError(f"{path}: no such SD 1.5 folder or checkpoint file")
    _check_folder(path)
    return _load_folder(path)


def _check_folder(path: Path) -> None:
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / sub).is_dir():
            raise WeightsError(f"{path}: not a diffusers SD 1.5 folder: missing {sub}/")


def _scheduler_config(path: Path) -> dict:
    try:
        sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise WeightsError(f"{path}/scheduler/scheduler_config.json: unreadable ({e})") from None
    if not isinstance(sched, dict):
        raise WeightsError(f"{path}/scheduler/scheduler_config.json: not a JSON object")
    return {k: v for k, v in sched.items() if not k.startswith("_")}


def _load_folder(path: Path) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..eval.features import load_pretrained

    parts = {"scheduler_config": _scheduler_config(path)}
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        parts[sub] = load_pretrained(cls, path / sub)
    try:
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, ...
        raise WeightsError(f"{path / 'tokenizer'}: cannot load CLIPTokenizer: {first_line(e, 300)}") from None
    return parts


def _load_single_file(path: Path, config: Path) -> dict:
    from diffusers import StableDiffusionPipeline

    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise WeightsError(f"{path}: a single-file checkpoint must be .safetensors or .ckpt")
    if not config.is_dir() or not (config / "unet").is_dir():
        raise WeightsError(f"{path}: a single-file checkpoint needs --sd-config DIR, a diffusers SD 1.5 folder "
                           f"whose configs and tokenizer describe it (its weights are not read)")
    _check_folder(config)
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                        safety_checker=None, requires_safety_checker=False)
    except Exception as e:  # the converter raises many types for a wrong or foreign checkpoint
        raise WeightsError(f"{path}: cannot load as an SD 1.5 checkpoint: {first_line(e, 300)}") from None
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer,
            "scheduler_config": _scheduler_config(config)}


def load_image_encoder(path: str | Path):
    """The CLIP ViT-H vision model (transformers folder) that computes the unconditional ip tokens."""
    from ..eval.features import load_clip_vision

    return load_clip_vision(path, projection=False)          # only hidden_states[-2] is read


def load_sources(sd: str | Path, ip_adapter: str | Path, image_encoder: str | Path,
                 decoders: list, decoder_files: dict[str, Path], sd_config: str | Path | None = None) -> Sources:
    parts = load_sd15(sd, sd_config)
    ip = read_ip_adapter(ip_adapter)
    enc = load_image_encoder(image_encoder)
    hidden = enc.config.hidden_size
    if hidden != ip.resampler.embedding_dim:
        raise WeightsError(f"{image_encoder}: CLIP hidden size {hidden} does not match the Resampler's input "
                           f"({ip.resampler.embedding_dim}) in {ip_adapter}")
    sd_digest = folder_digest(Path(sd)) if Path(sd).is_dir() else file_digest(Path(sd))
    prov = {"unet": sd_digest, "vae": sd_digest, "text_encoder": sd_digest, "ip_adapter": file_digest(Path(ip_adapter)),
            "image_encoder": folder_digest(Path(image_encoder))}
    prov.update({f"decoder-{s}": file_digest(p) for s, p in decoder_files.items()})
    return Sources(unet=parts["unet"].eval(), vae=parts["vae"].eval(), text_encoder=parts["text_encoder"].eval(),
                   tokenizer=parts["tokenizer"], scheduler_config=parts["scheduler_config"], ip_adapter=ip,
                   image_encoder=enc, decoders=decoders, provenance=prov)


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompt: str) -> np.ndarray:
    """The text embeddings diffusers' StableDiffusionPipeline.encode_prompt makes: (1, 77, 768)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0].float().numpy()


def image_projection(ip: IPAdapterWeights) -> torch.nn.Module:
    """IP-Adapter-Plus's Resampler as diffusers builds it from the checkpoint (diffusers' own converter; it only
    needs the UNet instance for low_cpu_mem_usage, which is off here)."""
    from diffusers import UNet2DConditionModel

    convert = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers
    return convert(None, ip.image_proj, low_cpu_mem_usage=False).eval()


@torch.no_grad()
def unconditional_tokens(unet, ip: IPAdapterWeights, image_encoder) -> np.ndarray:
    """IP-Adapter's unconditional tokens: the Resampler over CLIP hidden_states[-2] of a zeros (normalised) image."""
    proj = image_projection(ip)
    size = image_encoder.config.image_size
    hidden = image_encoder(torch.zeros(1, 3, size, size), output_hidden_states=True).hidden_states[-2]
    return proj(hidden).float().numpy()                       # (1, 16, 768)
