"""Training the BrainGuard-style MLP decoder (mlp.py) on one subject: voxels (N, V) -> IP-Adapter-Plus tokens.

    model, report = train_mlp(x, y, MLPConfig(voxels=x.shape[1], hidden=2048, blocks=4), epochs=50, seed=0)
    model.save("subj01-mlp.safetensors", "subj01")          # what `nsdedge export --decoder` loads

Loss (as the method describes it): MSE between L2-normalised tokens, plus a soft-CLIP contrastive term over the
batch (MindEye's: targets are the softmax of the true trials' similarities, temperature 0.05). AdamW with a
one-cycle schedule; a seeded validation split, early stopping on its loss (the best epoch's weights are kept).
Voxels are z-scored with the training split's statistics, stored in the model. Runs inside torch.random.fork_rng:
the caller's random streams are left as they were. torch only.
"""

from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, NsdedgeError
from .mlp import BrainGuardMLP, MLPConfig

TEMPERATURE = 0.05


@dataclass
class TrainReport:
    epochs: int                    # run (early stopping may end before the maximum)
    best_epoch: int
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_token_corr: float = float("nan")
    val_two_way: float = float("nan")
    seconds: float = 0.0


def decoder_loss(pred: torch.Tensor, target: torch.Tensor, clip_weight: float = 1.0,
                 temperature: float = TEMPERATURE) -> torch.Tensor:
    """MSE of L2-normalised tokens + clip_weight x the symmetric soft-CLIP loss over the batch."""
    p, t = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    loss = F.mse_loss(p, t)
    if clip_weight and len(pred) > 1:
        pf, tf = F.normalize(p.flatten(1), dim=-1), F.normalize(t.flatten(1), dim=-1)
        soft = F.softmax(tf @ tf.T / temperature, dim=-1)
        logits = pf @ tf.T / temperature
        clip = -(soft * F.log_softmax(logits, dim=-1)).sum(-1).mean() - \
            (soft * F.log_softmax(logits.T, dim=-1)).sum(-1).mean()
        loss = loss + clip_weight * clip / 2
    return loss


def token_corr(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean Pearson correlation between predicted and true flattened token sets, trial by trial."""
    p = pred.reshape(len(pred), -1) - pred.reshape(len(pred), -1).mean(1, keepdims=True)
    t = true.reshape(len(true), -1) - true.reshape(len(true), -1).mean(1, keepdims=True)
    return float(((p * t).sum(1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(t, axis=1) + 1e-12)).mean())


def two_way(pred: np.ndarray, true: np.ndarray) -> float:
    """2-way identification: how often a prediction correlates more with its own trial than with another."""
    n = len(pred)
    if n < 2:
        return float("nan")
    c = np.corrcoef(pred.reshape(n, -1), true.reshape(n, -1))[:n, n:]
    return float(((c.diagonal()[:, None] > c).sum(1) / (n - 1)).mean())


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation cut into (train rows, validation rows); validation has at least 2 rows."""
    if n < 4:
        raise InputError(f"{n} trials: training needs at least 4 (2 of them held out for validation)")
    perm = np.random.default_rng(seed).permutation(n)
    k = min(n - 2, max(2, int(round(n * val_fraction))))
    return np.sort(perm[k:]), np.sort(perm[:k])


def resolve_device(device: str) -> torch.device:
    """auto | cpu | cuda | cuda:N, checked against what torch sees here (InputError otherwise)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if m is None:
        raise InputError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: torch sees no CUDA device here")
        if m[1] is not None and int(m[1]) >= torch.cuda.device_count():
            raise InputError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(device)


def train_mlp(x: np.ndarray, y: np.ndarray, cfg: MLPConfig, *, epochs: int = 50, batch_size: int = 32,
              lr: float = 3e-4, weight_decay: float = 1e-2, val_fraction: float = 0.1, patience: int = 5,
              clip_weight: float = 1.0, seed: int = 0, device: str = "auto",
              progress: Callable[[int, float, float], None] | None = None) -> tuple[BrainGuardMLP, TrainReport]:
    """Fit an MLP decoder on (N, V) voxels and (N, 16, 768) tokens; the model comes back in eval mode on the CPU.
    `progress(epoch, train loss, validation loss)` after every epoch."""
    x = np.array(x, np.float32)                     # own, writable copies (the data may be memory-mapped)
    y = np.array(y, np.float32).reshape(len(y), cfg.tokens, cfg.width)
    if x.ndim != 2 or x.shape[1] != cfg.voxels or len(x) != len(y):
        raise InputError(f"voxels {x.shape} and tokens {y.shape} do not match a {cfg.voxels}-voxel decoder")
    tr, va = split(len(x), val_fraction, seed)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.random.default_generator.manual_seed(seed)          # only the generators forked here
        if dev.type == "cuda":
            with torch.cuda.device(dev):
                torch.cuda.manual_seed(seed)
        model = BrainGuardMLP(cfg)
        mean = x[tr].mean(0)
        std = x[tr].std(0)
        model.x_mean.copy_(torch.from_numpy(mean))
        model.x_std.copy_(torch.from_numpy(np.where(std > 1e-6, std, 1.0).astype(np.float32)))
        model.to(dev)
        xt, yt = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(len(tr) / batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
        gen = torch.Generator().manual_seed(seed)
        report = TrainReport(epochs=0, best_epoch=0)
        best, best_loss, waited = None, float("inf"), 0
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.from_numpy(tr)[torch.randperm(len(tr), generator=gen)]
            total = 0.0
            for i in range(0, len(order), batch_size):
                rows = order[i:i + batch_size].to(dev)
                loss = decoder_loss(model(xt[rows]), yt[rows], clip_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(rows)
            model.eval()
            with torch.no_grad():
                val = float(decoder_loss(model(xt[va]), yt[va], clip_weight))
            if not math.isfinite(val):
                raise NsdedgeError(f"training diverged at epoch {epoch} (validation loss {val}); lower --lr")
            report.train_loss.append(total / len(tr))
            report.val_loss.append(val)
            report.epochs = epoch
            if progress:
                progress(epoch, report.train_loss[-1], val)
            if val < best_loss - 1e-6:
                best, best_loss, waited, report.best_epoch = copy.deepcopy(model.state_dict()), val, 0, epoch
            else:
                waited += 1
                if waited >= patience:
                    break
        model.load_state_dict(best)
        model.to("cpu").eval()
        with torch.no_grad():
            pred = model(torch.from_numpy(x[va])).numpy()
    report.val_token_corr, report.val_two_way = token_corr(pred, y[va]), two_way(pred, y[va])
    report.seconds = time.perf_counter() - t0
    return model, report
