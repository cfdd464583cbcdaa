"""fp16 and int8 versions of a bundle's graphs, each checked against its fp32 graph.

fp16: onnxruntime.transformers.float16 with keep_io_types (the runtime feeds and reads float32), and the
      ops below kept in fp32, as onnxruntime's Stable Diffusion tooling does to avoid NaN / black images.
      fp16 bundles carry an fp32 VAE decoder too: the runtime decodes again with it when fp16 overflows.
int8 (CPU target): dynamic quantization (weights int8 per tensor, activations quantized on the fly),
      measured faster and closer than static QDQ on onnxruntime's CPU provider (REFERENCE.md). Covers the
      weight MatMuls of the UNet and the decoders (INT8_OPS); keeps in float the time embedding (Gemm),
      conv_in, conv_out, normalisations, and the K/V projections of the text and ip tokens (conditioning).
      Convs compute in fp32 by default, with their weights stored int8 ("ConvWeights", below): measured on the
      full UNet at 512^2, batch 2, 2 cores (onnxruntime 1.31), dynamic ConvInteger took 9.8 s of a 12.5 s step
      where fp32 Conv takes 1.9 s of 5.6 s (int8_ops=("MatMul", "Conv"), the --int8-ops matmul+conv choice).
      The VAE decoder stays fp32 (all Convs, and it sets the final pixels).
int8 (TensorRT target): explicit quantization, which is what TensorRT builds int8 engines from: static QDQ
      (QuantizeLinear / DequantizeLinear pairs) with symmetric int8 activations whose scales come from a
      calibration run of the fp32 pipeline over real trials (every step, both CFG halves), and per-channel
      symmetric int8 weights. Covers Conv and MatMul (NVIDIA's SD recipe: convs, FFN, QKV), keeps the same
      layers in float as the CPU int8 plus conv_shortcut (QDQ_KEEP_FLOAT). The QDQ graph also runs on
      onnxruntime's CPU provider, which is how it is verified here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import InputError, NsdedgeError, ParityError
from .onnx_export import EXTERNAL_DATA_BYTES, FP32_REL_L2, save_onnx

log = logging.getLogger(__name__)

# Ops kept in fp32 in fp16 graphs: normalisations (variance sums overflow fp16), the sinusoidal time
# embedding, and softmax inputs of attention.
FP16_KEEP_FP32_OPS = ["InstanceNormalization", "GroupNormalization", "LayerNormalization", "ReduceMean",
                      "Pow", "Sqrt", "Sin", "Cos", "Exp", "Softmax", "RandomNormalLike"]
# Initializer-name fragments whose consumers stay in float under int8.
INT8_KEEP_FLOAT = ("conv_in.", "conv_out.", "time_embedding.", "time_emb_proj.")
# Graph inputs whose direct consumers (K/V projections of the conditioning) stay in float under int8.
INT8_KEEP_FLOAT_INPUTS = ("ip_tokens", "encoder_hidden_states")

# "ConvWeights": conv weights stored int8 (per output channel, symmetric) and dequantized at run time, the conv
# itself in fp32. Measured on the full UNet, 512^2, batch 2, 2 cores: step 3.77 s against 3.41 s with fp32 conv
# weights, peak RSS 1.76 GB against 3.66 GB, UNet file 0.28x of fp32 against 0.79x, rel error 1.5e-2 against 1.1e-2.
INT8_OPS = ("MatMul", "ConvWeights")
INT8_OP_CHOICES = {"matmul+conv-weights": ("MatMul", "ConvWeights"), "matmul": ("MatMul",),
                   "matmul+conv": ("MatMul", "Conv")}

# TensorRT target (static QDQ)
QDQ_OPS = ("Conv", "MatMul")
QDQ_KEEP_FLOAT = (*INT8_KEEP_FLOAT, "conv_shortcut.")
QDQ_CALIBRATION = "minmax"            # "minmax" | "percentile" (99.999): ModelOpt recommends max for TensorRT
TARGETS = ("onnx", "tensorrt")          # (build.TARGETS adds openvino and cuda, converted in their own modules)


def to_fp16(src: Path, dst: Path) -> list[str]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP16_KEEP_FP32_OPS,
                                     disable_shape_infer=True)
    drop_repeated_casts(model)
    return save_onnx(model, dst)


def drop_repeated_casts(model) -> None:
    """The fp16 converter names the Cast it inserts after the value it casts: a value cast back to fp32 for
    two blocked consumers gets the same Cast twice (same node and output name), which onnxruntime refuses.
    The repeats compute the same thing: drop them."""
    produced: set[str] = set()
    keep = []
    for n in model.graph.node:
        if n.op_type == "Cast" and n.output and n.output[0] in produced:
            continue
        produced.update(n.output)
        keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def int8_exclusions(path: Path, keep_float: tuple[str, ...] = INT8_KEEP_FLOAT) -> list[str]:
    """Names of the MatMul / Conv nodes that stay in float (see INT8_KEEP_FLOAT*)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    keep = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Conv", "Gemm"):
            continue
        if any(frag in i for i in n.input for frag in keep_float) or \
                any(i in INT8_KEEP_FLOAT_INPUTS for i in n.input):
            keep.append(n.name)
    return keep


