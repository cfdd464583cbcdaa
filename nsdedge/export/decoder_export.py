"""A linear decoder as an ONNX graph: voxels (N, V) -> ip_tokens (N, 16, 768), z-scoring and rescaling folded in."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..decoders.linear import LinearDecoder
from .onnx_export import OPSET, GraphSpec, save_onnx, verify_onnx

DECODER_REL_L2 = 1e-5   # fp32 parity bound against the numpy reference (issue "decoders")


def decoder_spec(subject: str) -> GraphSpec:
    return GraphSpec(component=f"decoder-{subject}", inputs=("voxels",), outputs=("ip_tokens",),
                     dynamic={"voxels": {0: ("batch", 1)}}, rel_l2=DECODER_REL_L2)


def export_linear_decoder(dec: LinearDecoder, path: Path, seed: int = 0) -> tuple[list[str], dict]:
    """Write the folded decoder as MatMul(s) + Add + Reshape, verify against `dec.predict`, return manifest data."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    spec = decoder_spec(dec.subject)
    mats, c = dec.folded()
    inits = [numpy_helper.from_array(m, f"w{i}") for i, m in enumerate(mats)]
    inits += [numpy_helper.from_array(c, "bias"),
              numpy_helper.from_array(np.array([-1, dec.tokens, dec.width], np.int64), "token_shape")]
    nodes, prev = [], "voxels"
    for i in range(len(mats)):
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"], name=f"MatMul_{i}"))
        prev = f"mm{i}"
    nodes.append(helper.make_node("Add", [prev, "bias"], ["flat_tokens"], name="Add_bias"))
    nodes.append(helper.make_node("Reshape", ["flat_tokens", "token_shape"], ["ip_tokens"], name="Reshape_tokens"))
    graph = helper.make_graph(
        nodes, spec.component,
        [helper.make_tensor_value_info("voxels", TensorProto.FLOAT, ["batch", dec.voxels])],
        [helper.make_tensor_value_info("ip_tokens", TensorProto.FLOAT, ["batch", dec.tokens, dec.width])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="nsdedge")
    model.ir_version = 10   # onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads up to 13
    onnx.checker.check_model(model, full_check=False)
    path = Path(path)
    files = save_onnx(model, path)
    x = np.random.default_rng(seed).standard_normal((2, dec.voxels)).astype(np.float32) * dec.x_std + dec.x_mean
    x = x.astype(np.float32)
    err = verify_onnx(path, spec, {"voxels": x}, dec.predict(x))
    entry = {"inputs": [{"name": "voxels", "shape": ["batch", dec.voxels], "dtype": "float32"}],
             "outputs": [{"name": "ip_tokens", "shape": ["batch", dec.tokens, dec.width], "dtype": "float32"}],
             "parity": {"ip_tokens": err}, "subject": dec.subject, "voxels": dec.voxels, "kind": "ridge",
             "rank": dec.rank}
    return files, entry


def export_mlp_decoder(model, path: Path, seed: int = 0) -> tuple[list[str], dict]:
    """The BrainGuard-style MLP through torch's exporter, verified against the torch module (batch 2 and 1)."""
    import torch

    from .onnx_export import export_and_verify

    spec = decoder_spec(model.subject)
    g = torch.Generator().manual_seed(seed)
    mean, std = model.x_mean, model.x_std

    def sample(n):
        return (torch.randn(n, model.voxels, generator=g) * std + mean,)

    files, entry = export_and_verify(model.eval(), spec, sample(2), Path(path), checks=[sample(2), sample(1)])
    entry.update(subject=model.subject, voxels=model.voxels, kind="mlp", rank=None)
    return files, entry


def export_decoder(dec, path: Path) -> tuple[list[str], dict]:
    if isinstance(dec, LinearDecoder):
        return export_linear_decoder(dec, path)
    return export_mlp_decoder(dec, path)


def read_any_decoder(path: Path):
    """A decoder file of either kind: a ridge safetensors from `nsdedge fit`, or an MLP (safetensors or torch)."""
    from ..decoders.linear import read_decoder, read_safetensors
    from ..decoders.mlp import read_mlp

    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        if read_safetensors(path, tensors=False)[0].get("kind") == "ridge":
            return read_decoder(path)
    model, subject = read_mlp(path)
    model.subject = subject or "subj01"
    return model


__all__ = ["export_linear_decoder", "export_mlp_decoder", "export_decoder", "read_any_decoder", "decoder_spec"]
