"""fp16 and int8 versions of a bundle's graphs, each checked against its fp32 graph.

fp16: onnxruntime.transformers.float16 with keep_io_types (the runtime feeds and reads float32), and the
      ops below kept in fp32, as onnxruntime's Stable Diffusion tooling does to avoid NaN / black images.
      fp16 bundles carry an fp32 VAE decoder too: the runtime decodes again with it when fp16 overflows.
int8 (CPU target): dynamic quantization (weights int8 per tensor, activations quantized on the fly),
      measured faster and closer than static QDQ on onnxruntime's CPU provider (REFERENCE.md). Covers the
      weight MatMuls of the UNet and the decoders (INT8_OPS); keeps in float the time embedding (Gemm),
      conv_in, conv_out, normalisations, and the K/V projections of the text and ip tokens (conditioning).
      Convs stay fp32 by default: measured on the full UNet at 512^2, batch 2, 2 cores (onnxruntime 1.31),
      dynamic ConvInteger took 9.8 s of a 12.5 s step where fp32 Conv takes 1.9 s of 5.6 s. Quantizing them
      too (int8_ops=("MatMul", "Conv")) shrinks the UNet file to 0.28x of fp32 instead of about 0.8x.
      The VAE decoder stays fp32 (all Convs, and it sets the final pixels).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .onnx_export import EXTERNAL_DATA_BYTES, save_onnx

log = logging.getLogger(__name__)

# Ops kept in fp32 in fp16 graphs: normalisations (variance sums overflow fp16), the sinusoidal time
# embedding, and softmax inputs of attention.
FP16_KEEP_FP32_OPS = ["InstanceNormalization", "GroupNormalization", "LayerNormalization", "ReduceMean",
                      "Pow", "Sqrt", "Sin", "Cos", "Exp", "Softmax", "RandomNormalLike"]
# Initializer-name fragments whose consumers stay in float under int8.
INT8_KEEP_FLOAT = ("conv_in.", "conv_out.", "time_embedding.", "time_emb_proj.")
# Graph inputs whose direct consumers (K/V projections of the conditioning) stay in float under int8.
INT8_KEEP_FLOAT_INPUTS = ("ip_tokens", "encoder_hidden_states")

INT8_OPS = ("MatMul",)
INT8_OP_CHOICES = {"matmul": ("MatMul",), "matmul+conv": ("MatMul", "Conv")}


def to_fp16(src: Path, dst: Path) -> list[str]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP16_KEEP_FP32_OPS,
                                     disable_shape_infer=True)
    _drop_repeated_casts(model)
    return save_onnx(model, dst)


def _drop_repeated_casts(model) -> None:
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


def int8_exclusions(path: Path) -> list[str]:
    """Names of the MatMul / Conv nodes that stay in float (see INT8_KEEP_FLOAT*)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    keep = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Conv", "Gemm"):
            continue
        if any(frag in i for i in n.input for frag in INT8_KEEP_FLOAT) or \
                any(i in INT8_KEEP_FLOAT_INPUTS for i in n.input):
            keep.append(n.name)
    return keep


def to_int8_dynamic(src: Path, dst: Path, op_types: tuple[str, ...] = INT8_OPS) -> list[str]:
    import onnx

    big = sum(p.stat().st_size for p in src.parent.glob(src.name + "*")) > EXTERNAL_DATA_BYTES
    # the exporter's value_info carries symbolic shapes that onnx's shape inference, which the quantizer
    # runs, rejects ("Inferred shape and existing shape differ"): hand the quantizer a copy without them
    model = onnx.load(str(src))
    del model.graph.value_info[:]
    plain = src.with_name(src.stem + ".noshapes.onnx")
    save_onnx(model, plain)
    del model
    try:
        _quantize(plain, dst, op_types, int8_exclusions(src), big)
    finally:
        remove(src.parent, [plain.name, plain.name + ".data"])
    files = [dst.name]
    if (dst.parent / (dst.name + ".data")).exists():
        files.append(dst.name + ".data")
    return files


def _quantize(src: Path, dst: Path, op_types, exclude: list[str], big: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)   # the quantizer advises pre-processing on the root logger at every call
    try:
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(op_types), weight_type=QuantType.QInt8,
                         per_channel=False, nodes_to_exclude=exclude, use_external_data_format=big,
                         extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)


def convert_component(folder: Path, name: str, file: str, precision: str,
                      int8_ops: tuple[str, ...] = INT8_OPS) -> tuple[list[str], str]:
    """Write `<stem>.<precision>.onnx` beside the fp32 graph; returns (files written, precision it ended in)."""
    src = folder / file
    dst = folder / file.replace(".onnx", f".{precision}.onnx")
    if precision == "fp16":
        return to_fp16(src, dst), "fp16"
    if name == "vae_decoder":
        return [], "fp32"                                   # int8 bundles keep the fp32 VAE
    return to_int8_dynamic(src, dst, int8_ops if name == "unet" else ("MatMul",)), "int8"


