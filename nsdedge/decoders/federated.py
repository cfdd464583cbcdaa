"""Training the MLP decoder across subjects without moving their data (BrainGuard's scheme), the algorithm part.

Each subject is a client holding its voxels and tokens. The model (mlp.py) splits in two:
    local   the input layer Linear(V_s, h) and the voxel z-scoring: never leaves the client (voxel counts differ)
    shared  the residual blocks, the head and the token projector: averaged by the server (FedAvg, by samples)
Every round a client receives the global shared weights and synchronises in three bands before training:
    retention        the input layer stays the client's own
    global alignment the intermediate shared layers take the global weights
    adaptive tuning  the last m shared layers blend: theta = theta_l + (theta_g - theta_l) * W, with W learned
                     elementwise on local data and clipped to [0, 1] (FedALA's adaptive local aggregation; W persists
                     across rounds on the client)
then trains `local_steps` minibatch steps and sends back its shared weights only. The Flower apps that carry this
between machines are in flower_apps.py; this module is torch only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.func import functional_call

from .mlp import BrainGuardMLP, MLPConfig
from .train import decoder_loss, split, token_corr, two_way

LOCAL_PREFIXES = ("input.", "x_mean", "x_std")


@dataclass
class FedSettings:
    """What the server sends every client each round (a Flower ConfigRecord of these fields)."""

    hidden: int = 2048
    blocks: int = 4
    projector_hidden: int = 2048
    dropout: float = 0.15
    local_steps: int = 1            # minibatch steps per round
    adaptive_layers: int = 2        # m: the last m shared layers are blended by ALA
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-2
    val_fraction: float = 0.1
    ala_steps: int = 5              # W's SGD steps per round (FedALA's eta = 1.0)
    ala_lr: float = 1.0
    seed: int = 0

    def config(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, cfg) -> "FedSettings":
        known = {k: type(v) for k, v in asdict(cls()).items()}
        return cls(**{k: known[k](cfg[k]) for k in known if k in cfg})


def is_shared(name: str) -> bool:
    return not name.startswith(LOCAL_PREFIXES)


def shared_state(model: BrainGuardMLP) -> dict[str, torch.Tensor]:
    """What a client sends: the shared parameters, detached copies."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if is_shared(k)}


def layer_groups(model: BrainGuardMLP) -> list[list[str]]:
    """The shared parameters as layers, input to output: each block (Linear + its norm), the head, and the
    projector's three stages (norm + Linear each)."""
    names = [n for n, _ in model.named_parameters() if is_shared(n)]
    groups: dict[str, list[str]] = {}
    for n in names:
        parts = n.split(".")
        if parts[0] == "blocks":
            key = f"blocks.{parts[1]}"
        elif parts[0] == "projector":
            key = f"projector.{int(parts[1]) // 3}"       # (LN, GELU, Linear) x 3
        else:
            key = parts[0]
        groups.setdefault(key, []).append(n)
    return list(groups.values())