@contextlib.contextmanager
def _without_value_info(src: Path):
    """A copy of `src` prepared for onnxruntime's quantizers: without value_info, since the exporter's symbolic
    shapes make onnx's shape inference, which the quantizers run, fail ("Inferred shape and existing shape
    differ"); with a type for the outputs of contrib ops; and marked as prepared."""
    import onnx

    model = onnx.load(str(src))
    del model.graph.value_info[:]
    # ...but onnx's inference has no schema for onnxruntime's contrib ops (MultiHeadAttention): without a type
    # for their outputs it stops there, and the quantizer skips every Conv downstream. Give them one.
    for n in model.graph.node:
        if n.domain == "com.microsoft":
            for out in n.output:
                model.graph.value_info.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    # onnxruntime's pre-processing (symbolic shape inference + optimisation) is what this function does in its
    # place; its marker stops the quantizers advising it at every call. (Their other messages go through
    # logging's module-level functions, which give a root logger without handlers one of its own: onnxruntime's
    # doing, left alone; nsdedge changes no logger's level or handlers.)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        "onnx.quant.pre_process": "onnxruntime.quant"})
    plain = src.with_name(src.stem + ".noshapes.onnx")
    save_onnx(model, plain)
    del model
    try:
        yield plain
    finally:
        remove(src.parent, [plain.name, plain.name + ".data"])


def _is_big(src: Path) -> bool:
    return sum(p.stat().st_size for p in src.parent.glob(src.name + "*")) > EXTERNAL_DATA_BYTES


def _written(dst: Path) -> list[str]:
    return [dst.name] + ([dst.name + ".data"] if (dst.parent / (dst.name + ".data")).exists() else [])


