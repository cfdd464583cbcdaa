"""Flower apps for training the MLP decoder across subjects (federated.py's algorithm on Flower's Message API).

    client  a train handler: synchronise with the global shared weights (three bands), train local_steps, reply
            with the shared weights and the number of training examples. Nothing else leaves the client: the input
            layer, the z-scoring and the ALA weights live in the node's Context.state.
            An evaluate handler: synchronise a copy, report held-out loss / token correlation / 2-way, and in the
            last round write the subject's decoder where the server's config says (on the client's own disk).
    server  FedAvg over the shared weights, weighted by examples, for R rounds; a JSON report of every round.

In simulation (`nsdedge fit-federated`, Flower's Simulation Engine on Ray) supernode i is subject i. On separate
machines (Flower's Deployment Engine) each SuperNode names its data in its node config:
    flower-supernode --node-config 'subject="subj01" voxels="/data/X1.npy" embeddings="/data/Y1.npy" index=0' ...
and `flwr run` starts `nsdedge.decoders.flower_apps:server_app` / `:client_app` with a run config of
FedSettings' fields plus rounds, clients and out (README).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from ..errors import InputError
from .federated import Client, FedSettings, initial_shared, shared_state

log = logging.getLogger(__name__)
_DATA: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}     # per worker process: read once


def _data(voxels: str, embeddings: str) -> tuple[np.ndarray, np.ndarray]:
    if (voxels, embeddings) not in _DATA:
        from ..voxels import load_voxels, read_array

        x = load_voxels(voxels)
        y = read_array(embeddings, what="embeddings")
        if len(y) != len(x):
            raise InputError(f"{embeddings}: {len(y)} rows, {voxels} has {len(x)}")
        _DATA[(voxels, embeddings)] = (x, np.asarray(y, np.float32))
    return _DATA[(voxels, embeddings)]


def _spec(context: Context, subjects: list[tuple[str, str, str]] | None) -> tuple[int, str, str, str]:
    """(index, subject, voxels file, embeddings file) of this node: from its node config (a SuperNode started with
    --node-config), else the simulation's partition id into `subjects` or into the run config's
    `subject-<i> = "S=X.npy:Y.npy"` entries (`flwr run` of examples/flower)."""
    nc = context.node_config
    if "voxels" in nc:
        return int(nc.get("index", 0)), str(nc["subject"]), str(nc["voxels"]), str(nc["embeddings"])
    i = int(nc["partition-id"])
    if subjects is None:
        entry = str(context.run_config.get(f"subject-{i}", ""))
        name, _, files = entry.partition("=")
        voxels, _, embeddings = files.partition(":")
        if not (name and voxels and embeddings):
            raise InputError(f"node {i}: no data; start its SuperNode with --node-config 'subject=... voxels=... "
                             f"embeddings=...', or set subject-{i} = \"S=X.npy:Y.npy\" in the run config")
        return i, name, voxels, embeddings
    subject, voxels, embeddings = subjects[i]
    return i, subject, voxels, embeddings


def _client(context: Context, config, subjects) -> tuple[Client, str]:
    index, subject, voxels, embeddings = _spec(context, subjects)
    x, y = _data(voxels, embeddings)
    c = Client(x, y, FedSettings.from_config(config), index)
    if "model" in context.state:                                   # this node's earlier rounds
        c.model.load_state_dict(context.state["model"].to_torch_state_dict())
        c.ala = context.state["ala"].to_torch_state_dict() if "ala" in context.state else {}
        c.rounds = int(context.state["client"]["rounds"])
    return c, subject


def make_client_app(subjects: list[tuple[str, str, str]] | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        c, _ = _client(context, msg.content["config"], subjects)
        c.synchronise(msg.content["arrays"].to_torch_state_dict())
        loss = c.train()
        context.state["model"] = ArrayRecord(c.model.state_dict())       # stays on this node
        if c.ala:
            context.state["ala"] = ArrayRecord(c.ala)
        context.state["client"] = ConfigRecord({"rounds": c.rounds})
        reply = RecordDict({"arrays": ArrayRecord(shared_state(c.model)),
                            "metrics": MetricRecord({"train_loss": loss, "num-examples": c.examples})})
        return Message(content=reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        c, subject = _client(context, cfg, subjects)
        c.synchronise(msg.content["arrays"].to_torch_state_dict())     # a copy: the node's state is not changed
        m = c.evaluate()
        # the decoder is saved after the last round, and only by a node that trained in every round: a client
        # whose training failed would otherwise save the untrained model (the simulation then says one is missing)
        if cfg.get("out") and int(cfg["server-round"]) == int(cfg["rounds"]) == c.rounds:
            _save(c, subject, Path(str(cfg["out"])))
        metrics = {**{k: float(v) for k, v in m.items()}, "client": c.index, "num-examples": len(c.va)}
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def _save(c: Client, subject: str, out: Path) -> None:
    from safetensors.torch import save as save_bytes

    from ..bundle import atomic_writer

    out.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out / f"{subject}.safetensors") as f:
        f.write(save_bytes({k: v.contiguous() for k, v in c.model.state_dict().items()},
                           metadata=c.model.metadata(subject)))


def _per_client(records: list[RecordDict], weighting: str) -> MetricRecord:
    """Evaluation metrics kept per client (KEY-INDEX) rather than averaged away."""
    out = {}
    for r in records:
        for rec in r.metric_records.values():
            out.update({f"{k}-{int(rec['client'])}": v for k, v in rec.items() if k not in (weighting, "client")})
    return MetricRecord(out)


def make_server_app(settings: FedSettings | None = None, rounds: int | None = None, clients: int | None = None,
                    out: str | Path | None = None, names: list[str] | None = None) -> ServerApp:
    """The server; what is not given comes from the run config (`flwr run`): FedSettings' fields, rounds, clients,
    out."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        rc = context.run_config
        s = settings or FedSettings.from_config(rc)
        n, r = clients or int(rc["clients"]), rounds or int(rc["rounds"])
        dest = str(out or rc.get("out", ""))
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n,
                          min_available_nodes=n, evaluate_metrics_aggr_fn=_per_client)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_shared(s)), num_rounds=r,
                                train_config=ConfigRecord(s.config()),
                                evaluate_config=ConfigRecord({**s.config(), "rounds": r, "out": dest}))
        if dest:
            report = {"settings": s.config(), "rounds": r, "subjects": names or [],
                      "train_loss": {k: float(v["train_loss"]) for k, v in result.train_metrics_clientapp.items()},
                      "evaluate": {k: dict(v) for k, v in result.evaluate_metrics_clientapp.items()}}
            from ..bundle import atomic_write_bytes, json_text

            Path(dest).mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(Path(dest) / "federated.json", json_text(report).encode())

    return app