class Client:
    """One subject's side: its data, its model (the local layer included), its ALA weights."""

    def __init__(self, x: np.ndarray, y: np.ndarray, s: FedSettings, index: int = 0):
        self.s = s
        x = np.array(x, np.float32)                     # own, writable copies (the data may be memory-mapped)
        self.y = np.array(y, np.float32).reshape(len(y), 16, -1)
        tr, va = split(len(x), s.val_fraction, s.seed + index)
        self.tr, self.va = tr, va
        self.x = torch.from_numpy(x)
        self.yt = torch.from_numpy(self.y)
        self.index = index
        cfg = MLPConfig(voxels=x.shape[1], hidden=s.hidden, blocks=s.blocks, projector_hidden=s.projector_hidden,
                        dropout=s.dropout, width=self.y.shape[-1])
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(s.seed * 1000 + index)
            self.model = BrainGuardMLP(cfg)
        std = x[tr].std(0)
        self.model.x_mean.copy_(torch.from_numpy(x[tr].mean(0)))
        self.model.x_std.copy_(torch.from_numpy(np.where(std > 1e-6, std, 1.0).astype(np.float32)))
        self.ala: dict[str, torch.Tensor] = {}
        self.rounds = 0

    @property
    def examples(self) -> int:
        return len(self.tr)

    # -- the three bands ----------------------------------------------------------------------------
    def synchronise(self, global_shared: dict[str, torch.Tensor]) -> None:
        """Retention (input layer kept), global alignment (intermediate layers := global), adaptive tuning (last
        m layers blended by ALA). In the first round there is nothing local to keep yet: every shared layer takes
        the global weights."""
        groups = layer_groups(self.model)
        m = min(self.s.adaptive_layers, len(groups)) if self.rounds else 0
        adaptive = [n for g in groups[len(groups) - m:] for n in g] if m else []
        state = self.model.state_dict()
        for k, v in global_shared.items():
            if k not in adaptive:
                state[k] = v.clone()
        self.model.load_state_dict(state)
        if adaptive:
            self._adapt(global_shared, adaptive)

    def _adapt(self, global_shared: dict[str, torch.Tensor], names: list[str]) -> None:
        """FedALA: learn W in [0, 1] elementwise so that theta_l + (theta_g - theta_l) * W fits local data."""
        params = dict(self.model.named_parameters())
        local = {n: params[n].detach().clone() for n in names}
        diff = {n: global_shared[n] - local[n] for n in names}
        weights = {n: self.ala.get(n, torch.ones_like(local[n])).clone().requires_grad_(True) for n in names}
        fixed = {k: v.detach() for k, v in self.model.state_dict().items() if k not in names}
        self.model.eval()
        for _ in range(self.s.ala_steps):
            rows = self._batch()
            blended = {n: local[n] + diff[n] * weights[n] for n in names}
            loss = decoder_loss(functional_call(self.model, {**fixed, **blended}, (self.x[rows],)), self.yt[rows])
            grads = torch.autograd.grad(loss, [weights[n] for n in names])
            with torch.no_grad():
                for n, g in zip(names, grads):
                    weights[n].sub_(self.s.ala_lr * g).clamp_(0, 1)
        with torch.no_grad():
            for n in names:
                params[n].copy_(local[n] + diff[n] * weights[n])
                self.ala[n] = weights[n].detach().clone()

    # -- local training ------------------------------------------------------------------------------
    @property
    def gen(self) -> torch.Generator:
        """This round's stream (seed, client, round): a client rebuilt from its saved state draws the same."""
        if getattr(self, "_gen_round", None) != self.rounds:
            self._gen = torch.Generator().manual_seed(self.s.seed * 1_000_003 + self.index * 10_007 + self.rounds)
            self._gen_round = self.rounds
        return self._gen

    def _batch(self) -> torch.Tensor:
        pick = torch.randperm(len(self.tr), generator=self.gen)[:self.s.batch_size]
        return torch.from_numpy(self.tr)[pick]

    def train(self, steps: int | None = None) -> float:
        """`local_steps` AdamW steps on local minibatches; returns the mean training loss."""
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.s.lr, weight_decay=self.s.weight_decay)
        self.model.train()
        total = 0.0
        n = steps if steps is not None else self.s.local_steps
        with torch.random.fork_rng(devices=[]):               # dropout draws from a seeded stream of the client's
            torch.random.default_generator.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=self.gen)))
            for _ in range(n):
                rows = self._batch()
                loss = decoder_loss(self.model(self.x[rows]), self.yt[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
        self.model.eval()
        self.rounds += 1
        return total / max(n, 1)

    def evaluate(self, x: np.ndarray | None = None, y: np.ndarray | None = None) -> dict[str, float]:
        """Validation loss, token correlation and 2-way identification (on x, y if given, else the held-out split)."""
        xv = self.x[self.va] if x is None else torch.from_numpy(np.asarray(x, np.float32))
        yv = self.y[self.va] if y is None else np.asarray(y, np.float32).reshape(len(y), 16, -1)
        with torch.no_grad():
            pred = self.model(xv)
            loss = float(decoder_loss(pred, torch.from_numpy(yv)))
        pred = pred.numpy()
        return {"val_loss": loss, "token_corr": token_corr(pred, yv), "two_way": two_way(pred, yv)}


def fedavg(states: list[dict[str, torch.Tensor]], examples: list[int]) -> dict[str, torch.Tensor]:
    """The server's step: the shared weights averaged, weighted by each client's training examples (in float32,
    client by client, as Flower's FedAvg accumulates)."""
    total = float(sum(examples))
    out: dict[str, torch.Tensor] = {}
    for state, n in zip(states, examples):
        for k, v in state.items():
            out[k] = v * (n / total) if k not in out else out[k] + v * (n / total)
    return out


def initial_shared(s: FedSettings, width: int = 768) -> dict[str, torch.Tensor]:
    """The server's starting point: the shared layers of a seeded model (its input layer is never used)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(s.seed)
        model = BrainGuardMLP(MLPConfig(voxels=1, hidden=s.hidden, blocks=s.blocks, projector_hidden=s.projector_hidden,
                                        dropout=s.dropout, width=width))
    return shared_state(model)


def simulate(clients: list[Client], rounds: int, progress=None) -> dict[str, torch.Tensor]:
    """The whole federation in one process (no Flower): what the Flower apps do, for experiments and as their
    reference. Returns the final global shared weights; each client ends synchronised with them."""
    glob = initial_shared(clients[0].s, clients[0].y.shape[-1])
    for r in range(1, rounds + 1):
        states, losses = [], []
        for c in clients:
            c.synchronise(glob)
            losses.append(c.train())
            states.append(shared_state(c.model))
        glob = fedavg(states, [c.examples for c in clients])
        if progress:
            progress(r, float(np.mean(losses)))
    for c in clients:
        c.synchronise(glob)
    return glob
