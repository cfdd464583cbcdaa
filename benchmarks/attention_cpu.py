"""Probe for the next CPU lever: one SD 1.5 self-attention at the 64 x 64 latent level (4096 tokens, 8 heads
of 40, batch 2) as the exported graph computes it (MatMul -> Softmax -> MatMul) against onnxruntime's fused
com.microsoft.MultiHeadAttention contrib op, on the CPU provider with nsdedge's session settings.

    python benchmarks/attention_cpu.py

Seen on the 2-core benchmark machine (onnxruntime 1.31.1): unfused 0.516 s, fused 0.147 s, max |diff| 1.4e-7.
SD 1.5 runs five such attentions per UNet call, so at batch 2 about 2.6 s of a 5.2 s step is this pattern.
"""
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nsdedge.runtime.session import open_graph  # noqa: E402

B, S, H, D = 2, 4096, 8, 40      # batch 2 (guidance), 64 x 64 tokens, SD 1.5's 8 heads of 40 at 320 channels
E = H * D


def session(model):
    """The graph on the CPU through nsdedge's one seam (the runtime's session settings)."""
    model.ir_version = 10
    return open_graph(model.SerializeToString(), "cpu")


def io():
    return ([helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, S, E]) for n in "qkv"],
            [helper.make_tensor_value_info("o", TensorProto.FLOAT, [B, S, E])])


def fused():
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=H)
    return helper.make_model(helper.make_graph([node], "fused", *io()),
                             opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def unfused():
    """(B, S, E) -> heads -> softmax(q k^T / sqrt(D)) v -> (B, S, E), the shape of the exported graph."""
    consts = [helper.make_tensor("heads", TensorProto.INT64, [4], [B, S, H, D]),
              helper.make_tensor("merged", TensorProto.INT64, [3], [B, S, E]),
              helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / np.sqrt(D)])]
    nodes = []
    for n in "qkv":
        nodes += [helper.make_node("Reshape", [n, "heads"], [n + "_h"]),
                  helper.make_node("Transpose", [n + "_h"], [n + "_t"], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Transpose", ["k_t"], ["k_tt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q_t", "k_tt"], ["scores"]),              # (B, H, S, S)
              helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
              helper.make_node("Softmax", ["scaled"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v_t"], ["a"]),
              helper.make_node("Transpose", ["a"], ["a_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["a_t", "merged"], ["o"])]
    return helper.make_model(helper.make_graph(nodes, "unfused", *io(), consts),
                             opset_imports=[helper.make_opsetid("", 18)])


def main() -> None:
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((B, S, E), dtype=np.float32) for n in "qkv"}
    out = {}
    for name, model in (("unfused", unfused()), ("fused", fused())):
        s = session(model)
        s.run(feeds)                                        # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            out[name] = s.run(feeds)["o"]
            times.append(time.perf_counter() - t)
        print(f"{name:8s} median {np.median(times):.3f} s")
    print(f"max |diff| {np.abs(out['unfused'] - out['fused']).max():.2e}")


if __name__ == "__main__":
    main()