def int8_conv_weights(model, keep_float: tuple[str, ...] = INT8_KEEP_FLOAT) -> int:
    """Store each Conv's weight as int8 with a per-output-channel scale, dequantized in the graph
    (DequantizeLinear -> Conv): onnxruntime keeps the initializer int8 (it does not fold DequantizeLinear), so
    the weights stay int8 in memory and the conv runs in fp32 on one dequantized weight at a time."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes, count = [], 0
    for n in g.node:
        w = n.input[1] if n.op_type == "Conv" and len(n.input) > 1 else None
        if w in inits and inits[w].data_type == onnx.TensorProto.FLOAT and not any(k in w for k in keep_float):
            weight = numpy_helper.to_array(inits[w])                           # (Cout, Cin, kh, kw)
            scale = np.abs(weight).reshape(len(weight), -1).max(1) / 127.0
            scale[scale == 0] = 1.0
            q = np.clip(np.round(weight / scale[:, None, None, None]), -127, 127).astype(np.int8)
            g.initializer.remove(inits[w])
            g.initializer.extend([numpy_helper.from_array(q, f"{w}_int8"),
                                  numpy_helper.from_array(scale.astype(np.float32), f"{w}_scale"),
                                  numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{w}_zero")])
            nodes.append(helper.make_node("DequantizeLinear", [f"{w}_int8", f"{w}_scale", f"{w}_zero"], [f"{w}_dq"],
                                          name=f"{n.name}_weight_dq", axis=0))
            n.input[1] = f"{w}_dq"
            count += 1
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return count


def to_int8_dynamic(src: Path, dst: Path, op_types: tuple[str, ...] = INT8_OPS) -> list[str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weights_only = "ConvWeights" in op_types
    op_types = tuple(o for o in op_types if o != "ConvWeights")
    with _without_value_info(src) as plain:
        quantize_dynamic(str(plain), str(dst), op_types_to_quantize=list(op_types), weight_type=QuantType.QInt8,
                         per_channel=False, nodes_to_exclude=int8_exclusions(src), use_external_data_format=_is_big(src),
                         # shape inference cannot type the outputs of contrib ops (MultiHeadAttention)
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": 1})   # 1: FLOAT
    if weights_only:
        import onnx

        model = onnx.load(str(dst))
        n = int8_conv_weights(model)
        remove(dst.parent, [dst.name, dst.name + ".data"])       # the int8 graph may now fit in one file
        save_onnx(model, dst)
        log.info("%s: %d conv weights stored int8", dst.name, n)
    return _written(dst)


class _Feeds:
    """onnxruntime's CalibrationDataReader over recorded feeds (one dict per graph call)."""

    def __init__(self, feeds: list[dict]):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def to_int8_qdq(src: Path, dst: Path, feeds: list[dict], op_types: tuple[str, ...] = QDQ_OPS,
                method: str = QDQ_CALIBRATION) -> list[str]:
    """Static QDQ for TensorRT: activation scales from `feeds` (recorded real inputs), symmetric int8
    activations, per-channel symmetric int8 weights (output channels: Conv axis 0, MatMul axis 1)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, create_calibrator, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    if not feeds:
        raise NsdedgeError(f"{src.name}: no calibration inputs recorded for static int8")
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory(dir=src.parent, prefix=".calib-") as scratch, _without_value_info(src) as plain:
        # Calibration first, on the bundle's disk: the calibrator writes an augmented copy of the model (a
        # ReduceMin / ReduceMax per calibrated tensor; GBs for a UNet) beside it, not in the system temp dir.
        # quantize_static then reads the ranges from the cache file and calibrates nothing itself.
        calibrator = create_calibrator(plain, list(op_types),
                                       augmented_model_path=str(Path(scratch) / "augmented.onnx"),
                                       calibrate_method=calibrate, use_external_data_format=_is_big(src),
                                       extra_options={"percentile": 99.999})
        # one call at a time, not CalibMaxIntermediateOutputs: onnxruntime 1.31's MinMax calibrator drops each
        # chunk's ranges (only the last chunk counted)
        calibrator.collect_data(_Feeds(feeds))
        cache = Path(scratch) / "ranges.json"
        save_tensors_data(calibrator.compute_data(), cache)
        del calibrator
        quantize_static(str(plain), str(dst), None, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(op_types), per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=int8_exclusions(src, QDQ_KEEP_FLOAT),
                        use_external_data_format=_is_big(src), calibrate_method=calibrate,
                        calibration_cache_path=str(cache),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                                       "MatMulConstBOnly": True})     # weights; attention BMMs stay float
    return _written(dst)


def convert_component(folder: Path, name: str, file: str, precision: str,
                      int8_ops: tuple[str, ...] = INT8_OPS, target: str = "onnx",
                      feeds: list[dict] | None = None, int8_recipe: str = "weights",
                      compute: str | None = None) -> tuple[list[str], str]:
    """Write `<stem>.<precision>.onnx` beside the fp32 graph; returns (files written, precision it ended in).
    For int8 on the TensorRT target, `feeds` are the recorded inputs that calibrate the activation scales."""
    src = folder / file
    if target == "openvino":
        from .openvino_ir import to_openvino

        return to_openvino(src, folder / file.replace(".onnx", ".xml"), name, precision, int8_recipe, feeds, compute)
    if target == "cuda":
        from .cuda_graph import to_cuda

        return to_cuda(src, folder / file.replace(".onnx", f".cuda-{precision}.onnx"), name, precision)
    dst = folder / file.replace(".onnx", f".{precision}.onnx")
    if precision == "fp16":
        return to_fp16(src, dst), "fp16"
    if name in ("vae_decoder", "taesd_decoder"):
        return [], "fp32"                                   # int8 bundles keep the fp32 VAEs
    if target == "tensorrt":
        if not feeds:
            log.warning("%s: no calibration inputs recorded; it stays fp32", name)
            return [], "fp32"
        return to_int8_qdq(src, dst, feeds, QDQ_OPS if name == "unet" else ("MatMul",)), "int8"
    return to_int8_dynamic(src, dst, int8_ops if name == "unet" else ("MatMul",)), "int8"


def remove(folder: Path, files: list[str]) -> None:
    for f in files:
        try:
            os.unlink(folder / f)
        except FileNotFoundError:
            pass


def _component_error(folder: Path, manifest, name: str, new_file: str, feeds_list: list[dict],
                     precision: str | None = None, compute: str | None = None, provider: str = "cpu") -> float:
    """Worst relative L2 error of the converted graph against the fp32 graph over recorded inputs, both on
    `provider`. `precision`: an OpenVINO IR's, which sets the precision it computes in."""
    from ..runtime.session import open_session
    from .onnx_export import rel_l2

    a = open_session(folder, name, provider, manifest=manifest)
    if new_file.endswith(".xml"):
        from ..runtime.ov_session import OvSession

        b = OvSession(folder / new_file, precision or "fp32", compute=compute)
    else:
        b = open_session(folder, name, provider, manifest=manifest, file=new_file)
    worst = 0.0
    for feeds in feeds_list:
        ra, rb = a.run(feeds), b.run(feeds)
        worst = max(worst, max(rel_l2(rb[k], ra[k]) for k in ra))
    return worst


