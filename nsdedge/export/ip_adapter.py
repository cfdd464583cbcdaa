"""IP-Adapter-Plus checkpoints in their official layouts (tencent-ailab/IP-Adapter).

.bin:          {"image_proj": Resampler state dict, "ip_adapter": {"1.to_k_ip.weight", ...}}
.safetensors:  the same tensors with keys prefixed "image_proj." and "ip_adapter."

The Resampler (the image projection) maps CLIP ViT-H hidden_states[-2] (257 x 1280) to 16 x 768 tokens.
At run time nsdedge bypasses it (the decoder predicts its output); it is used once, at export, to
compute the unconditional tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WeightsError, torch_load_error, torch_weights


@dataclass(frozen=True)
class ResamplerConfig:
    """IP-Adapter's Resampler hyper-parameters; the defaults are those of ip-adapter-plus_sd15."""

    dim: int = 768
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = 16
    embedding_dim: int = 1280
    output_dim: int = 768
    ff_mult: int = 4

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The Resampler's state-dict keys and shapes in the official naming."""
        inner, ff = self.dim_head * self.heads, self.dim * self.ff_mult
        s: dict[str, tuple[int, ...]] = {
            "latents": (1, self.num_queries, self.dim),
            "proj_in.weight": (self.dim, self.embedding_dim), "proj_in.bias": (self.dim,),
            "proj_out.weight": (self.output_dim, self.dim), "proj_out.bias": (self.output_dim,),
            "norm_out.weight": (self.output_dim,), "norm_out.bias": (self.output_dim,),
        }
        for i in range(self.depth):
            a, f = f"layers.{i}.0.", f"layers.{i}.1."
            s.update({a + "norm1.weight": (self.dim,), a + "norm1.bias": (self.dim,),
                      a + "norm2.weight": (self.dim,), a + "norm2.bias": (self.dim,),
                      a + "to_q.weight": (inner, self.dim), a + "to_kv.weight": (2 * inner, self.dim),
                      a + "to_out.weight": (self.dim, inner),
                      f + "0.weight": (self.dim,), f + "0.bias": (self.dim,),
                      f + "1.weight": (ff, self.dim), f + "3.weight": (self.dim, ff)})
        return s

    @classmethod
    def infer(cls, image_proj: dict[str, torch.Tensor], source: str) -> "ResamplerConfig":
        """Read the hyper-parameters off a state dict (heads from dim_head 64, as diffusers does)."""
        try:
            _, nq, dim = image_proj["latents"].shape
            emb = image_proj["proj_in.weight"].shape[1]
            out = image_proj["proj_out.weight"].shape[0]
            depth = len({k.split(".")[1] for k in image_proj if k.startswith("layers.")})
            inner = image_proj["layers.0.0.to_q.weight"].shape[0]
            ff = image_proj["layers.0.1.1.weight"].shape[0]
        except (KeyError, ValueError) as e:
            raise WeightsError(f"{source}: not an IP-Adapter-Plus Resampler (image_proj): missing or bad key {e}") from None
        dim_head = 64 if inner % 64 == 0 else inner
        return cls(dim=dim, depth=depth, dim_head=dim_head, heads=inner // dim_head, num_queries=nq,
                   embedding_dim=emb, output_dim=out, ff_mult=ff // dim)


@dataclass
class IPAdapterWeights:
    image_proj: dict[str, torch.Tensor]
    ip_adapter: dict[str, torch.Tensor]
    resampler: ResamplerConfig
    source: str

    @property
    def num_tokens(self) -> int:
        return self.resampler.num_queries

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The .bin layout, as diffusers' loader takes it."""
        return {"image_proj": self.image_proj, "ip_adapter": self.ip_adapter}


def _check(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], source: str, prefix: str) -> None:
    for key, shape in shapes.items():
        if key not in tensors:
            raise WeightsError(f"{source}: missing key {prefix}{key}")
        if tuple(tensors[key].shape) != shape:
            raise WeightsError(f"{source}: key {prefix}{key} has shape {tuple(tensors[key].shape)}, expected {shape}")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise WeightsError(f"{source}: unexpected key {prefix}{extra[0]} (not IP-Adapter-Plus)")


