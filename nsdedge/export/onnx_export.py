"""torch -> ONNX with a parity check against the torch module on the same inputs."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ParityError

log = logging.getLogger(__name__)

OPSET = 18                       # torch's dynamo exporter was exact at 18 (REFERENCE.md)
EXTERNAL_DATA_BYTES = 1 << 30    # weights above 1 GiB go to `<file>.data` (protobuf's limit is 2 GiB)
FP32_REL_L2 = 1e-4               # the fp32 parity bound of every exported graph


@dataclass(frozen=True)
class GraphSpec:
    """Everything about one exported graph, as data.

    `dynamic` maps an input name to {axis: (dim name, multiple of)}: batch is dynamic everywhere;
    spatial axes are dynamic in steps of the UNet's downsampling factor.
    """

    component: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, tuple[str, int]]] = field(default_factory=dict)
    rel_l2: float = FP32_REL_L2
    opset: int = OPSET
    fused_attention: bool = False     # scaled_dot_product_attention -> com.microsoft.MultiHeadAttention
    output_dynamic: dict[str, dict[int, str]] = field(default_factory=dict)   # for the opset < 18 exporter


def io_signature(path: Path) -> tuple[list, list]:
    """Manifest entries (name, shape with symbolic dims as strings, dtype) read off the written graph."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)

    def entry(v):
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name
        return {"name": v.name, "shape": shape, "dtype": dtype}
    return [entry(v) for v in model.graph.input], [entry(v) for v in model.graph.output]


# torch.export guards the batch of the UNet and VAE graphs at <= 63 (diffusers' kernels); declared up front, the
# exporter traces once instead of failing, refining the bound and tracing again (a third of a tiny export's time).
# The ONNX graphs keep a symbolic batch.
MAX_BATCH = 63


def _dynamic_shapes(spec: GraphSpec) -> dict[str, dict[int, object] | None]:
    dims: dict[str, object] = {}
    shapes: dict[str, dict[int, object] | None] = {}
    for name in spec.inputs:
        axes = spec.dynamic.get(name)
        if not axes:
            shapes[name] = None
            continue
        shapes[name] = {}
        for axis, (dim_name, multiple) in axes.items():
            if dim_name not in dims:
                top = MAX_BATCH if dim_name == "batch" else 4096
                base = torch.export.Dim(f"{dim_name}_over_{multiple}" if multiple > 1 else dim_name, min=1, max=top)
                dims[dim_name] = base * multiple if multiple > 1 else base
            shapes[name][axis] = dims[dim_name]
    return shapes


def export_onnx(module: torch.nn.Module, spec: GraphSpec, samples: tuple[torch.Tensor, ...], path: Path,
                external_data: bool | None = None) -> list[str]:
    """Write `module` to `path` as ONNX; return the names of the files written (graph + external data)."""
    path = Path(path)
    if external_data is None:
        nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
        external_data = nbytes > EXTERNAL_DATA_BYTES
    if spec.opset < OPSET:
        return _export_legacy(module, spec, samples, path)
    table = None
    if spec.fused_attention:
        from .attention import FUSED_ATTENTION as table
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, samples, str(path), dynamo=True, opset_version=spec.opset,
                          input_names=list(spec.inputs), output_names=list(spec.outputs),
                          dynamic_shapes=_dynamic_shapes(spec), external_data=external_data, verbose=False,
                          custom_translation_table=table)
    files = [path.name]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data.name)
    log.debug("%s: exported to %s", spec.component, ", ".join(files))
    return files


def _export_legacy(module: torch.nn.Module, spec: GraphSpec, samples: tuple[torch.Tensor, ...], path: Path) -> list[str]:
    """Opset < 18 (TensorRT 8.x on JetPack 5, see README): the dynamo exporter's down-conversion wrote an invalid
    graph at 17 (Split's attributes) and ignored 16, so these go through the TorchScript exporter, which targets
    the opset natively (exact at 17, REFERENCE.md; LayerNormalization is decomposed below 17). No fused attention
    here: TensorRT fuses attention itself."""
    import onnx

    axes = {name: {axis: dim for axis, (dim, _) in spec.dynamic.get(name, {}).items()} for name in spec.inputs}
    axes = {**{k: v for k, v in axes.items() if v}, **spec.output_dynamic}
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix=f".{path.stem}.legacy-", dir=path.parent))   # new: removing it is safe
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, samples, str(scratch / "model.onnx"), dynamo=False, opset_version=spec.opset,
                              input_names=list(spec.inputs), output_names=list(spec.outputs), dynamic_axes=axes,
                              do_constant_folding=True)
        model = onnx.load(str(scratch / "model.onnx"))    # above 2 GB the exporter wrote one file per tensor
        files = save_onnx(model, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return files


def save_onnx(model, path: Path) -> list[str]:
    """Save a ModelProto; weights over EXTERNAL_DATA_BYTES go to one `<file>.data`. Returns the file names."""
    import onnx

    path = Path(path)
    size = sum(int(np.prod(t.dims)) * (2 if t.data_type == onnx.TensorProto.FLOAT16 else 4)
               for t in model.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        data = path.name + ".data"
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
        return [path.name, data]
    onnx.save(model, str(path))
    return [path.name]


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """||a - e|| / ||e|| in float64; 0 when both are 0."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    den = np.linalg.norm(e)
    num = np.linalg.norm(a - e)
    if not np.isfinite(num):
        return float("inf")
    return float(num / den) if den > 0 else float(num)


def verify_onnx(path: Path, spec: GraphSpec, feeds: dict[str, np.ndarray], expected: np.ndarray,
                bound: float | None = None) -> float:
    """Run the graph with onnxruntime (CPU) and compare with the torch output; raise ParityError if off."""
    from ..runtime.session import open_graph

    got = open_graph(path, "cpu").run(feeds)[spec.outputs[0]]
    err = rel_l2(got, expected)
    bound = spec.rel_l2 if bound is None else bound
    if not err <= bound:
        raise ParityError(f"{spec.component}.{spec.outputs[0]}: relative L2 error {err:.3g} > {bound:g} "
                          f"(ONNX graph {os.path.basename(path)} does not reproduce the torch module)")
    log.info("%s.%s: parity rel L2 %.3g", spec.component, spec.outputs[0], err)
    return err


def export_and_verify(module: torch.nn.Module, spec: GraphSpec, samples: tuple[torch.Tensor, ...],
                      path: Path, checks: list[tuple[torch.Tensor, ...]] | None = None) -> tuple[list[str], dict]:
    """Export with `samples` (batch >= 2: torch.export specialises size-1 axes), then check the graph on
    each tuple in `checks` (default: `samples`) against the torch module.

    Returns (files written, manifest entry with io signature and the worst parity error).
    """
    module.eval()
    files = export_onnx(module, spec, samples, path)
    worst = 0.0
    for inputs in checks or [samples]:
        with torch.no_grad():
            ref = module(*inputs)
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(spec.inputs, inputs)}
        worst = max(worst, verify_onnx(path, spec, feeds, ref.detach().cpu().numpy()))
    ins, outs = io_signature(path)
    return files, {"inputs": ins, "outputs": outs, "parity": {spec.outputs[0]: worst}}