def run_simulation(subjects: list[tuple[str, str, str]], settings: FedSettings, rounds: int, out: str | Path,
                   cpus_per_client: float = 1.0, ray_init: dict | None = None) -> dict:
    """The federation on this machine with Flower's Simulation Engine (Ray): one SuperNode per (subject, voxels
    file, embeddings file). Writes out/SUBJECT.safetensors per subject and out/federated.json; returns the report."""
    from flwr.simulation import run_simulation as flower_simulation

    out = Path(out).absolute()
    backend = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
               "init_args": {"include_dashboard": False, "logging_level": logging.ERROR, **(ray_init or {})}}
    flower_simulation(server_app=make_server_app(settings, rounds, len(subjects), out, [s[0] for s in subjects]),
                      client_app=make_client_app([(s, str(Path(x).absolute()), str(Path(y).absolute()))
                                                  for s, x, y in subjects]),
                      num_supernodes=len(subjects), backend_config=backend)
    report = out / "federated.json"
    if not report.is_file() or any(not (out / f"{s}.safetensors").is_file() for s, _, _ in subjects):
        raise InputError("the Flower simulation ended without every subject's decoder (see the log above)")
    return json.loads(report.read_text())


# `flwr run` entry points (Deployment Engine): data from each SuperNode's node config, settings from the run config
client_app = make_client_app()
server_app = make_server_app()
