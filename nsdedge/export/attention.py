"""Fused attention for the onnxruntime target: aten::scaled_dot_product_attention -> com.microsoft.MultiHeadAttention.

As exported by default, attention is MatMul -> Softmax -> MatMul over a materialised (B, heads, S, S) score map:
at SD 1.5's 64 x 64 latent level that is 2 x 8 x 4096 x 4096 floats (1 GiB) per self-attention, and on the CPU
provider about half of a UNet step (benchmarks/attention_cpu.py). onnxruntime's MultiHeadAttention contrib op
(CPU and CUDA kernels) computes the same thing without materialising it. It takes (B, S, heads * d) inputs, so
the translation moves heads back next to d; the exporter's (B, S, heads, d) <-> (B, heads, S, d) transposes
on either side then cancel.

TensorRT's ONNX parser does not know com.microsoft ops, so bundles for --target tensorrt keep the standard ops
(TensorRT fuses attention itself).
"""

from __future__ import annotations

import math

import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op

_P = OpSchema.FormalParameter
# onnxscript builds nodes from a schema; onnx has none for onnxruntime's contrib ops, so declare the part we use
_MHA_SCHEMA = OpSchema(
    "MultiHeadAttention", "com.microsoft", 1, doc="onnxruntime contrib op (the inputs and attributes used here)",
    inputs=[_P("query", "T"), _P("key", "T"), _P("value", "T")], outputs=[_P("output", "T")],
    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
    attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "number of heads"),
                OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "scale of q k^T (default 1/sqrt(d))")])
_MHA = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MultiHeadAttention", _MHA_SCHEMA)


def _merge_heads(x):
    """(B, heads, S, d) -> (B, S, heads * d)"""
    return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


def sdpa_as_multihead_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                                scale: float | None = None, enable_gqa: bool = False):
    """Translation of aten::scaled_dot_product_attention for torch.onnx.export(dynamo=True)."""
    heads, d = query.shape[1], query.shape[3]
    if attn_mask is not None or is_causal or dropout_p or enable_gqa or not isinstance(heads, int) \
            or not isinstance(d, int):
        raise NotImplementedError("fused attention covers unmasked, non-causal attention with static heads")
    attrs = {"num_heads": heads}
    if scale is not None and not math.isclose(scale, 1 / math.sqrt(d)):
        attrs["scale"] = float(scale)
    out = _MHA(_merge_heads(query), _merge_heads(key), _merge_heads(value), **attrs)   # (B, S, heads * d)
    return op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, heads, d])), perm=[0, 2, 1, 3])


FUSED_ATTENTION = {torch.ops.aten.scaled_dot_product_attention.default: sdpa_as_multihead_attention}
