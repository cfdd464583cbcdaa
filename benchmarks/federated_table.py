"""Federated against single-subject training of the MLP decoder on synthetic subjects with a known answer, and
how local steps per round and adaptive layers move the result (the method's tables, on synthetic data).

    python benchmarks/federated_table.py [--trials 32] [--steps 200] [--seeds 0,1] [--flower-rounds 5]

Subjects: voxel counts 300, 250, 200 (scaled-down NSD subjects), one factor -> token map, voxel maps of their own
(nsdedge.decoders.synth.make_subjects, 16 factors, noise 2.0), `--trials` training trials each, 40 held out.
Every configuration makes the same number of local optimizer steps per client (`--steps`): k local steps x
steps/k rounds; single-subject training makes them alone. Metrics on the held-out trials, averaged over subjects
and seeds: token correlation and 2-way identification. The federation runs in-process (federated.simulate, the
reference the Flower apps are tested against); the Flower simulation is timed per round separately.
Writes benchmarks/results/federated-table.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsdedge.bench import cpu_flags, cpu_name  # noqa: E402
from nsdedge.decoders.federated import Client, FedSettings, initial_shared, simulate  # noqa: E402
from nsdedge.decoders.synth import make_subjects  # noqa: E402

VOXELS = (300, 250, 200)


def _scores(clients, subs) -> tuple[float, float]:
    m = [c.evaluate(d.x_test, d.y_test) for c, d in zip(clients, subs)]
    return float(np.mean([x["token_corr"] for x in m])), float(np.mean([x["two_way"] for x in m]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--flower-rounds", type=int, default=5)
    a = ap.parse_args()
    base = dict(hidden=64, blocks=2, projector_hidden=64, batch_size=16, lr=1e-3, ala_steps=2)
    configs = [("alone", 5, 0)] + [("federated", k, 1) for k in (1, 5, 10, 20)] + \
        [("federated", 5, m) for m in (0, 2, 3)]
    rows = []
    for kind, k, m in configs:
        got, t0 = [], time.perf_counter()
        for seed in (int(s) for s in a.seeds.split(",")):
            subs = make_subjects(voxels=VOXELS, n_train=a.trials, n_test=40, factors=16, noise=2.0, seed=seed)
            s = FedSettings(local_steps=k, adaptive_layers=m, seed=seed, **base)
            clients = [Client(d.x_train, d.y_train, s, i) for i, d in enumerate(subs)]
            if kind == "alone":
                for c in clients:
                    c.synchronise(initial_shared(s))
                    c.train(a.steps)
            else:
                simulate(clients, rounds=a.steps // k)
            got.append(_scores(clients, subs))
        corr, two = np.mean(got, axis=0)
        rows.append({"training": kind, "local_steps": k if kind != "alone" else a.steps,
                     "rounds": a.steps // k if kind != "alone" else 1, "adaptive_layers": m,
                     "token_corr": round(float(corr), 4), "two_way": round(float(two), 4),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    flower = _flower_round_time(a, base)
    record = {"command": " ".join(sys.argv), "voxels": VOXELS, "trials": a.trials, "steps": a.steps,
              "machine": {"cpu": cpu_name(), "cpu_flags": cpu_flags()}, "rows": rows, "flower": flower}
    (ROOT / "benchmarks" / "results" / "federated-table.json").write_text(json.dumps(record, indent=2) + "\n")
    print("\n| training | local steps x rounds | adaptive layers m | token corr | 2-way |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['training']} | {r['local_steps']} x {r['rounds']} | {r['adaptive_layers'] if r['training'] != 'alone' else '-'}"
              f" | {r['token_corr']:.3f} | {r['two_way']:.3f} |")
    print(f"\nFlower simulation ({flower['clients']} clients, h {flower['hidden']}): {flower['seconds_per_round']:.2f} s "
          f"per round over {flower['rounds']} rounds ({flower['total_seconds']:.1f} s with Ray's start)")


def _flower_round_time(a, base: dict) -> dict:
    """The same federation through Flower's Simulation Engine (Ray, one client per subject), timed."""
    from nsdedge.decoders.flower_apps import run_simulation

    subs = make_subjects(voxels=VOXELS, n_train=a.trials, n_test=40, factors=16, noise=2.0, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        spec = []
        for i, d in enumerate(subs):
            np.save(Path(tmp) / f"x{i}.npy", d.x_train)
            np.save(Path(tmp) / f"y{i}.npy", d.y_train)
            spec.append((f"subj{i + 1:02d}", str(Path(tmp) / f"x{i}.npy"), str(Path(tmp) / f"y{i}.npy")))
        t0 = time.perf_counter()
        run_simulation(spec, FedSettings(local_steps=5, adaptive_layers=1, **base), a.flower_rounds, Path(tmp) / "out")
        total = time.perf_counter() - t0
        t1 = time.perf_counter()
        run_simulation(spec, FedSettings(local_steps=5, adaptive_layers=1, **base), 1, Path(tmp) / "out1")
        one = time.perf_counter() - t1
    return {"clients": len(spec), "hidden": base["hidden"], "rounds": a.flower_rounds, "total_seconds": round(total, 2),
            "seconds_per_round": round((total - one) / max(a.flower_rounds - 1, 1), 3)}


if __name__ == "__main__":
    main()