def fidelity_voxels(manifest, calibration_voxels: Path | None, n: int = 2, seed: int = 1234) -> dict:
    """Held-out trials per subject: the last `n` of the calibration file, or standard-normal stand-ins."""
    from ..voxels import load_voxels

    out = {}
    for subject, comp in manifest.subjects.items():
        v = int(manifest.components[comp].extra["voxels"])
        if calibration_voxels is not None:
            x = load_voxels(calibration_voxels)
            if x.shape[1] == v:
                out[subject] = x[-n:]
                continue
        out[subject] = np.random.default_rng(seed).standard_normal((n, v)).astype(np.float32)
    return out


def calibration_records(folder: Path, calibration_voxels: Path | None, calibration: Path | None,
                        held_out: int, steps: int, guidance: float, progress=lambda s: None) -> dict:
    """{component: [feeds, ...]} for static int8: a recorded file (`nsdedge calibrate`), or a fresh recording
    of the fp32 bundle in `folder` over the calibration trials that are not held out for the fidelity report."""
    from ..bundle import read_manifest
    from ..calibration import calls, load_calibration, record_calibration
    from ..runtime import Reconstructor
    from ..voxels import load_voxels

    if calibration is not None:
        data = load_calibration(calibration)
        check_records(calibration, read_manifest(folder, verify=False), data)
    elif calibration_voxels is not None:
        rec = Reconstructor(folder, "cpu", verify=False)
        x = load_voxels(calibration_voxels)
        fit = x[:-held_out] if len(x) > held_out else x
        data = {}
        for subject, comp in rec.manifest.subjects.items():
            if fit.shape[1] != rec.subjects[subject]:
                continue
            progress(f"calibration: recording the fp32 pipeline over {len(fit)} trial(s) of {subject}")
            recorded = record_calibration(rec, fit, subject, steps=steps, guidance=guidance).by_component()
            for c, arrays in recorded.items():
                data.setdefault(c, arrays)                    # one subject's UNet and VAE calls are plenty
    else:
        from ..calibration.record import CALIBRATION_NEEDED

        raise NsdedgeError(CALIBRATION_NEEDED)
    return {comp: [{n: np.asarray(v, np.float32) for n, v in feeds.items()} for feeds in calls(arrays)]
            for comp, arrays in data.items()}