def remove(folder: Path, files: list[str]) -> None:
    for f in files:
        try:
            os.unlink(folder / f)
        except FileNotFoundError:
            pass


def _component_error(folder: Path, fp32_file: str, new_file: str, feeds_list: list[dict]) -> float:
    """Worst relative L2 error of the converted graph against the fp32 graph over recorded inputs."""
    from ..runtime.session import Session
    from .onnx_export import rel_l2

    a, b = Session(folder / fp32_file, "cpu"), Session(folder / new_file, "cpu")
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


def quantize_bundle(writer, manifest, precision: str, calibration_voxels: Path | None = None,
                    steps: int = 10, guidance: float = 7.5, int8_ops: tuple[str, ...] = INT8_OPS,
                    progress=lambda s: None) -> dict:
    """Convert the fp32 graphs in `writer.tmp` to `precision` and write the fidelity report into the manifest."""
    from ..calibration import Recorder
    from ..evaluate import psnr, ssim
    from ..runtime import Reconstructor
    from ..runtime.pipeline import FP32_VAE

    folder = writer.tmp
    writer.write_manifest(manifest)
    trials = fidelity_voxels(manifest, calibration_voxels)
    first = next(iter(trials))

    progress("fidelity: fp32 reference reconstructions")
    ref_rec = Recorder()
    ref = Reconstructor(folder, "cpu", verify=False, observer=ref_rec)
    ref_images = ref(trials[first], first, steps=steps, guidance=guidance, seed=0)
    ref_tokens = {s: ref.decode(x, s) for s, x in trials.items()}
    del ref
    calls = ref_rec.arrays()

    def feeds_for(component: str) -> list[dict]:
        names = [k.split("/", 1)[1] for k in calls if k.startswith(component + "/") and k != "unet/noise_pred"]
        count = len(calls[f"{component}/{names[0]}"]) if names else 0
        picks = range(count) if component != "unet" else sorted({0, count // 2, count - 1})
        return [{n: calls[f"{component}/{n}"][i] for n in names} for i in picks]

    component_errors = {}
    for name, comp in list(manifest.components.items()):
        progress(f"{precision}: {name}")
        files, got = convert_component(folder, name, comp.file, precision, int8_ops)
        if not files:
            continue
        if name.startswith("decoder-"):
            feeds = [{"voxels": trials[comp.extra["subject"]]}]
        else:
            feeds = feeds_for(name)
        component_errors[name] = _component_error(folder, comp.file, files[0], feeds)
        old = [comp.file, *comp.data_files]
        if name == "vae_decoder" and precision == "fp16":      # keep the fp32 VAE for overflow fallback
            manifest.components[FP32_VAE] = type(comp)(FP32_VAE, comp.file, "fp32", comp.inputs, comp.outputs,
                                                      comp.source, list(comp.data_files), dict(comp.parity))
        else:
            remove(folder, old)
        comp.file, comp.data_files, comp.precision = files[0], files[1:], got
        comp.parity = {**comp.parity, f"{precision}_vs_fp32": component_errors[name]}
    writer.write_manifest(manifest)

    progress(f"fidelity: {precision} reconstructions")
    q_rec = Recorder()
    q = Reconstructor(folder, "cpu", verify=False, observer=q_rec)
    images = q(trials[first], first, steps=steps, guidance=guidance, seed=0)
    qcalls = q_rec.arrays()
    del q

    def spread(noise):                       # std of cond - uncond noise predictions, over steps
        return float(np.std(noise[:, 1] - noise[:, 0])) if noise.shape[1] == 2 else float("nan")

    s_ref, s_q = spread(calls["unet/noise_pred"]), spread(qcalls["unet/noise_pred"])
    fidelity = {
        "precision": precision, "int8_ops": list(int8_ops) if precision == "int8" else None, "steps": steps, "guidance": guidance, "subject": first,
        "inputs": "calibration (held-out)" if calibration_voxels else "standard-normal voxels",
        "component_rel_l2": component_errors,
        "tokens_rel_l2": {s: float(np.linalg.norm(q_t - ref_tokens[s]) / np.linalg.norm(ref_tokens[s]))
                          for s, q_t in [(s, Reconstructor(folder, "cpu", verify=False).decode(x, s))
                                         for s, x in trials.items()]},
        "psnr_db": [psnr(a, b) for a, b in zip(images, ref_images)],
        "ssim": [ssim(a, b) for a, b in zip(images, ref_images)],
        "cfg_spread_fp32": s_ref, "cfg_spread": s_q, "cfg_spread_ratio": s_q / s_ref if s_ref else float("nan"),
    }
    manifest.extra["fidelity"] = fidelity
    log.info("fidelity %s", fidelity)
    return fidelity
