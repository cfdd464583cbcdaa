"""Probe for the next CPU lever: one SD 1.5 self-attention at the 64 x 64 latent level (4096 tokens, 8 heads
of 40, batch 2) as the exported graph computes it (MatMul -> Softmax -> MatMul) against onnxruntime's fused
com.microsoft.MultiHeadAttention contrib op, on the CPU provider with nsdedge's session settings.

    python benchmarks/attention_cpu.py

Seen on the 2-core benchmark machine (onnxruntime 1.31.1): unfused 0.516 s, fused 0.147 s, max |diff| 1.4e-7.
SD 1.5 runs five such attentions per UNet call, so at batch 2 about 2.6 s of a 5.2 s step is this pattern.
"""
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper

B, S, H, D = 2, 4096, 8, 40
E = H * D
def sess(model):
    model.ir_version = 10
    o = ort.SessionOptions(); o.enable_cpu_mem_arena = False; o.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"])
inp = [helper.make_tensor_value_info(n, T.FLOAT, [B, S, E]) for n in "qkv"]
out = [helper.make_tensor_value_info("o", T.FLOAT, [B, S, E])]
mha = helper.make_model(helper.make_graph([helper.make_node("MultiHeadAttention", ["q","k","v"], ["o"], domain="com.microsoft", num_heads=H)], "mha", inp, out),
                        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
shape = helper.make_tensor("shp", T.INT64, [4], [B, S, H, D])
oshape = helper.make_tensor("oshp", T.INT64, [3], [B, S, E])
scale = helper.make_tensor("sc", T.FLOAT, [], [1 / np.sqrt(D)])
nodes = []
for n in "qkv":
    nodes += [helper.make_node("Reshape", [n, "shp"], [n + "r"]), helper.make_node("Transpose", [n + "r"], [n + "t"], perm=[0, 2, 1, 3])]
nodes += [helper.make_node("Transpose", ["kt"], ["ktt"], perm=[0, 1, 3, 2]), helper.make_node("MatMul", ["qt", "ktt"], ["s"]),
          helper.make_node("Mul", ["s", "sc"], ["s2"]), helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
          helper.make_node("MatMul", ["p", "vt"], ["a"]), helper.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 1, 3]),
          helper.make_node("Reshape", ["at", "oshp"], ["o"])]
plain = helper.make_model(helper.make_graph(nodes, "plain", inp, out, [shape, oshape, scale]), opset_imports=[helper.make_opsetid("", 18)])
rng = np.random.default_rng(0)
f = {n: rng.standard_normal((B, S, E), dtype=np.float32) for n in "qkv"}
res = {}
for name, m in (("plain", plain), ("mha", mha)):
    s = sess(m); s.run(None, f)
    t = time.time(); r = s.run(None, f)[0]; res[name] = r
    print(name, f"{time.time() - t:.3f} s")
print("max diff", np.abs(res["plain"] - res["mha"]).max())
