"""Where a UNet step goes: onnxruntime's profiler (or OpenVINO's per-node counters) over one call of a bundle's
UNet, summed per op type.

    python benchmarks/profile_unet.py BUNDLE [--batch 2] [--runs 2] [--provider cpu|openvino]

Opens the graph through nsdedge's one seam (runtime/session.py, the runtime's CPU settings) with profiling on,
discards the first (warm-up) call, and prints the share of node time per op type for the last one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from nsdedge.bundle import read_manifest
    from nsdedge.runtime.session import open_session

    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--provider", default="auto", help="cpu (onnxruntime) or openvino; auto: the bundle's")
    a = ap.parse_args()
    m = read_manifest(a.bundle, verify=False)
    provider = a.provider if a.provider != "auto" else "openvino" if m.extra.get("target") == "openvino" else "cpu"
    sess = open_session(a.bundle, "unet", provider, manifest=m, profile="/tmp/nsdedge-unet-profile")
    h, w = m.latent_size
    rng = np.random.default_rng(0)
    b = a.batch
    feeds = {"sample": rng.standard_normal((b, m.latent_channels, h, w), dtype=np.float32),
             "timestep": np.array([500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((b, 77, 768), dtype=np.float32),
             "ip_tokens": rng.standard_normal((b, 16, 768), dtype=np.float32), "ip_scale": np.array([1.0], np.float32)}
    for _ in range(a.runs):
        t = time.perf_counter()
        sess.run(feeds)
        step = time.perf_counter() - t
    if provider == "openvino":
        per_type = sess.profile_by_type()
        total = sum(per_type.values())
        print(f"{a.bundle} ({m.precision}, OpenVINO {sess.hint}), batch {b}: step {step:.2f} s, "
              f"node time {total:.2f} s")
        for op, s in sorted(per_type.items(), key=lambda kv: -kv[1])[:14]:
            print(f"  {op:<48}{s:8.2f} s {100 * s / total:5.1f} %")
        return
    trace = json.loads(sess.end_profiling().read_text())
    runs = [e for e in trace if e.get("name") == "model_run"]
    last = runs[-1]
    start, end = last["ts"], last["ts"] + last["dur"]
    per_op: dict[str, float] = defaultdict(float)
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and start <= e["ts"] <= end:
            per_op[e["args"]["op_name"]] += e["dur"] / 1e6
    total = sum(per_op.values())
    print(f"{a.bundle} ({m.precision}), batch {b}: model_run {last['dur'] / 1e6:.2f} s, node time {total:.2f} s")
    for op, s in sorted(per_op.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {op:<28}{s:8.2f} s {100 * s / total:5.1f} %")


if __name__ == "__main__":
    main()
