"""`--target cuda`: the UNet and VAE graphs rewritten for onnxruntime's CUDA provider alone (fp16 or fp32).

onnxruntime's transformers optimizer (the fusions its own Stable Diffusion tooling applies) runs on the fp32 graph,
before the fp16 conversion: the portable fp16 graphs of `--target onnx` put fp32 Casts around every normalisation,
which these patterns do not match. What changes (in the SD 1.5 UNet: 61 group norms, 98 convolutions, 32 of 48 layer
norms):
- Reshape / InstanceNormalization / Reshape / Mul / Add (+ SiLU) -> com.microsoft.GroupNorm, and Add + GroupNorm
  -> SkipGroupNorm: fp16 in and out with fp32 statistics inside, channels-last, the activation fused;
- every Conv -> com.microsoft.NhwcConv, the layout Transposes between them removed (321 of them in the UNet);
- Add + LayerNormalization -> SkipLayerNormalization.
The rewritten ops have CUDA kernels only: such a bundle runs on `--provider cuda` (auto picks it), and its
fidelity report is measured there, so exporting one needs a GPU where onnxruntime's CUDA provider starts.
Measured on an H100 (512^2, 20 DDIM steps, guidance 7.5): fp16 0.21 s per image against 0.66 s for diffusers fp16,
max pixel difference 1 against diffusers fp32 (benchmarks/README.md).
Decoders (one GEMM) and the tiny VAE (no normalisations) convert as for `--target onnx`.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from ..errors import NsdedgeError

MODEL_TYPES = {"unet": "unet", "vae_decoder": "vae"}    # component -> onnxruntime optimizer's model type
PRECISIONS = ("fp32", "fp16")
# fp16 graphs: what stays fp32. The fused normalisations are not listed: their kernels keep fp32 statistics.
KEEP_FP32_OPS = ["InstanceNormalization", "ReduceMean", "Pow", "Sqrt", "Sin", "Cos", "Exp", "Softmax",
                 "RandomNormalLike"]
FUSED_OPS = ("GroupNorm", "SkipGroupNorm", "NhwcConv", "SkipLayerNormalization")


def check_cuda_target(precision: str) -> None:
    """Before any work: the precision is one the target takes, and onnxruntime's CUDA provider starts here (the
    fidelity of the rewritten graphs can only be measured on it)."""
    if precision not in PRECISIONS:
        raise NsdedgeError(f"--target cuda takes --precision fp16 or fp32, not {precision} (int8 on a GPU: "
                           f"--target tensorrt)")
    from ..runtime.ort_session import probe

    why = probe("cuda")
    if why is not None:
        raise NsdedgeError(f"--target cuda writes graphs that only onnxruntime's CUDA provider runs, and their "
                           f"fidelity is measured on it: export on the GPU machine ({why})")


def fuse(src: Path, model_type: str):
    """onnxruntime's optimizer model (OnnxModel) of the fp32 graph `src` with the Stable Diffusion fusions applied."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(model_type)
    options.enable_packed_qkv = options.enable_packed_kv = False     # attention is fused at export already
    with contextlib.redirect_stderr(io.StringIO()):                 # its progress bar; its log is at INFO
        return optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                              optimization_options=options, use_gpu=True)


def _kernel_takes(channels: int, groups: int) -> bool:
    """onnxruntime's CUDA GroupNorm refuses at run time ("GroupNorm in CUDA does not support the input") other than
    an even number of channels per group (two per thread), at most 512."""
    return groups > 0 and channels % groups == 0 and (channels // groups) % 2 == 0 and channels // groups <= 512


def check_group_norms(what: str, config) -> None:
    """Before tracing: a diffusers UNet / VAE config whose group norms the CUDA kernel cannot take is refused."""
    groups = int(config.norm_num_groups)
    for c in config.block_out_channels:
        if not _kernel_takes(int(c), groups):
            raise NsdedgeError(f"the {what}'s group norms have {c} channels in {groups} groups: onnxruntime's CUDA "
                               f"GroupNorm takes an even number of channels per group (at most 512), so --target "
                               f"cuda cannot fuse them (use --target onnx)")


def unsupported_group_norms(model) -> list[str]:
    """The fused group norms of `model` (a ModelProto) that the CUDA kernel cannot take."""
    init = {t.name: t for t in model.graph.initializer}
    bad = []
    for n in model.graph.node:
        if n.op_type in ("GroupNorm", "SkipGroupNorm") and n.domain == "com.microsoft":
            groups = next((a.i for a in n.attribute if a.name == "groups"), 0)
            channels = init[n.input[1]].dims[0] if n.input[1] in init else 0
            if not _kernel_takes(channels, groups):
                bad.append(f"{channels} channels in {groups} groups")
    return bad


def to_cuda(src: Path, dst: Path, name: str, precision: str) -> tuple[list[str], str]:
    """Write `dst` from the fp32 graph `src`; returns (files written, precision it ended in)."""
    from .onnx_export import save_onnx
    from .quantize import drop_repeated_casts, to_fp16

    kind = MODEL_TYPES.get(name)
    if kind is None:
        return (to_fp16(src, dst), "fp16") if precision == "fp16" else ([], "fp32")
    model = fuse(src, kind)
    if not any(n.op_type in FUSED_OPS for n in model.model.graph.node):
        raise NsdedgeError(f"{name}: onnxruntime's optimizer fused nothing in {src.name} (no GroupNorm / NhwcConv "
                           f"pattern): not a graph --target cuda knows")
    bad = unsupported_group_norms(model.model)
    if bad:
        raise NsdedgeError(f"{name}: its group norms have {bad[0]}: onnxruntime's CUDA GroupNorm takes an even "
                           f"number of channels per group (at most 512), so --target cuda cannot fuse them (use "
                           f"--target onnx)")
    if precision == "fp16":
        model.convert_float_to_float16(keep_io_types=True, op_block_list=KEEP_FP32_OPS)
        drop_repeated_casts(model.model)            # onnxruntime-gpu 1.31's converter cast the time embedding twice
        model.topological_sort()                    # the Casts it puts at the inputs come last otherwise
    return save_onnx(model.model, dst), precision
