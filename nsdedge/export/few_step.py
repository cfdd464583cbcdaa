"""The few-step path: a distillation LoRA fused into the UNet (and text encoder), and the tiny VAE (TAESD).

LoRA files (LCM-LoRA, Hyper-SD, TCD; diffusers/PEFT or kohya layout, with kohya's alphas) are read as safetensors,
never unpickled, and fused through diffusers' own loader: load_lora_weights -> fuse_lora(lora_scale) ->
unload_lora_weights leaves plain modules with the LoRA in their weights, so the UNet export is unchanged. Checked:
keys that name no module (by name, for the plain layouts), layers the loader could not place (by count), and a
fuse that changed nothing (by per-parameter fingerprints). TAESD is diffusers' AutoencoderTiny (madebyollin/taesd): its decoder
takes UNet-space latents (scaling factor 1) and returns [-1, 1].
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..errors import WeightsError, first_line

log = logging.getLogger(__name__)

# LCM-LoRA for SD 1.5 (latent-consistency/lcm-lora-sdv1-5): rank 64 on these UNet modules, as diffusers'
# train_lcm_distill_lora_sd_wds.py trains it. The presets draw a random LoRA of this shape.
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
LCM_LORA_RANK = 64
# What a bundle with a fused LCM-LoRA runs with unless told otherwise (LCM-LoRA's model card: 2-8 steps,
# guidance 1 to 2; guidance 1 is batch 1 without the negative branch).
LCM_RUN_DEFAULTS = {"scheduler": "lcm", "steps": 4, "guidance": 1.0}

# A LoRA key in diffusers/PEFT layout: "<model>.<module path>.lora_A.weight" (or lora_B, lora.down, lora.up)
_LORA_KEY = re.compile(r"^(unet|text_encoder)\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight$")


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
        raise WeightsError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    """The modules of `model` into which PEFT injected a LoRA (they carry lora_A)."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {}))}


def _fingerprints(model) -> dict[str, tuple]:
    """Per parameter: shape, sum and sum of squares (float64): what fusing changes, without a copy of the model."""
    with torch.no_grad():
        return {n: (tuple(p.shape), float(p.double().sum()), float(p.double().square().sum()))
                for n, p in model.named_parameters()}


def fuse_lora(unet, text_encoder, lora: dict[str, torch.Tensor], scale: float, source: str) -> None:
    """Fuse `lora` into `unet` (and `text_encoder` where it has keys for it) in place, with diffusers' loader, which
    reads the diffusers/PEFT and kohya layouts and their alphas. WeightsError, naming a key where it can, when
    the loader refuses the file, when some of its layers found no module, or when fusing changed nothing."""
    try:
        import peft  # noqa: F401
        from diffusers import DDIMScheduler, StableDiffusionPipeline
    except ImportError as e:
        raise WeightsError(f"{source}: fusing a LoRA needs {e.name}: pip install 'nsdedge[export]'") from None
    try:
        converted, _ = StableDiffusionPipeline.lora_state_dict(dict(lora))      # kohya -> diffusers names
    except Exception as e:  # noqa: BLE001  diffusers raises ValueError, KeyError, ... for a foreign file
        raise WeightsError(f"{source}: not a LoRA diffusers can read ({first_line(e)})") from None
    models = {"unet": unet, "text_encoder": text_encoder}
    for key in converted:                      # name the first key (of the plain layouts) that fits no module
        m = _LORA_KEY.match(key)
        if m and models.get(m.group(1)) is not None:
            try:
                models[m.group(1)].get_submodule(m.group(2))
            except AttributeError:
                raise WeightsError(f"{source}: LoRA key {key!r} names no module of the {m.group(1)}") from None
    pairs = sum(1 for k in converted if re.search(r"(lora_A|lora\.down)(\.[A-Za-z0-9_]+)?\.weight$", k))
    has_text = any(k.startswith("text_encoder.") for k in converted)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=text_encoder if has_text else None, tokenizer=None,
                                   unet=unet, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    before = {name: _fingerprints(m) for name, m in models.items() if m is not None}
    try:
        pipe.load_lora_weights(dict(lora), adapter_name="few_step")
    except Exception as e:  # noqa: BLE001  shapes that do not fit, unknown layouts, PEFT errors
        raise WeightsError(f"{source}: diffusers cannot load this LoRA ({first_line(e)})") from None
    injected = sum(len(_lora_layers(m)) for m in models.values() if m is not None)
    if injected < pairs:
        raise WeightsError(f"{source}: only {injected} of its {pairs} LoRA layers found a module of the UNet or "
                           f"text encoder")
    pipe.fuse_lora(lora_scale=float(scale))
    pipe.unload_lora_weights()
    after = {name: _fingerprints(m) for name, m in models.items() if m is not None}
    if any(set(after[n]) != set(before[n]) for n in after):
        raise WeightsError(f"{source}: the LoRA did not unload cleanly after fusing")
    changed = sum(before[n][k] != after[n][k] for n in after for k in after[n])
    if not changed and scale != 0:
        raise WeightsError(f"{source}: fusing this LoRA changed no weight (keys in a layout the loader skipped?)")
    log.info("%s: %d LoRA layers fused at scale %s (%d tensors changed)", source, injected, scale, changed)


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
    from ..eval.features import load_pretrained

    return load_pretrained(AutoencoderTiny, path)
