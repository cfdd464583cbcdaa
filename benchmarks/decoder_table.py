"""The 16-token argument in numbers: decoder size and latency, 16 x 768 against 257 x 768 targets.

For subj01 (15724 voxels): parameters, file size in fp32 / fp16 / int8, and onnxruntime CPU latency of one
trial (median of 20 after 3 warm-up runs) for full-rank and reduced-rank ridge decoders. Graphs are the
ones `nsdedge export` writes (z-scoring and rescaling folded into one MatMul + Add, two for low rank).
Configurations whose fp32 weights exceed --max-gb are sized, not timed.

    python benchmarks/decoder_table.py --out benchmarks/results/decoder_table.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from nsdedge.decoders.linear import LinearDecoder
from nsdedge.export.decoder_export import export_linear_decoder
from nsdedge.export.quantize import to_fp16, to_int8_dynamic
from nsdedge.runtime.session import open_graph

VOXELS = 15724
WIDTH = 768


def decoder(tokens: int, rank: int | None, seed: int = 0) -> LinearDecoder:
    rng = np.random.default_rng(seed)
    d = tokens * WIDTH
    kw = {}
    if rank is None:
        kw["weight"] = rng.standard_normal((VOXELS, d), dtype=np.float32) / np.sqrt(VOXELS)
    else:
        kw["u"] = rng.standard_normal((VOXELS, rank), dtype=np.float32) / np.sqrt(VOXELS)
        kw["vt"] = rng.standard_normal((rank, d), dtype=np.float32) / np.sqrt(rank)
    return LinearDecoder(subject="subj01", x_mean=np.zeros(VOXELS, np.float32), x_std=np.ones(VOXELS, np.float32),
                         bias=np.zeros(d, np.float32), tokens=tokens, width=WIDTH, **kw)


def latency(path: Path) -> float:
    s = open_graph(path, "cpu")
    x = {"voxels": np.random.default_rng(1).standard_normal((1, VOXELS)).astype(np.float32)}
    for _ in range(3):
        s.run(x)
    t = []
    for _ in range(20):
        t0 = time.perf_counter()
        s.run(x)
        t.append(time.perf_counter() - t0)
    return float(np.median(t)) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decoder_table.md"))
    ap.add_argument("--max-gb", type=float, default=1.0, help="time only decoders up to this fp32 size")
    a = ap.parse_args()
    rows = []
    for tokens in (16, 257):
        for rank in (None, 1024, 256):
            d = tokens * WIDTH
            params = VOXELS * d if rank is None else rank * (VOXELS + d)
            row = {"tokens": tokens, "rank": rank or "full", "params_M": params / 1e6,
                   "fp32_MB": params * 4 / 2 ** 20, "fp16_MB": params * 2 / 2 ** 20, "int8_MB": params / 2 ** 20}
            if params * 4 / 2 ** 30 <= a.max_gb:
                with tempfile.TemporaryDirectory() as tmp:
                    f32 = Path(tmp) / "d.onnx"
                    export_linear_decoder(decoder(tokens, rank), f32)
                    to_fp16(f32, Path(tmp) / "d16.onnx")
                    to_int8_dynamic(f32, Path(tmp) / "d8.onnx", op_types=("MatMul",))
                    for p, name in (("fp32", "d.onnx"), ("fp16", "d16.onnx"), ("int8", "d8.onnx")):
                        size = sum(f.stat().st_size for f in Path(tmp).glob(name + "*"))
                        row[f"{p}_MB"] = size / 2 ** 20
                        row[f"{p}_ms"] = latency(Path(tmp) / name)
            rows.append(row)
            print(row, flush=True)
    head = ("| tokens | rank | params (M) | fp32 MB | fp16 MB | int8 MB | fp32 ms | fp16 ms | int8 ms |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    fmt = lambda r, k: f"{r[k]:.1f}" if k in r else "not timed"  # noqa: E731
    body = "".join(f"| {r['tokens']} | {r['rank']} | {r['params_M']:.1f} | {r['fp32_MB']:.0f} | {r['fp16_MB']:.0f} | "
                   f"{r['int8_MB']:.0f} | {fmt(r, 'fp32_ms')} | {fmt(r, 'fp16_ms')} | {fmt(r, 'int8_ms')} |\n"
                   for r in rows)
    text = (f"Ridge decoders for subj01 ({VOXELS} voxels), one trial, onnxruntime CPU provider.\n"
            f"Sizes are measured files where timed, computed (params x bytes) otherwise.\n\n" + head + body)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
