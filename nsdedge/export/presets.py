"""Presets: the real classes with seeded random weights, so an export needs no downloaded weights.

tiny        a two-block UNet (cross-attention width 768, so tokens stay 16 x 768), a two-block VAE
            (upsamples by 2), one-layer CLIP text and vision models: exports in seconds.
sd15-random the full SD 1.5 UNet (860 M) with IP-Adapter-Plus processors and the full VAE, random
            weights, for realistic timing. Its text encoder is the full CLIP ViT-L text tower; the
            ViT-H image encoder is cut to one layer (only its hidden states' shape matters here).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..decoders.linear import synthetic_decoder
from .ip_adapter import ResamplerConfig, random_ip_adapter
from .sources import Sources
from .wrappers import cross_attention_layers

PRESETS = ("tiny", "sd15-random", "tiny-lcm", "sd15-random-lcm")   # -lcm: + a random LCM-LoRA and TAESD

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (a PNDMScheduler config); every
# scheduler of the runtime is configured from it, as diffusers' from_config does.
SD15_SCHEDULER_CONFIG = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}

SYNTH_SUBJECT = "synth01"
TINY_VOXELS = 256
SUBJ01_VOXELS = 15724


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character map."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer():
    """A CLIPTokenizer over a byte-level vocabulary with no merges (works offline, real class)."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_encoder(tokenizer, layers: int, heads: int, intermediate: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=768, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                         projection_dim=768, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(cfg).eval()


def _image_encoder(hidden: int, layers: int, heads: int, image_size: int, patch: int):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch, projection_dim=hidden)
    return CLIPVisionModelWithProjection(cfg).eval()


def build_preset(name: str, seed: int = 0) -> Sources:
    """The modules of preset `name`, their weights drawn from torch's generator seeded by `seed`. The modules
    initialise themselves from torch's global generator: its state is saved and restored around the build, so
    the caller's random stream is as it was."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)   # the CPU generator forked above, only
        return _build_preset(name, seed)


def _build_preset(name: str, seed: int) -> Sources:
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

    from .few_step import LCM_RUN_DEFAULTS, random_lora

    few_step = name.endswith("-lcm")
    name = name.removesuffix("-lcm")
    tok = byte_tokenizer()
    if name == "tiny":
        unet = UNet2DConditionModel(
            sample_size=32, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=768, attention_head_dim=2)
        vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                            layers_per_block=1, sample_size=64)
        text = _text_encoder(tok, layers=1, heads=4, intermediate=64)
        enc = _image_encoder(hidden=32, layers=2, heads=4, image_size=32, patch=8)
        # diffusers' Resampler conversion fixes depth 4 and ff_mult 4; dim_head 64 gives heads = inner / 64
        rcfg = ResamplerConfig(dim=64, depth=4, dim_head=64, heads=1, num_queries=16, embedding_dim=32,
                               output_dim=768, ff_mult=4)
        decoder = synthetic_decoder(SYNTH_SUBJECT, TINY_VOXELS, rank=16, seed=seed)
        resolution = 64
    else:
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)   # SD 1.5 is diffusers' default
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                            sample_size=512)
        text = _text_encoder(tok, layers=12, heads=12, intermediate=3072)
        enc = _image_encoder(hidden=1280, layers=2, heads=16, image_size=224, patch=14)
        rcfg = ResamplerConfig()
        decoder = synthetic_decoder(SYNTH_SUBJECT, SUBJ01_VOXELS, rank=256, seed=seed)
        resolution = 512
    ip = random_ip_adapter(rcfg, cross_attention_layers(unet), seed=seed + 1, source=f"preset:{name}")
    src = f"preset:{name}-lcm" if few_step else f"preset:{name}"
    sources = Sources(unet=unet.eval(), vae=vae.eval(), text_encoder=text, tokenizer=tok,
                      scheduler_config=dict(SD15_SCHEDULER_CONFIG), ip_adapter=ip, image_encoder=enc,
                      decoders=[decoder], resolution=resolution,
                      provenance={k: src for k in ("unet", "vae", "text_encoder", "ip_adapter", "image_encoder",
                                                   f"decoder-{SYNTH_SUBJECT}")})
    if few_step:
        # TAESD's architecture (diffusers' AutoencoderTiny defaults = madebyollin/taesd); the tiny preset's VAE
        # upsamples x2, so its TAESD has two levels
        tiny = {} if name == "sd15-random" else {
            "encoder_block_out_channels": (16, 16), "decoder_block_out_channels": (16, 16),
            "num_encoder_blocks": (1, 1), "num_decoder_blocks": (1, 1)}
        sources.tiny_vae = AutoencoderTiny(**tiny).eval()
        sources.lora = random_lora(unet, seed=seed + 2, rank=4 if name == "tiny" else 64)
        sources.run_defaults = {**LCM_RUN_DEFAULTS, "vae": "tiny"}
        sources.provenance.update(lora=src, tiny_vae=src)
    return sources


def save_weights(src: Sources, folder: str | Path) -> dict[str, Path]:
    """Write `src` in the real on-disk formats: a diffusers SD 1.5 folder, IP-Adapter-Plus .bin and
    .safetensors, a CLIP vision folder and one decoder file per subject. Returns the paths by role.

    `src.unet` must not have had the adapter installed (export installs it)."""
    import json

    from .ip_adapter import save_ip_adapter

    folder = Path(folder)
    sd = folder / "sd15"
    src.unet.save_pretrained(sd / "unet")
    src.vae.save_pretrained(sd / "vae")
    src.text_encoder.save_pretrained(sd / "text_encoder")
    src.tokenizer.save_pretrained(sd / "tokenizer")
    (sd / "scheduler").mkdir(parents=True, exist_ok=True)
    (sd / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "PNDMScheduler", **src.scheduler_config}, indent=2))
    (sd / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None]}, indent=2))
    paths = {"sd": sd, "ip_bin": folder / "ip-adapter-plus_sd15.bin",
             "ip_safetensors": folder / "ip-adapter-plus_sd15.safetensors", "image_encoder": folder / "image_encoder"}
    save_ip_adapter(src.ip_adapter, paths["ip_bin"])
    save_ip_adapter(src.ip_adapter, paths["ip_safetensors"])
    src.image_encoder.save_pretrained(paths["image_encoder"])
    for dec in src.decoders:
        paths[f"decoder-{dec.subject}"] = folder / f"decoder-{dec.subject}.safetensors"
        dec.save(paths[f"decoder-{dec.subject}"])
    if src.lora is not None:                      # as LCM-LoRA ships: pytorch_lora_weights.safetensors
        from .few_step import save_lora

        paths["lora"] = folder / "lcm-lora" / "pytorch_lora_weights.safetensors"
        paths["lora"].parent.mkdir(parents=True, exist_ok=True)
        save_lora(src.lora, paths["lora"])
    if src.tiny_vae is not None:                  # as madebyollin/taesd ships: a diffusers AutoencoderTiny folder
        paths["tiny_vae"] = folder / "taesd"
        src.tiny_vae.save_pretrained(paths["tiny_vae"])
    return paths
