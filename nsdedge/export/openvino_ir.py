"""OpenVINO IR from a bundle's fp32 ONNX graphs (`--target openvino`): fp32, bf16 or int8 weights (NNCF).

- fp32: the graph as it is, weights fp32 (runs with INFERENCE_PRECISION_HINT f32).
- bf16: weights stored fp16 (half the disk; the CPU plugin computes bf16 and converts them once at compile).
- int8, recipe `weights` (default): NNCF's int8 weight compression (asymmetric, per output channel) of every
  MatMul and Convolution of the UNet and the decoders; the computation stays f32 (activations are not
  quantized), so no calibration data is needed.
- int8, recipe `full`: the UNet fully quantized by NNCF's post-training quantization (int8 weights and
  activations, transformer preset, bias correction off, as OpenVINO's LCM notebook does) from recorded UNet
  inputs (`--calibration-voxels` / `--calibration`: every step, both guidance halves); decoders as `weights`.
- The VAE decoders stay fp32 in int8 bundles: their convolutions decide the image's fine detail.

Reading ONNX needs no converter: OpenVINO's ONNX frontend reads the standard-op graph that `--target openvino`
exports (and, from 2026.3, onnxruntime's MultiHeadAttention).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import NsdedgeError

log = logging.getLogger(__name__)

VAES = ("vae_decoder", "taesd_decoder")
INT8_RECIPES = ("weights", "full")


def to_openvino(src: Path, dst: Path, name: str, precision: str, recipe: str = "weights",
                feeds: list[dict] | None = None) -> tuple[list[str], str]:
    """Write `dst` (.xml + .bin) from the ONNX graph `src`; returns (files written, precision it ended in).
    `feeds`: recorded inputs of this graph, for the `full` int8 recipe's activation ranges."""
    from ..runtime.ov_session import core, openvino

    ov = openvino()
    model = core().read_model(str(src))
    got = precision
    if precision == "int8":
        if name in VAES:
            got = "fp32"
        elif recipe == "full" and name == "unet":
            import nncf
            from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

            if not feeds:
                raise NsdedgeError(f"{src.name}: no calibration inputs recorded for the full int8 recipe")
            model = nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(feeds),
                                  advanced_parameters=AdvancedQuantizationParameters(disable_bias_correction=True))
        else:
            import nncf

            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(model, str(dst), compress_to_fp16=got == "bf16")
    return [dst.name, dst.with_suffix(".bin").name], got