def check_records(path: Path, manifest, data: dict[str, dict[str, np.ndarray]]) -> None:
    """A recorded calibration file must feed the bundle's graphs: for each graph it holds calls of, every input of
    the graph and nothing else, the same number of calls for each, the graph's rank and fixed dimensions, finite
    floats. Anything else is a one-line InputError naming the file (not a traceback from the quantizer)."""
    from ..calibration.record import CALLS

    for comp, arrays in data.items():
        if comp not in manifest.components:
            continue                                  # calls of a graph this bundle does not have: not used
        inputs = {i["name"]: i for i in manifest.components[comp].inputs}
        names = [n for n in arrays if not n.endswith(CALLS) and n != "noise_pred"]
        if set(names) != set(inputs):
            missing, extra = sorted(set(inputs) - set(names)), sorted(set(names) - set(inputs))
            raise InputError(f"{path}: the {comp} calls " + (f"lack {', '.join(missing)}" if missing else
                             f"hold {', '.join(extra)}, not inputs of the graph") + f" (it takes {', '.join(inputs)})")
        counts = {n: len(arrays.get(n + CALLS, arrays[n])) for n in names}
        if len(set(counts.values())) != 1:
            raise InputError(f"{path}: the {comp} inputs hold different numbers of calls "
                             f"({', '.join(f'{n} {c}' for n, c in counts.items())})")
        for n, spec in inputs.items():
            a, want = arrays[n], spec["shape"]
            if a.ndim != len(want) + 1 or any(isinstance(w, int) and w != g for w, g in zip(want, a.shape[1:])):
                raise InputError(f"{path}: {comp}/{n} calls are {tuple(a.shape[1:])}; the graph takes "
                                 f"({', '.join(str(w) for w in want)})")
            if a.dtype.kind != "f" or not np.isfinite(a).all():
                raise InputError(f"{path}: {comp}/{n} is not finite floating point ({a.dtype})")


def check_calibration_voxels(path: Path | None, sizes: dict[str, int]) -> int | None:
    """--calibration-voxels must hold trials of at least one subject's voxel count (`sizes`: subject -> voxels), else
    a one-line InputError before any tracing or conversion (not a late "nothing recorded", nor a silent stand-in).
    Returns the file's voxel count. Every row is checked (finite numbers), a chunk at a time."""
    if path is None:
        return None
    from ..voxels import scan_voxels

    v = scan_voxels(path)[1]
    if v not in sizes.values():
        raise InputError(f"{path}: trials of {v} voxels; the bundle's subjects take "
                         f"{', '.join(f'{s} {n}' for s, n in sizes.items())}")
    return v


