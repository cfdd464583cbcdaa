"""The few-step path: a distillation LoRA fused into the UNet (and text encoder), and the tiny VAE (TAESD).

LoRA files (LCM-LoRA, Hyper-SD, TCD; diffusers/PEFT or kohya layout) are read as safetensors, never unpickled,
checked key by key against the models, and fused through diffusers' own loader:
load_lora_weights -> fuse_lora(lora_scale) -> unload_lora_weights leaves plain modules with the LoRA in their
weights, so the UNet export is unchanged. TAESD is diffusers' AutoencoderTiny (madebyollin/taesd): its decoder
takes UNet-space latents (scaling factor 1) and returns [-1, 1].
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..errors import WeightsError

log = logging.getLogger(__name__)

# LCM-LoRA for SD 1.5 (latent-consistency/lcm-lora-sdv1-5): rank 64 on these UNet modules, as diffusers'
# train_lcm_distill_lora_sd_wds.py trains it. The presets draw a random LoRA of this shape.
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
LCM_LORA_RANK = 64
# What a bundle with a fused LCM-LoRA runs with unless told otherwise (LCM-LoRA's model card: 2-8 steps,
# guidance 1 to 2; guidance 1 is batch 1 without the negative branch).
LCM_RUN_DEFAULTS = {"scheduler": "lcm", "steps": 4, "guidance": 1.0}

# the parameter of a LoRA key: diffusers/PEFT (lora_A / lora_B), older diffusers (lora.down / lora.up), alpha
_LORA_PARAM = re.compile(r"\.(lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)(\.[A-Za-z0-9_]+)?\.weight$|\.alpha$")


def read_lora(path: Path) -> dict[str, torch.Tensor]:
    """A LoRA's tensors from a .safetensors file (never a pickle)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such LoRA file")
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: a LoRA must be a .safetensors file (nsdedge never unpickles)")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001  safetensors raises SafetensorError, OSError, ...
        raise WeightsError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None


def _check_keys(state: dict, modules: dict[str, torch.nn.Module], source: str) -> int:
    """Every LoRA key (diffusers layout, "unet." / "text_encoder." prefixed) names a Linear or Conv2d of the model
    with matching sides; returns the number of keys checked. WeightsError naming the first key that does not."""
    count = 0
    for key, tensor in state.items():
        prefix, _, rest = key.partition(".")
        if prefix not in modules:
            raise WeightsError(f"{source}: LoRA key {key!r} is for neither the UNet nor the text encoder")
        m = _LORA_PARAM.search(rest)
        if not m:
            raise WeightsError(f"{source}: LoRA key {key!r} is not a LoRA weight")
        path, kind = rest[:m.start()], m.group(1) or "alpha"
        try:
            target = modules[prefix].get_submodule(path)
        except AttributeError:
            raise WeightsError(f"{source}: LoRA key {key!r} names no module of the {prefix}") from None
        count += 1
        if kind == "alpha":
            continue
        n_in = getattr(target, "in_features", getattr(target, "in_channels", None))
        n_out = getattr(target, "out_features", getattr(target, "out_channels", None))
        side, want = (tensor.shape[1], n_in) if kind in ("lora_A", "lora.down", "lora_down") else (tensor.shape[0], n_out)
        if n_in is None or side != want:
            raise WeightsError(f"{source}: LoRA key {key!r} has shape {tuple(tensor.shape)}, which does not fit "
                               f"{prefix}.{path} ({type(target).__name__} {n_in} -> {n_out})")
    return count


def fuse_lora(unet, text_encoder, lora: dict[str, torch.Tensor], scale: float, source: str) -> None:
    """Fuse `lora` into `unet` (and `text_encoder` where it has keys for it) in place, with diffusers' loader."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    state, alphas = StableDiffusionPipeline.lora_state_dict(dict(lora))    # kohya -> diffusers names
    modules = {"unet": unet, **({"text_encoder": text_encoder} if text_encoder is not None else {})}
    if not _check_keys(state, modules, source):
        raise WeightsError(f"{source}: no LoRA weights found")
    has_text = any(k.startswith("text_encoder.") for k in state)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=text_encoder if has_text else None, tokenizer=None,
                                   unet=unet, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    before = sum(p.numel() for p in unet.parameters())
    pipe.load_lora_weights(state, adapter_name="few_step")
    pipe.fuse_lora(lora_scale=float(scale))
    pipe.unload_lora_weights()
    if sum(p.numel() for p in unet.parameters()) != before:
        raise WeightsError(f"{source}: the LoRA did not unload cleanly after fusing")
    log.info("%s: %d LoRA tensors fused at scale %s", source, len(state), scale)


def random_lora(unet, seed: int, rank: int = LCM_LORA_RANK, targets: tuple[str, ...] = LCM_LORA_TARGETS) -> dict:
    """A LoRA of LCM-LoRA's shape with random weights (diffusers/PEFT layout, "unet." keys), for the presets.
    Both factors are drawn (PEFT starts B at zero, which would fuse to nothing)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or \
                not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, torch.nn.Linear):
            a, b = (rank, module.in_features), (module.out_features, rank)
        else:
            kh, kw = module.kernel_size
            a, b = (rank, module.in_channels, kh, kw), (module.out_channels, rank, 1, 1)
        out[f"unet.{name}.lora_A.weight"] = torch.randn(*a, generator=g) / a[1] ** 0.5
        out[f"unet.{name}.lora_B.weight"] = torch.randn(*b, generator=g) * 0.01
    return out


def save_lora(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


class TinyVAEDecoder(torch.nn.Module):
    """latent (B, 4, h, w) in UNet space (TAESD's scaling factor is 1) -> image (B, 3, h*f, w*f) in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


def tiny_vae_factor(vae) -> int:
    """How much TAESD's decoder upsamples: 2 per level but the last."""
    return int(vae.config.upsampling_scaling_factor) ** (len(vae.config.decoder_block_out_channels) - 1)


def load_tiny_vae(path: Path):
    """diffusers' AutoencoderTiny from a local folder (madebyollin/taesd's layout: config.json + weights)."""
    from diffusers import AutoencoderTiny

    path = Path(path)
    if not path.is_dir():
        raise WeightsError(f"{path}: no such AutoencoderTiny folder (--tiny-vae takes madebyollin/taesd's folder)")
    try:
        return AutoencoderTiny.from_pretrained(str(path), local_files_only=True).eval()
    except Exception as e:  # noqa: BLE001  diffusers raises OSError, ValueError, RuntimeError, ...
        raise WeightsError(f"{path}: cannot load AutoencoderTiny: {(str(e).strip().splitlines() or [''])[0][:200]}") \
            from None
