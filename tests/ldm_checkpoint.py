"""Write a diffusers SD 1.5 model as an original (LDM / CompVis) single-file checkpoint, for tests.

The key layout of the original checkpoints (model.diffusion_model.*, first_stage_model.*,
cond_stage_model.transformer.*) follows the block arithmetic of CompVis' UNet: input_blocks count
(layers_per_block + 1) per resolution level, output_blocks (layers_per_block + 1) too, with the
up/downsamplers as the last entry of a level.
"""

from __future__ import annotations

import torch

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def _sub(key: str, pairs) -> str:
    for a, b in pairs:
        key = key.replace(a, b)
    return key


def unet_to_ldm(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    per = config.layers_per_block + 1
    out = {}
    for k, v in sd.items():
        n = k
        n = n.replace("time_embedding.linear_1", "time_embed.0").replace("time_embedding.linear_2", "time_embed.2")
        n = n.replace("conv_in.", "input_blocks.0.0.").replace("conv_norm_out.", "out.0.").replace("conv_out.", "out.2.")
        parts = n.split(".")
        if parts[0] == "down_blocks":
            i, kind, j = int(parts[1]), parts[2], int(parts[3])
            rest = ".".join(parts[4:])
            if kind == "resnets":
                n = f"input_blocks.{per * i + j + 1}.0.{_sub(rest, RESNET)}"
            elif kind == "attentions":
                n = f"input_blocks.{per * i + j + 1}.1.{rest}"
            else:  # downsamplers.0.conv
                n = f"input_blocks.{per * (i + 1)}.0.op.{'.'.join(parts[5:])}"
        elif parts[0] == "up_blocks":
            i, kind, j = int(parts[1]), parts[2], int(parts[3])
            rest = ".".join(parts[4:])
            has_attn = config.up_block_types[i].startswith("CrossAttn")
            if kind == "resnets":
                n = f"output_blocks.{per * i + j}.0.{_sub(rest, RESNET)}"
            elif kind == "attentions":
                n = f"output_blocks.{per * i + j}.1.{rest}"
            else:  # upsamplers.0.conv
                n = f"output_blocks.{per * i + per - 1}.{2 if has_attn else 1}.{'.'.join(parts[4:])}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            n = f"middle_block.1.{rest}" if kind == "attentions" else f"middle_block.{2 * j}.{_sub(rest, RESNET)}"
        out["model.diffusion_model." + n] = v
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    levels = len(config.block_out_channels)
    out = {}
    for k, v in sd.items():
        n = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        parts = n.split(".")
        if parts[1] == "down_blocks":
            i = int(parts[2])
            if parts[3] == "resnets":
                n = f"{parts[0]}.down.{i}.block.{parts[4]}.{'.'.join(parts[5:])}"
            else:
                n = f"{parts[0]}.down.{i}.downsample.{'.'.join(parts[5:])}"
        elif parts[1] == "up_blocks":
            i = levels - 1 - int(parts[2])
            if parts[3] == "resnets":
                n = f"{parts[0]}.up.{i}.block.{parts[4]}.{'.'.join(parts[5:])}"
            else:
                n = f"{parts[0]}.up.{i}.upsample.{'.'.join(parts[5:])}"
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                n = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
            else:
                rest = _sub(".".join(parts[4:]), [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"),
                                                   ("to_v", "v"), ("to_out.0", "proj_out")])
                n = f"{parts[0]}.mid.attn_1.{rest}"
                if v.ndim == 2:
                    v = v[:, :, None, None]          # the original attention uses 1x1 convolutions
        out["first_stage_model." + n] = v
    return out


def write_single_file(unet, vae, text_encoder, path) -> None:
    from safetensors.torch import save_file

    sd = unet_to_ldm(unet.state_dict(), unet.config)
    sd.update(vae_to_ldm(vae.state_dict(), vae.config))
    # original checkpoints hold the HF CLIP text model as cond_stage_model.transformer.text_model.*
    # (transformers 5 drops the text_model. level from the state dict: put it back)
    sd.update({"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
               for k, v in text_encoder.state_dict().items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