def read_ip_adapter(path: str | Path) -> IPAdapterWeights:
    """Read an IP-Adapter-Plus checkpoint (.bin or .safetensors) and check its keys and shapes."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such IP-Adapter file")
    src = str(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            flat = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
        image_proj = {k[len("image_proj."):]: v for k, v in flat.items() if k.startswith("image_proj.")}
        ip = {k[len("ip_adapter."):]: v for k, v in flat.items() if k.startswith("ip_adapter.")}
        other = [k for k in flat if not k.startswith(("image_proj.", "ip_adapter."))]
        if other:
            raise WeightsError(f"{path}: unexpected key {other[0]} (keys must start with image_proj. or ip_adapter.)")
    else:
        try:
            sd = torch_weights(path)
        except Exception as e:  # torch raises many types for a bad or unsafe file
            raise WeightsError(f"{path}: not a readable IP-Adapter .bin ({torch_load_error(e)})") from None
        if not isinstance(sd, dict) or set(sd) != {"image_proj", "ip_adapter"}:
            keys = sorted(sd) if isinstance(sd, dict) else type(sd).__name__
            raise WeightsError(f"{path}: expected a dict with keys image_proj and ip_adapter, got {keys}")
        image_proj, ip = sd["image_proj"], sd["ip_adapter"]
        if not all(isinstance(part, dict) and all(isinstance(v, torch.Tensor) for v in part.values())
                   for part in (image_proj, ip)):
            raise WeightsError(f"{path}: image_proj and ip_adapter must be dicts of tensors")
    if not all(v.is_floating_point() and bool(torch.isfinite(v).all()) for v in [*image_proj.values(), *ip.values()]):
        bad = next(k for k, v in [*image_proj.items(), *ip.items()]
                   if not (v.is_floating_point() and bool(torch.isfinite(v).all())))
        raise WeightsError(f"{path}: weight {bad} is not floating point or holds NaN/Inf")
    if not image_proj:
        raise WeightsError(f"{path}: missing key image_proj (no Resampler weights)")
    if not ip:
        raise WeightsError(f"{path}: missing key ip_adapter (no to_k_ip / to_v_ip weights)")
    cfg = ResamplerConfig.infer(image_proj, src)
    _check(image_proj, cfg.shapes(), src, "image_proj.")
    for k, v in ip.items():
        if not k.endswith((".to_k_ip.weight", ".to_v_ip.weight")) or v.ndim != 2 or v.shape[1] != cfg.output_dim:
            raise WeightsError(f"{path}: unexpected key ip_adapter.{k} with shape {tuple(v.shape)}")
    return IPAdapterWeights({k: v.float() for k, v in image_proj.items()}, {k: v.float() for k, v in ip.items()},
                            cfg, src)


def check_against_unet(w: IPAdapterWeights, layers: dict[int, int]) -> None:
    """`layers` maps each cross-attention layer's processor index to its hidden size."""
    for idx, hidden in layers.items():
        for kind in ("to_k_ip", "to_v_ip"):
            key = f"{idx}.{kind}.weight"
            if key not in w.ip_adapter:
                raise WeightsError(f"{w.source}: missing key ip_adapter.{key} (does the adapter fit this UNet?)")
            shape = tuple(w.ip_adapter[key].shape)
            if shape != (hidden, w.resampler.output_dim):
                raise WeightsError(f"{w.source}: key ip_adapter.{key} has shape {shape}, "
                                   f"the UNet needs {(hidden, w.resampler.output_dim)}")
    extra = sorted(set(w.ip_adapter) - {f"{i}.{k}.weight" for i in layers for k in ("to_k_ip", "to_v_ip")})
    if extra:
        raise WeightsError(f"{w.source}: unexpected key ip_adapter.{extra[0]} (more layers than the UNet has)")


def random_ip_adapter(cfg: ResamplerConfig, layers: dict[int, int], seed: int, source: str) -> IPAdapterWeights:
    """Seeded random weights in the official layout (for presets and tests)."""
    g = torch.Generator().manual_seed(seed)
    image_proj = {}
    for k, shape in cfg.shapes().items():
        if k.endswith("bias"):
            t = torch.zeros(shape)
        elif k.startswith("norm") or ".norm" in k or (k.startswith("layers.") and k.split(".")[2:4] == ["1", "0"]):
            t = torch.ones(shape)   # LayerNorm weights
        elif k == "latents":
            t = torch.randn(shape, generator=g) / cfg.dim ** 0.5
        else:
            t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        image_proj[k] = t
    ip = {}
    for idx, hidden in layers.items():
        for kind in ("to_k_ip", "to_v_ip"):
            ip[f"{idx}.{kind}.weight"] = torch.randn((hidden, cfg.output_dim), generator=g) / cfg.output_dim ** 0.5
    return IPAdapterWeights(image_proj, ip, cfg, source)


def save_ip_adapter(w: IPAdapterWeights, path: str | Path) -> None:
    """Write the official layout: .bin (torch.save of the nested dict) or .safetensors (prefixed keys)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        flat = {f"image_proj.{k}": v.contiguous() for k, v in w.image_proj.items()}
        flat.update({f"ip_adapter.{k}": v.contiguous() for k, v in w.ip_adapter.items()})
        save_file(flat, str(path))
    else:
        torch.save(w.state_dict(), str(path))
