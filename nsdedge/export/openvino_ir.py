"""OpenVINO IR from a bundle's fp32 ONNX graphs (`--target openvino`): fp32, bf16 or int8 weights (NNCF).

- fp32: the graph as it is, weights fp32 (runs with INFERENCE_PRECISION_HINT f32).
- bf16: weights stored fp16 (half the disk; the CPU plugin computes bf16 and converts them once at compile).
- int8, recipe `weights` (what `auto`, the default, picks without calibration data): NNCF's int8 weight
  compression (asymmetric, per output channel) of every MatMul and Convolution of the UNet and the decoders; the
  computation stays f32 (activations are not quantized), so no calibration data is needed.
- int8, recipe `full`: the UNet fully quantized by NNCF's post-training quantization (int8 weights and
  activations, transformer preset, bias correction off, as OpenVINO's LCM notebook does) from recorded UNet
  inputs (`--calibration-voxels` / `--calibration`: every step, both guidance halves); decoders as `weights`.
  `auto` picks it when calibration data is given.
- int8, recipe `hybrid` (optimum-intel's for diffusion UNets): the weighted MatMuls get int8 weights only (f32
  activations), then post-training quantization of the rest (convolutions, attention's activation MatMuls) with
  those MatMuls ignored, transformer preset, SmoothQuant off; same calibration as `full`.
- The VAE decoders are not quantized: fp32 in int8 bundles (their convolutions decide the image's fine detail).
- int8 with `compute="bf16"` (`--compute bf16`, CPUs with AVX512_BF16 or AMX): the same int8 graphs, with what is
  not int8 computed in bf16 (marked `"compute": "bf16"` in the manifest), and the VAEs as bf16 bundles store them
  (fp16 weights, bf16 compute): at 512^2, 20 steps on 2 AMD cores an image took 84 -> 67 s (a VAE
  decode 12.6 -> 6.8 s), PSNR 35 dB against fp32 either way (benchmarks/README.md).

Reading ONNX needs no converter: OpenVINO's ONNX frontend reads the standard-op graph that `--target openvino`
exports (and, from 2026.3, onnxruntime's MultiHeadAttention).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import NsdedgeError

log = logging.getLogger(__name__)

VAES = ("vae_decoder", "taesd_decoder")
INT8_RECIPES = ("auto", "weights", "full", "hybrid")


def pick_recipe(recipe: str, calibrated: bool) -> str:
    """`auto` (the default): the recipe that measured best among those that can run: `full` where calibration data
    is given (512^2, 20 steps on 2 AMD cores: 84 s per image against 170 s for `weights`, and 79 s for hybrid
    against 67 s for full, both with bf16 compute), else `weights`."""
    return ("full" if calibrated else "weights") if recipe == "auto" else recipe


def to_openvino(src: Path, dst: Path, name: str, precision: str, recipe: str = "weights",
                feeds: list[dict] | None = None, compute: str | None = None) -> tuple[list[str], str]:
    """Write `dst` (.xml + .bin) from the ONNX graph `src`; returns (files written, precision it ended in).
    `feeds`: recorded inputs of this graph, for the `full` int8 recipe's activation ranges. `compute`: bf16 for an
    int8 bundle computed in bf16 (its VAEs then end bf16)."""
    from ..runtime.ov_session import core, openvino

    ov = openvino()
    model = core().read_model(str(src))
    got = precision
    if precision == "int8":
        if name in VAES:
            got = "bf16" if compute == "bf16" else "fp32"
        elif recipe in ("full", "hybrid") and name == "unet":
            import nncf
            from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                               AdvancedSmoothQuantParameters)

            if not feeds:
                raise NsdedgeError(f"{src.name}: no calibration inputs recorded for the {recipe} int8 recipe")
            if recipe == "full":
                model = nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                                      subset_size=len(feeds),
                                      advanced_parameters=AdvancedQuantizationParameters(disable_bias_correction=True))
            else:
                weighted = weighted_matmuls(model)
                model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                              ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
                no_smoothing = AdvancedSmoothQuantParameters(convolution=-1, matmul=-1)
                model = nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                                      subset_size=len(feeds), ignored_scope=nncf.IgnoredScope(names=weighted),
                                      advanced_parameters=AdvancedQuantizationParameters(
                                          smooth_quant_alphas=no_smoothing))
        else:
            import nncf

            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(model, str(dst), compress_to_fp16=got == "bf16")
    return [dst.name, dst.with_suffix(".bin").name], got


def weighted_matmuls(model) -> list[str]:
    """Names of the MatMuls whose second input is a constant weight (through Convert / reshapes), not an activation."""
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        node = op.input_value(1).get_node()
        while node.get_type_name() in ("Convert", "Reshape", "Transpose", "Unsqueeze") and node.get_input_size():
            node = node.input_value(0).get_node()
        if node.get_type_name() == "Constant":
            names.append(op.get_friendly_name())
    return names
