"""The BrainGuard-style MLP decoder (kunzhan/BrainGuard, trainmodel/models.py), in torch.

    h = Linear(V, hidden)(z)                      per-subject input layer, z = (x - x_mean) / x_std
    h = h + Block(h)   x blocks                   Block: Linear -> LN -> GELU -> Dropout   ("linear-ln-gelu")
                                                      or Linear -> GELU -> LN -> Dropout   ("linear-gelu-ln")
    t = Linear(hidden, 16 * 768)(h).view(16, 768) head
    y = Projector(t)                              per token: LN -> GELU -> Linear(768, p) -> LN -> GELU ->
                                                  Linear(p, p) -> LN -> GELU -> Linear(p, 768)
Weights: a safetensors file (config in its metadata, key "config") or a torch state dict read with
weights_only=True; a missing config is read off the keys and shapes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError, torch_load_error, torch_weights
from .linear import read_safetensors

ORDERS = ("linear-ln-gelu", "linear-gelu-ln")


@dataclass
class MLPConfig:
    voxels: int
    hidden: int = 2048
    blocks: int = 4
    tokens: int = 16
    width: int = 768
    projector_hidden: int = 2048
    block_order: str = "linear-ln-gelu"
    dropout: float = 0.15


def _block(h: int, order: str, dropout: float) -> nn.Sequential:
    if order == "linear-ln-gelu":
        return nn.Sequential(nn.Linear(h, h), nn.LayerNorm(h), nn.GELU(), nn.Dropout(dropout))
    if order == "linear-gelu-ln":
        return nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h), nn.Dropout(dropout))
    raise ValueError(f"block order {order!r} is not one of {', '.join(ORDERS)}")


class BrainGuardMLP(nn.Module):
    """voxels (N, V) -> ip tokens (N, 16, 768). Voxel z-scoring lives in buffers and is applied first."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.cfg = cfg
        w, p = cfg.width, cfg.projector_hidden
        self.register_buffer("x_mean", torch.zeros(cfg.voxels))
        self.register_buffer("x_std", torch.ones(cfg.voxels))
        self.input = nn.Linear(cfg.voxels, cfg.hidden)
        self.blocks = nn.ModuleList([_block(cfg.hidden, cfg.block_order, cfg.dropout) for _ in range(cfg.blocks)])
        self.head = nn.Linear(cfg.hidden, cfg.tokens * w)
        self.projector = nn.Sequential(nn.LayerNorm(w), nn.GELU(), nn.Linear(w, p), nn.LayerNorm(p), nn.GELU(),
                                       nn.Linear(p, p), nn.LayerNorm(p), nn.GELU(), nn.Linear(p, w))

    subject: str = "subj01"

    @property
    def voxels(self) -> int:
        return self.cfg.voxels

    def forward(self, voxels: torch.Tensor) -> torch.Tensor:
        h = self.input((voxels - self.x_mean) / self.x_std)          # (N, hidden)
        for block in self.blocks:
            h = h + block(h)
        t = self.head(h).view(-1, self.cfg.tokens, self.cfg.width)    # (N, 16, 768)
        return self.projector(t)

    def metadata(self, subject: str) -> dict[str, str]:
        return {"format": "nsdedge-decoder", "kind": "mlp", "subject": subject, "config": json.dumps(asdict(self.cfg))}

    def save(self, path: str | Path, subject: str) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path), metadata=self.metadata(subject))


def infer_config(sd: dict[str, torch.Tensor], source: str) -> MLPConfig:
    """Read the architecture off the state dict's keys and shapes."""
    try:
        hidden, voxels = sd["input.weight"].shape
        blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        order = "linear-ln-gelu" if "blocks.0.1.weight" in sd else "linear-gelu-ln"
        d, _ = sd["head.weight"].shape
        width = sd["projector.0.weight"].shape[0]
        p = sd["projector.2.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{source}: not a BrainGuard-style MLP state dict: missing or bad key {e}") from None
    return MLPConfig(voxels=voxels, hidden=hidden, blocks=blocks, tokens=d // width, width=width,
                     projector_hidden=p, block_order=order)


def read_mlp(path: str | Path, config: MLPConfig | None = None) -> tuple[BrainGuardMLP, str | None]:
    """Load an MLP decoder; returns (module in eval mode, subject named in the file or None)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such decoder file")
    subject = None
    if path.suffix == ".safetensors":
        meta, sd = read_safetensors(path, framework="pt")
        subject = meta.get("subject")
        if config is None and "config" in meta:
            try:
                config = MLPConfig(**json.loads(meta["config"]))
            except (TypeError, ValueError, RecursionError) as e:
                raise WeightsError(f"{path}: bad config in metadata ({e})") from None
    else:
        try:
            sd = torch_weights(path)
        except Exception as e:  # torch raises many types for a bad or unsafe file
            raise WeightsError(f"{path}: not a readable torch state dict ({torch_load_error(e)})") from None
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise WeightsError(f"{path}: expected a state dict of tensors")
    if config is None:
        config = infer_config(sd, str(path))
    check_config(config, path)
    model = BrainGuardMLP(config)
    want = model.state_dict()
    for k, v in want.items():
        if k in ("x_mean", "x_std") and k not in sd:
            continue
        if k not in sd:
            raise WeightsError(f"{path}: missing key {k}")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise WeightsError(f"{path}: key {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    extra = sorted(set(sd) - set(want))
    if extra:
        raise WeightsError(f"{path}: unexpected key {extra[0]}")
    bad = next((k for k, v in sd.items() if not (v.is_floating_point() and bool(torch.isfinite(v).all()))), None)
    if bad is not None or ("x_std" in sd and bool((sd["x_std"] <= 0).any())):
        raise WeightsError(f"{path}: key {bad or 'x_std'} is not floating point, holds NaN/Inf or a non-positive x_std")
    model.load_state_dict({**want, **{k: v.float() for k, v in sd.items()}})
    return model.eval(), subject


def check_config(cfg: MLPConfig, path) -> None:
    """WeightsError unless `cfg` describes a decoder of IP-Adapter-Plus tokens: sizes whole and positive (and not
    absurd), 16 x 768 tokens, a known block order."""
    sizes = {"voxels": cfg.voxels, "hidden": cfg.hidden, "blocks": cfg.blocks, "projector_hidden": cfg.projector_hidden}
    if not all(type(v) is int and 0 <= v <= 1 << 20 for v in sizes.values()) or cfg.blocks > 64 \
            or 0 in (cfg.voxels, cfg.hidden, cfg.projector_hidden):                 # (0 residual blocks is a decoder)
        raise WeightsError(f"{path}: MLP sizes out of range ({', '.join(f'{k} {v!r}' for k, v in sizes.items())})")
    if (cfg.tokens, cfg.width) != (16, 768):
        raise WeightsError(f"{path}: decoder makes {cfg.tokens} x {cfg.width} tokens; IP-Adapter-Plus takes 16 x 768")
    if cfg.block_order not in ("linear-ln-gelu", "linear-gelu-ln"):
        raise WeightsError(f"{path}: unknown block order {cfg.block_order!r}")