def quantize_bundle(writer, manifest, precision: str, calibration_voxels: Path | None = None,
                    steps: int = 10, guidance: float = 7.5, int8_ops: tuple[str, ...] = INT8_OPS,
                    target: str = "onnx", calibration: Path | None = None, progress=lambda s: None,
                    int8_recipe: str = "weights", compute: str | None = None) -> dict:
    """Convert the fp32 graphs in `writer.tmp` to `precision` and write the fidelity report into the manifest.
    `int8_recipe` (target openvino): weights | full | hybrid (openvino_ir.py); `compute`: bf16 to compute an
    OpenVINO int8 bundle in bf16 (its fidelity is then measured as it computes)."""
    from ..calibration import Recorder, calls
    from ..eval.metrics import psnr, ssim
    from ..runtime import Reconstructor
    from ..runtime.pipeline import FP32_VAE, VAES

    folder = writer.tmp
    run = manifest.extra.get("run_defaults", {})          # a few-step bundle is measured as it runs
    steps, guidance = int(run.get("steps", steps)), float(run.get("guidance", guidance))
    writer.write_manifest(manifest)
    calibration_size = check_calibration_voxels(calibration_voxels, {
        s: int(manifest.components[c].extra["voxels"]) for s, c in manifest.subjects.items()})
    trials = fidelity_voxels(manifest, calibration_voxels)
    first = next(iter(trials))
    held_out = calibration_size == trials[first].shape[1]       # the report's trials are the file's, not stand-ins

    static = precision == "int8" and (target == "tensorrt" or (target == "openvino" and int8_recipe != "weights"))
    records = (calibration_records(folder, calibration_voxels, calibration, len(trials[first]), steps, guidance,
                                   progress) if static else {})        # (a bad file is refused before the rest)

    # --target cuda: its graphs run on CUDA alone, so the fp32 reference runs there too (and the conversion was
    # refused before any work where CUDA does not start)
    provider = "openvino" if target == "openvino" else "cuda" if target == "cuda" else "cpu"
    ref_provider = "cuda" if target == "cuda" else "cpu"
    progress("fidelity: fp32 reference reconstructions")
    ref_rec = Recorder()
    ref = Reconstructor(folder, ref_provider, verify=False, observer=ref_rec)
    final = ref.denoise(ref.decode(trials[first], first), steps=steps, guidance=guidance, seed=0)
    ref_images = ref.decode_latents(final)                       # with the bundle's own VAE ...
    for vae, comp in VAES.items():                                 # ... and its other one, for its feeds
        if comp in manifest.components and vae != ref.defaults["vae"]:
            ref.decode_latents(final, vae=vae)
    ref_tokens = {s: ref.decode(x, s) for s, x in trials.items()}
    ref_defaults = ref.defaults
    del ref
    recorded = ref_rec.by_component()

    def feeds_for(component: str) -> list[dict]:
        feeds = calls(recorded.get(component, {}))
        return feeds if component != "unet" else [feeds[i] for i in sorted({0, len(feeds) // 2, len(feeds) - 1})]

    component_errors = {}
    for name, comp in list(manifest.components.items()):
        progress(f"{precision}{' (static QDQ)' if static else ''}: {name}")
        files, got = convert_component(folder, name, comp.file, precision, int8_ops, target, records.get(name),
                                       int8_recipe, compute)
        comp_compute = compute if compute == "bf16" and got == "int8" else None
        if not files:
            continue
        if name.startswith("decoder-"):
            feeds = [{"voxels": trials[comp.extra["subject"]]}]
        else:
            feeds = feeds_for(name)
        component_errors[name] = _component_error(folder, manifest, name, files[0], feeds, got, comp_compute,
                                                  ref_provider)
        old = [comp.file, *comp.data_files]
        if name == "vae_decoder" and precision == "fp16":      # keep the fp32 VAE for overflow fallback
            manifest.components[FP32_VAE] = type(comp)(FP32_VAE, comp.file, "fp32", comp.inputs, comp.outputs,
                                                      comp.source, list(comp.data_files), dict(comp.parity))
        else:
            remove(folder, old)
        comp.file, comp.data_files, comp.precision = files[0], files[1:], got
        if comp_compute:
            comp.extra["compute"] = comp_compute
        comp.parity = {**comp.parity, f"{precision}_vs_fp32": component_errors[name]}
        if target == "openvino" and got == "fp32" and component_errors[name] > FP32_REL_L2:
            raise ParityError(f"{name}: the OpenVINO IR is off the fp32 ONNX graph by relative L2 "
                              f"{component_errors[name]:.3g} > {FP32_REL_L2:g} (OpenVINO misread the graph)")
    writer.write_manifest(manifest)

    progress(f"fidelity: {precision} reconstructions{' (OpenVINO)' if target == 'openvino' else ''}"
             f"{' (CUDA)' if target == 'cuda' else ''}")
    q_rec = Recorder()
    q = Reconstructor(folder, provider, verify=False, observer=q_rec)
    images = q(trials[first], first, steps=steps, guidance=guidance, seed=0)
    del q

    def spread(noise):                       # std of cond - uncond noise predictions, over steps
        return float(np.std(noise[:, 1] - noise[:, 0])) if noise.shape[1] == 2 else float("nan")

    s_ref = spread(np.stack(recorded["unet"]["noise_pred"]))
    s_q = spread(np.stack(q_rec.by_component()["unet"]["noise_pred"]))
    fidelity = {
        "precision": precision, "target": target, "steps": steps, "guidance": guidance, "subject": first,
        "scheduler": ref_defaults["scheduler"], "vae": ref_defaults["vae"],
        "int8_ops": (["MatMul", "Conv"] if target == "openvino" else list(QDQ_OPS) if static else list(int8_ops))
        if precision == "int8" else None,
        "int8_scheme": ("NNCF hybrid int8 of the UNet (int8 weights for the weighted MatMuls, post-training "
                        "quantization of convolutions and attention, SmoothQuant off); decoders int8 weights; VAE fp32"
                        if target == "openvino" and int8_recipe == "hybrid" else
                        "NNCF post-training quantization of the UNet (int8 weights and activations, transformer "
                        "preset, bias correction off); decoders int8 weights; VAE fp32" if target == "openvino" and static
                        else "static QDQ, symmetric activations, per-channel weights" if static
                        else "NNCF int8 weights (asymmetric, per output channel), computed in f32; VAE fp32"
                        if target == "openvino"
                        else "dynamic, per-tensor weights" + ("; conv weights int8 per channel, convs computed in "
                                                               "fp32" if "ConvWeights" in int8_ops else ""))
        if precision == "int8" else None,
        "int8_recipe": int8_recipe if precision == "int8" and target == "openvino" else None,
        "calibration_calls": {k: len(v) for k, v in records.items()} if static else None,
        "inputs": "calibration (held-out)" if held_out else "standard-normal voxels",
        "component_rel_l2": component_errors,
        "tokens_rel_l2": {s: float(np.linalg.norm(q_t - ref_tokens[s]) / np.linalg.norm(ref_tokens[s]))
                          for s, q_t in [(s, Reconstructor(folder, provider, verify=False).decode(x, s))
                                         for s, x in trials.items()]},
        "psnr_db": [psnr(a, b) for a, b in zip(images, ref_images)],
        "ssim": [ssim(a, b) for a, b in zip(images, ref_images)],
        "cfg_spread_fp32": s_ref, "cfg_spread": s_q, "cfg_spread_ratio": s_q / s_ref if s_ref else float("nan"),
    }
    if compute == "bf16" and precision == "int8":
        fidelity["compute"] = "bf16"
        fidelity["int8_scheme"] = (fidelity["int8_scheme"].replace(", computed in f32", "").replace(
            "VAE fp32", "VAE fp16 weights") + "; everything not int8 computed in bf16")
    manifest.extra["fidelity"] = fidelity
    log.info("fidelity %s", fidelity)
    return fidelity
