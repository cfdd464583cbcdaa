"""Modules whose forward is exactly the graph we export. Wrap, don't monkeypatch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ip_adapter import IPAdapterWeights, check_against_unet


class DecoupledAttnProcessor(nn.Module):
    """IP-Adapter's decoupled cross-attention with the tokens and the scale as tensors.

    out = attn(q, text K/V) + ip_scale * attn(q, ip K/V), with K_ip = ip_tokens W_k_ip^T and
    V_ip = ip_tokens W_v_ip^T (tencent-ailab/IP-Adapter, attention_processor.py). Self-attention
    layers use it with no ip projections; they ignore the ip arguments.

    Shapes: hidden_states (B, L, C); text (B, 77, 768); ip_tokens (B, 16, 768); ip_scale (1,).
    """

    def __init__(self, hidden_size: int | None = None, cross_dim: int | None = None):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, hidden_size, bias=False) if hidden_size else None
        self.to_v_ip = nn.Linear(cross_dim, hidden_size, bias=False) if hidden_size else None

    @staticmethod
    def _attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h = q.shape[0], attn.heads
        d = k.shape[-1] // h
        q, k, v = (x.view(b, -1, h, d).transpose(1, 2) for x in (q, k, v))   # (B, heads, L, d)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(b, -1, h * d)                     # (B, L, C)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ip_tokens=None, ip_scale=None):
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError("DecoupledAttnProcessor supports the SD 1.5 transformer attention only")
        residual = hidden_states
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.to_q(hidden_states)
        out = self._attend(attn, query, attn.to_k(context), attn.to_v(context))
        if self.to_k_ip is not None and ip_tokens is not None:
            ip = self._attend(attn, query, self.to_k_ip(ip_tokens), self.to_v_ip(ip_tokens))
            out = out + ip_scale * ip
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_layers(unet) -> dict[int, int]:
    """Processor index (in `unet.attn_processors` order, as IP-Adapter numbers them) -> hidden size."""
    widths = list(unet.config.block_out_channels)
    layers = {}
    for i, name in enumerate(unet.attn_processors):
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = widths[-1]
        elif name.startswith("up_blocks"):
            hidden = widths[::-1][int(name.split(".")[1])]
        else:
            hidden = widths[int(name.split(".")[1])]
        layers[i] = hidden
    return layers


def install_ip_adapter(unet, weights: IPAdapterWeights) -> None:
    """Give every attention layer a DecoupledAttnProcessor and load to_k_ip / to_v_ip into the cross ones."""
    layers = cross_attention_layers(unet)
    check_against_unet(weights, layers)
    cross_dim = unet.config.cross_attention_dim
    if cross_dim != weights.resampler.output_dim:
        raise ValueError(f"UNet cross_attention_dim {cross_dim} != IP-Adapter token width {weights.resampler.output_dim}")
    procs = {}
    for i, name in enumerate(unet.attn_processors):
        if i in layers:
            p = DecoupledAttnProcessor(layers[i], cross_dim)
            p.to_k_ip.weight.data.copy_(weights.ip_adapter[f"{i}.to_k_ip.weight"])
            p.to_v_ip.weight.data.copy_(weights.ip_adapter[f"{i}.to_v_ip.weight"])
        else:
            p = DecoupledAttnProcessor()
        procs[name] = p
    unet.set_attn_processor(procs)
    unet.encoder_hid_proj = None          # the Resampler is bypassed: the decoder predicts its output
    unet.config.encoder_hid_dim_type = None


class UNetIP(nn.Module):
    """(sample, timestep, text, ip_tokens, ip_scale) -> noise_pred; the graph `unet.onnx` holds.

    sample (B, 4, h, w) float32; timestep (1,) float32; encoder_hidden_states (B, 77, 768);
    ip_tokens (B, 16, 768); ip_scale (1,) float32. Output noise_pred (B, 4, h, w).
    """

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, ip_tokens, ip_scale):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         cross_attention_kwargs={"ip_tokens": ip_tokens, "ip_scale": ip_scale},
                         return_dict=False)[0]


class VAEDecoder(nn.Module):
    """latent (B, 4, h, w), already divided by the VAE scaling factor -> image (B, 3, h*f, w*f) in about [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]
