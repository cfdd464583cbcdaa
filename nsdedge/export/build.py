"""`nsdedge export`: sources -> a verified bundle directory, written atomically."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..bundle import (MAX_RESOLUTION, CONSTANTS, BundleWriter, Component, Manifest, check_not_input, check_subject,
                      schedule_problem)
from ..calibration.record import CALIBRATION_NEEDED
from ..errors import NsdedgeError, WeightsError
from .decoder_export import export_decoder
from .onnx_export import OPSET, GraphSpec, export_and_verify
from .openvino_ir import pick_recipe
from .sources import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, Sources, encode_prompt, unconditional_tokens
from .few_step import TinyVAEDecoder, fuse_lora, tiny_vae_factor
from .ip_adapter import check_against_unet
from .wrappers import UNetIP, VAEDecoder, cross_attention_layers, install_ip_adapter

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8", "bf16")
TARGETS = ("onnx", "tensorrt", "openvino", "cuda")
OPENVINO_CALIBRATION_NEEDED = ("--int8-recipe full / hybrid quantize the UNet's activations and need calibration "
                               "data: --calibration-voxels FILE (real trials of a subject) or --calibration FILE.npz "
                               "(from `nsdedge calibrate`); --int8-recipe weights needs none")

UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "ip_tokens", "ip_scale")


def unet_spec(multiple: int, fused_attention: bool = False, opset: int = OPSET) -> GraphSpec:
    return GraphSpec(component="unet", inputs=UNET_INPUTS, outputs=("noise_pred",),
                     dynamic={"sample": {0: ("batch", 1), 2: ("height", multiple), 3: ("width", multiple)},
                              "encoder_hidden_states": {0: ("batch", 1)}, "ip_tokens": {0: ("batch", 1)}},
                     fused_attention=fused_attention, opset=opset,
                     output_dynamic={"noise_pred": {0: "batch", 2: "height", 3: "width"}})


def vae_spec(fused_attention: bool = False, opset: int = OPSET, component: str = "vae_decoder") -> GraphSpec:
    return GraphSpec(component=component, inputs=("latent",), outputs=("image",),
                     dynamic={"latent": {0: ("batch", 1), 2: ("height", 1), 3: ("width", 1)}},
                     fused_attention=fused_attention, opset=opset,
                     output_dynamic={"image": {0: "batch", 2: "image_height", 3: "image_width"}})


def _unet_samples(batch: int, latent: tuple[int, int], seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, *latent, generator=g), torch.tensor([500.0]),
            torch.randn(batch, 77, 768, generator=g), torch.randn(batch, 16, 768, generator=g),
            torch.tensor([0.8]))


def check_options(precision: str, target: str, opset: int = OPSET, int8_recipe: str = "auto",
                  calibration_voxels: Path | None = None, calibration: Path | None = None,
                  int8_ops: str = "matmul+conv-weights", compute: str | None = None) -> None:
    """What an export or a conversion will need, checked before minutes of work: NsdedgeError naming the problem."""
    if precision not in PRECISIONS:
        raise NsdedgeError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if target not in TARGETS:
        raise NsdedgeError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    if (precision == "bf16" and target != "openvino") or (precision == "fp16" and target == "openvino"):
        raise NsdedgeError(f"--precision {precision} with --target {target}: bf16 is OpenVINO's (it computes bf16 on "
                           f"CPUs with AVX512_BF16 or AMX); OpenVINO takes fp32, bf16 or int8")
    if not 14 <= opset <= OPSET:
        raise NsdedgeError(f"--opset {opset}: choose 14 to {OPSET} (17 for TensorRT 8.6, 16 for TensorRT 8.5 / "
                           f"JetPack 5: no native LayerNormalization)")
    if precision == "int8" and target == "tensorrt" and calibration_voxels is None and calibration is None:
        raise NsdedgeError(CALIBRATION_NEEDED)
    from .openvino_ir import INT8_RECIPES

    if int8_recipe not in INT8_RECIPES:
        raise NsdedgeError(f"unknown int8 recipe {int8_recipe!r} (choose from {', '.join(INT8_RECIPES)})")
    int8_recipe = pick_recipe(int8_recipe, calibration_voxels is not None or calibration is not None)
    from .quantize import INT8_OP_CHOICES

    if int8_ops not in INT8_OP_CHOICES:
        raise NsdedgeError(f"unknown int8 op set {int8_ops!r} (choose from {', '.join(INT8_OP_CHOICES)})")
    if precision == "int8" and target == "openvino" and int8_recipe != "weights" and \
            calibration_voxels is None and calibration is None:
        raise NsdedgeError(OPENVINO_CALIBRATION_NEEDED)
    if compute not in (None, "f32", "bf16"):
        raise NsdedgeError(f"unknown compute precision {compute!r} (choose f32 or bf16)")
    if compute is not None and (target != "openvino" or (precision, compute) in (("fp32", "bf16"), ("bf16", "f32"))):
        raise NsdedgeError(f"--compute {compute} with --target {target} --precision {precision}: --compute is for "
                           f"--target openvino (bf16: int8 bundles computed in bf16; --precision bf16 computes bf16 "
                           f"already)")
    if target == "cuda":
        from .cuda_graph import check_cuda_target

        check_cuda_target(precision)
    if target == "openvino":                    # before minutes of tracing: what the conversion will need
        from ..runtime.ov_session import check_precision, openvino

        openvino()
        check_precision(precision, compute)     # bf16: this CPU must compute it, its fidelity is measured here
        if precision == "int8":
            try:
                import nncf  # noqa: F401
            except ImportError:
                raise NsdedgeError("--target openvino --precision int8 needs nncf: pip install 'nsdedge[export]'") \
                    from None


def export_bundle(src: Sources, out: Path, *, precision: str = "fp32", resolution: int | None = None,
                  prompt: str = DEFAULT_PROMPT, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
                  force: bool = False, calibration_voxels: Path | None = None,
                  int8_ops: str = "matmul+conv-weights",
                  target: str = "onnx", calibration: Path | None = None, opset: int = OPSET,
                  progress: Callable[[str], None] = lambda step: None, int8_recipe: str = "auto",
                  compute: str | None = None) -> Manifest:
    """Export every component of `src` into a new bundle at `out`; each graph is verified against torch.
    For fp16 / int8, `src`'s torch modules are released once the graphs are written (peak memory)."""
    check_options(precision, target, opset, int8_recipe, calibration_voxels, calibration, int8_ops, compute)
    from .quantize import check_calibration_voxels

    check_calibration_voxels(calibration_voxels, {d.subject: d.voxels for d in src.decoders})   # before the tracing
    int8_recipe = pick_recipe(int8_recipe, calibration_voxels is not None or calibration is not None)
    resolution = resolution or src.resolution or src.unet.config.sample_size * src.vae_scale_factor
    f, m = src.vae_scale_factor, src.unet_multiple
    if not 0 < resolution <= MAX_RESOLUTION:
        raise NsdedgeError(f"--resolution {resolution} out of range: 1 to {MAX_RESOLUTION} pixels")
    if resolution % (f * m):
        raise NsdedgeError(f"--resolution {resolution} must be a multiple of {f * m} for this model "
                           f"(VAE factor {f} x UNet downsampling {m})")
    latent = (resolution // f, resolution // f)
    if src.tiny_vae is not None and tiny_vae_factor(src.tiny_vae) != f:
        raise NsdedgeError(f"the tiny VAE upsamples x{tiny_vae_factor(src.tiny_vae)}, the model's VAE x{f}: "
                           f"not a TAESD for this model")
    if src.tiny_vae is not None and int(src.tiny_vae.config.latent_channels) != int(src.unet.config.in_channels):
        raise NsdedgeError(f"the tiny VAE decodes {src.tiny_vae.config.latent_channels}-channel latents, the UNet makes "
                           f"{src.unet.config.in_channels}: not a TAESD for SD 1.5")
    if not src.full_vae and src.tiny_vae is None:
        raise NsdedgeError("--no-full-vae needs --tiny-vae: a bundle needs a VAE decoder")
    _check_run_defaults(src)
    subjects = [d.subject for d in src.decoders]
    for s in subjects:
        check_subject(s)                          # (a subject names a file of the bundle)
    if len(set(subjects)) != len(subjects):
        raise NsdedgeError(f"two decoders for one subject in {subjects}")
    check_against_unet(src.ip_adapter, cross_attention_layers(src.unet))    # before the tracing, not in it
    if src.unet.config.cross_attention_dim != src.ip_adapter.resampler.output_dim:
        raise WeightsError(f"{src.ip_adapter.source}: tokens {src.ip_adapter.resampler.output_dim} wide, the UNet's "
                           f"cross-attention takes {src.unet.config.cross_attention_dim}")
    for flag, text in (("--prompt", prompt), ("--negative-prompt", negative_prompt)):
        n, most = len(src.tokenizer(text).input_ids), src.tokenizer.model_max_length
        if n > most:                              # as diffusers: truncated, and said so
            log.warning("%s is %d tokens long; the text encoder reads its first %d", flag, n, most)
    if target == "cuda":
        from .cuda_graph import check_group_norms

        check_group_norms("UNet", src.unet.config)
        if src.full_vae:
            check_group_norms("VAE", src.vae.config)
    t_start = time.perf_counter()
    with BundleWriter(out, force) as w:
        comps: dict[str, Component] = {}
        lora_fused = src.lora is not None
        if lora_fused:
            progress(f"lora: fusing into the UNet at scale {src.lora_scale}")
            fuse_lora(src.unet, src.text_encoder, src.lora, src.lora_scale, src.lora_name)
            src.lora = None                       # in the weights now: a second export must not fuse it again

        progress("constants: text embeddings and unconditional ip tokens")
        prompt_embeds = encode_prompt(src.tokenizer, src.text_encoder, prompt)
        negative_embeds = encode_prompt(src.tokenizer, src.text_encoder, negative_prompt)
        uncond = unconditional_tokens(src.unet, src.ip_adapter, src.image_encoder)
        np.savez(w.tmp / CONSTANTS, prompt_embeds=prompt_embeds.astype(np.float32),
                 negative_prompt_embeds=negative_embeds.astype(np.float32),
                 uncond_ip_tokens=uncond.astype(np.float32))

        progress("unet: export to ONNX and parity check (batch 2 and 1)")
        install_ip_adapter(src.unet, src.ip_adapter)
        unet = UNetIP(src.unet).eval()
        # onnxruntime gets fused attention; TensorRT's parser and OpenVINO need standard ops (both fuse attention)
        fused = target in ("onnx", "cuda") and opset >= OPSET      # (the opset < 18 exporter cannot fuse)
        files, entry = export_and_verify(unet, unet_spec(m, fused, opset), _unet_samples(2, latent, 1), w.tmp / "unet.onnx",
                                         checks=[_unet_samples(2, latent, 1), _unet_samples(1, latent, 2)])
        comps["unet"] = Component("unet", files[0], "fp32", entry["inputs"], entry["outputs"],
                                  _join(src.provenance, "unet", "ip_adapter"), files[1:], entry["parity"])
        del unet

        g = torch.Generator().manual_seed(3)
        vaes = ([("vae_decoder", VAEDecoder(src.vae), src.provenance.get("vae", "?"), {})] if src.full_vae else []) + \
            ([("taesd_decoder", TinyVAEDecoder(src.tiny_vae), src.provenance.get("tiny_vae", "?"),
               {"scaling_factor": float(src.tiny_vae.config.scaling_factor)})] if src.tiny_vae is not None else [])
        for name, module, source, extra in vaes:
            progress(f"{name}: export to ONNX and parity check (batch 1)")
            files, entry = export_and_verify(module.eval(), vae_spec(fused, opset, name),
                                             (torch.randn(2, 4, *latent, generator=g),), w.tmp / f"{name}.onnx",
                                             checks=[(torch.randn(1, 4, *latent, generator=g),)])
            comps[name] = Component(name, files[0], "fp32", entry["inputs"], entry["outputs"], source, files[1:],
                                    entry["parity"], extra)
        del vaes

        for dec in src.decoders:
            name = f"decoder-{dec.subject}"
            progress(f"{name}: export to ONNX and parity check")
            files, entry = export_decoder(dec, w.tmp / f"{name}.onnx")
            extra = {k: entry[k] for k in ("subject", "voxels", "kind", "rank")}
            comps[name] = Component(name, files[0], "fp32", entry["inputs"], entry["outputs"],
                                    src.provenance.get(name, "?"), files[1:], entry["parity"], extra)

        manifest = Manifest(
            image_size=(resolution, resolution), latent_channels=int(src.unet.config.in_channels),
            vae_scale_factor=f, vae_scaling_factor=float(src.vae.config.scaling_factor),
            scheduler_config=dict(src.scheduler_config), prompt=prompt, negative_prompt=negative_prompt,
            precision=precision, components=comps,
            source={**src.provenance, **({"hub": dict(src.hub)} if src.hub else {})},
            extra={"unet_multiple": m, "export_seconds": None, "target": target, "fused_attention": fused,
                   "opset": opset,
                   **({"run_defaults": dict(src.run_defaults)} if src.run_defaults else {}),
                   **({"lora": {"source": src.provenance.get("lora", "?"), "scale": float(src.lora_scale)}}
                      if lora_fused else {})})
        if precision != "fp32" or target in ("openvino", "cuda"):     # IR / fused graphs from the fp32 graphs
            import gc

            # the torch modules are done with and hold GBs (SD 1.5: about 4.5): free them before the quantizer
            # and the fidelity runs load graphs of their own
            src.unet = src.vae = src.text_encoder = src.image_encoder = src.tiny_vae = None
            gc.collect()
            _convert(w, manifest, precision, progress, calibration_voxels=calibration_voxels, int8_ops=int8_ops,
                     target=target, calibration=calibration, int8_recipe=int8_recipe, compute=compute)
        _commit(w, manifest, t_start, progress)
    return manifest


def _convert(w: BundleWriter, manifest: Manifest, precision: str, progress, *, int8_ops: str, **kw) -> None:
    """The fp32 graphs in `w` converted to `precision` / the target, with the fidelity report (quantize.py)."""
    from .quantize import INT8_OP_CHOICES, quantize_bundle

    quantize_bundle(w, manifest, precision, int8_ops=INT8_OP_CHOICES[int8_ops], progress=progress, **kw)


def _commit(w: BundleWriter, manifest: Manifest, t_start: float, progress) -> None:
    manifest.extra["export_seconds"] = round(time.perf_counter() - t_start, 2)
    progress("writing manifest and checksums")
    w.commit(manifest)


def _check_run_defaults(src: Sources) -> None:
    """The settings a bundle is to run with must be ones it can run: its VAE, a scheduler that takes its steps."""
    from ..runtime.schedulers import make_scheduler

    problem = schedule_problem(dict(src.scheduler_config))         # what every read of the bundle will check
    if problem:
        raise WeightsError(f"the model's {problem}")
    rd = src.run_defaults
    if rd.get("vae") == "tiny" and src.tiny_vae is None:
        raise NsdedgeError("run defaults name the tiny VAE but there is none: add --tiny-vae")
    if rd.get("vae") == "full" and not src.full_vae:
        raise NsdedgeError("run defaults name the full VAE but --no-full-vae leaves it out")
    try:
        make_scheduler(rd.get("scheduler", "ddim"), src.scheduler_config, int(rd.get("steps", 20)))
    except ValueError as e:
        raise NsdedgeError(f"run defaults: {e}") from None


def _join(prov: dict[str, str], *keys: str) -> str:
    vals = [prov.get(k, "?") for k in keys]
    return vals[0] if len(set(vals)) == 1 else " + ".join(f"{k}={v}" for k, v in zip(keys, vals))


def derive_bundle(fp32: str | Path, out: str | Path, *, precision: str, target: str = "onnx", force: bool = False,
                  calibration_voxels: Path | None = None, calibration: Path | None = None,
                  int8_ops: str = "matmul+conv-weights", int8_recipe: str = "auto",
                  progress: Callable[[str], None] = lambda step: None, compute: str | None = None) -> Manifest:
    """A bundle of another precision or target converted from an exported fp32 ONNX bundle: what export does after
    its own fp32 pass, without the source weights and without tracing the models again (SD 1.5: minutes sooner).

    The fp32 bundle is verified first; the new one records its manifest hash (`converted_from`). --target tensorrt
    needs an fp32 bundle exported for TensorRT (standard attention ops); OpenVINO reads either; --target cuda
    fuses either (onnxruntime's Stable Diffusion fusions, export/cuda_graph.py)."""
    import shutil

    from ..bundle import read_manifest

    fp32, out = Path(fp32), Path(out)
    check_options(precision, target, OPSET, int8_recipe, calibration_voxels, calibration, int8_ops, compute)
    int8_recipe = pick_recipe(int8_recipe, calibration_voxels is not None or calibration is not None)
    if out.resolve() == fp32.resolve():
        raise NsdedgeError(f"--out {out} is the bundle it converts; name a new directory")
    check_not_input(out, [fp32])                         # a bundle inside the one it converts spoils that one
    if precision == "fp32" and target not in ("openvino", "cuda"):
        raise NsdedgeError(f"{fp32} is fp32 already: convert it to fp16, int8 or (--target openvino / cuda) fp32")
    manifest = read_manifest(fp32)                       # checksums: a conversion of a damaged bundle is refused
    if manifest.precision != "fp32" or manifest.extra.get("target", "onnx") in ("openvino", "cuda"):
        raise NsdedgeError(f"{fp32}: a conversion starts from an fp32 ONNX bundle; this one is "
                           f"{manifest.precision}, target {manifest.extra.get('target', 'onnx')}")
    if target == "tensorrt" and manifest.extra.get("fused_attention"):
        raise NsdedgeError(f"{fp32} was exported for onnxruntime (fused attention, which TensorRT cannot parse): "
                           f"convert from a bundle exported with --target tensorrt")
    t_start = time.perf_counter()
    source_sha = manifest.sha256
    with BundleWriter(out, force) as w:
        progress(f"copying the fp32 graphs of {fp32}")
        for f in manifest.files:
            shutil.copy2(fp32 / f, w.tmp / f)
        manifest.precision = precision
        manifest.extra.update(target=target, converted_from={"bundle": str(fp32.absolute()),
                                                             "manifest_sha256": source_sha})
        _convert(w, manifest, precision, progress, calibration_voxels=calibration_voxels, int8_ops=int8_ops,
                 target=target, calibration=calibration, int8_recipe=int8_recipe, compute=compute)
        _commit(w, manifest, t_start, progress)
    return manifest
