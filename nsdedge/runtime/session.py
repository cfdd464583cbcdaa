"""The one seam to execution backends: a small protocol, and the factory that opens a bundle graph on a provider.

    sess = open_session(bundle, "unet", "cuda")          # a Backend
    out = sess.run({"sample": x, ...})                     # {output name: float array}
    with sess.bound({"encoder_hidden_states": e, ...}):    # constants uploaded once; run() takes the rest
        ...

Providers (nsdedge names): cpu, cuda and tensorrt run through onnxruntime (ort_session.py); engine runs native
TensorRT engines built by `nsdedge build-engines` (trt_engine.py); openvino runs OpenVINO IR (or ONNX) on
OpenVINO's CPU plugin (ov_session.py). A new backend is one module with a class
that has the Backend methods, a name in PROVIDER_NAMES and a branch in `resolve` and `open_session`; nothing in
the pipeline changes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ContextManager, Protocol, runtime_checkable

import numpy as np

from ..bundle import ENGINES, Manifest, read_manifest
from ..errors import BundleError, ProviderError
from .ort_session import ORT_PROVIDERS, OrtSession, cuda_options, onnxruntime, probe, tensorrt_options

log = logging.getLogger(__name__)

ENGINE = "engine"              # native TensorRT engines from `nsdedge build-engines`
OPENVINO = "openvino"          # OpenVINO's CPU plugin (bundles exported with --target openvino, or ONNX)
PROVIDER_NAMES = ("auto", *ORT_PROVIDERS, ENGINE, OPENVINO)
AUTO_ORDER = ("cuda", "cpu")   # tensorrt only when asked: it builds engines on first use (minutes)
_WARNED: set[str] = set()

__all__ = ["Backend", "ENGINE", "OPENVINO", "PROVIDER_NAMES", "bundle_provider", "available", "probe", "resolve",
           "open_session", "open_graph",
           "cuda_options", "tensorrt_options", "Session"]


@runtime_checkable
class Backend(Protocol):
    """What the pipeline needs of a graph on some engine."""

    provider: str                                   # the nsdedge provider name that runs it

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs by name -> outputs by name (host arrays)."""

    def bound(self, constants: dict[str, np.ndarray]) -> ContextManager:
        """Within the block `constants` stay on the device and run() takes only the other inputs."""

    def input_dtype(self, name: str) -> np.dtype:
        """The dtype to feed input `name` in (float16 graphs take float16)."""


def available() -> list[str]:
    """nsdedge provider names onnxruntime can start here: probed (a one-node graph opened with the provider alone),
    not read off get_available_providers(), which lists whatever was compiled in."""
    return [name for name in ORT_PROVIDERS if probe(name) is None]


def resolve(provider: str) -> str:
    """'auto' -> the best provider that starts (said in the log); a named provider that cannot start is an error
    naming what is missing, never a silent fallback."""
    if provider == ENGINE:
        from .trt_engine import require_cudart, require_tensorrt

        require_tensorrt(), require_cudart()     # ProviderError with the install line when either is missing
        return ENGINE
    if provider == OPENVINO:
        from .ov_session import openvino

        openvino()                               # ProviderError with the install line when it is missing
        return OPENVINO
    if provider == "auto":
        for p in AUTO_ORDER:
            why = probe(p)
            if why is None:
                log.info("provider auto: %s", p)
                return p
            if p not in _WARNED and ORT_PROVIDERS[p] in onnxruntime().get_available_providers():
                _WARNED.add(p)                   # installed for it, yet it cannot start: said once per process
                log.warning("provider auto: not %s (%s)", p, why)
    if provider not in ORT_PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r} (choose from {', '.join(PROVIDER_NAMES)})")
    why = probe(provider)
    if why is not None:
        raise ProviderError(f"provider {provider!r} is not available here: {why}; or use --provider cpu")
    return provider


def bundle_provider(manifest: Manifest, provider: str) -> str:
    """'auto' on a bundle exported for OpenVINO is openvino, on one exported for CUDA cuda; any other choice stands,
    except that a CUDA bundle (onnxruntime's GPU-only fused ops) runs on nothing else."""
    target = manifest.extra.get("target")
    if target == "cuda":
        if provider not in ("auto", "cuda"):
            raise ProviderError(f"the bundle was exported with --target cuda (fused ops that only onnxruntime's CUDA "
                                f"provider runs): run it with --provider cuda, not {provider}")
        why = probe("cuda")
        if why is not None:
            raise ProviderError(f"the bundle was exported with --target cuda and runs on onnxruntime's CUDA provider "
                                f"only, which does not start here: {why}")
        return "cuda"
    return OPENVINO if provider == "auto" and target == OPENVINO else provider


def open_graph(path: str | Path | bytes, provider: str = "cpu", *, threads: int | None = None,
               options: dict | None = None, profile: str | None = None) -> OrtSession:
    """One ONNX file outside a bundle's manifest (export's parity check, quantization's fidelity pass) on an
    onnxruntime provider, with the same session settings as the runtime."""
    return OrtSession(path if isinstance(path, bytes) else Path(path), resolve(provider), threads=threads,
                      provider_options=options, profile=profile)


def open_session(bundle: str | Path, component: str, provider: str = "auto", *, manifest: Manifest | None = None,
                 file: str | None = None, low_memory: bool = False, threads: int | None = None,
                 engine_cache: str | Path | None = None, engine_batches: tuple[int, ...] = (1, 2),
                 profile: str | None = None) -> Backend:
    """`component` of the bundle at `bundle` on `provider` (auto | cpu | cuda | tensorrt | engine).

    `manifest`: the bundle's, if already read (else read without hashing). `file`: another graph file in the
    bundle's folder standing in for the component's own (quantization compares a converted graph with it).
    `low_memory`: provider settings for small devices (heuristic cuDNN search; by default each graph in an arena
    of its own that grows by request and is freed with it, and the UNet's CUDA graph: LOW_MEMORY_SHARED_ARENA /
    LOW_MEMORY_CUDA_GRAPH). Otherwise graphs on CUDA share one arena (ort_session.shared_cuda_arena).
    On a GPU provider the voxel decoders run on onnxruntime's CPU provider: one small GEMM chain per trial (under
    a millisecond for a rank-256 ridge), while a GPU session of their own costs device memory beyond its weights
    for the whole run (on an H100: 84 MB at the peak for a 14 MB decoder).
    `engine_cache` / `engine_batches`: where native engines live and which profiles they were built for.
    `profile`: a file prefix for onnxruntime's profiler (benchmarks/profile_unet.py); on OpenVINO, per-node
    counters (OvSession.profile_by_type)."""
    bundle = Path(bundle)
    manifest = manifest or read_manifest(bundle, verify=False)
    provider = resolve(bundle_provider(manifest, provider))
    path = bundle / (file or manifest.components[component].file)
    if provider in (*ORT_PROVIDERS, ENGINE) and component in manifest.subjects.values():
        provider = "cpu"                                  # a voxel decoder (see above)
    if provider == OPENVINO:
        from .ov_session import OvSession

        comp = manifest.components[component]
        return _ports_checked(OvSession(path, comp.precision, threads, profile=bool(profile),
                                        compute=comp.extra.get("compute")), manifest, component, path)
    if path.suffix == ".xml":
        raise ProviderError(f"{bundle} holds OpenVINO IR (exported with --target openvino): run it with "
                            f"--provider openvino")
    if provider == ENGINE:
        from .trt_engine import ENGINE_COMPONENTS, EngineSession, engine_key, engine_paths, this_device

        if component.removesuffix("_fp32") in ENGINE_COMPONENTS:
            if file or profile:
                raise ProviderError(f"{component}: a native engine is built from the bundle's own graph and has no "
                                    f"onnxruntime profiler; file= and profile= need an onnxruntime provider")
            cache = Path(engine_cache) if engine_cache else bundle / ENGINES
            key = engine_key(manifest, component, this_device(), engine_batches)
            typed = engine_key(manifest, component, this_device(), engine_batches, strongly_typed=True)
            if not engine_paths(cache, key)[0].exists() and engine_paths(cache, typed)[0].exists():
                key = typed                      # built with build-engines --strongly-typed (checked when opened)
            return _ports_checked(EngineSession(cache, key), manifest, component, path)
        raise ProviderError(f"{component}: no native engine is built for it (engines: {', '.join(ENGINE_COMPONENTS)})")
    options = None
    if provider == "tensorrt":
        if manifest.extra.get("fused_attention") and component == "unet":
            log.warning("%s was exported for onnxruntime (fused attention): TensorRT takes the graph in pieces "
                        "around the MultiHeadAttention nodes; export with --target tensorrt for whole engines", bundle)
        cache = (Path(engine_cache) if engine_cache else bundle / ENGINES) / "onnxruntime-trt"
        options = tensorrt_options(manifest, component, cache)
    elif provider == "cuda":
        # the UNet runs the same shapes every step: one captured CUDA graph per batch size replays it
        graph = component == "unet" and not profile and (not low_memory or LOW_MEMORY_CUDA_GRAPH)
        options = cuda_options(low_memory, cuda_graph=graph)
    config = None
    if provider == "cpu" and manifest.extra.get("target") == "tensorrt":
        config = EXACT_QDQ                                # what TensorRT computes, not the CPU's integer kernels
    return _ports_checked(OrtSession(path, provider, threads=threads, provider_options=options, profile=profile,
                                     shared_arena=not low_memory or LOW_MEMORY_SHARED_ARENA,
                                     arena_bytes=arena_bytes(manifest, low_memory), config=config),
                          manifest, component, path)


# A TensorRT bundle's int8 graphs (static QDQ) on onnxruntime's CPU provider (the export's fidelity report, or a
# user trying one without a GPU): each QuantizeLinear / DequantizeLinear pair computed as it is written (int8
# rounding, float arithmetic), as TensorRT's int8 kernels compute it up to their summation order, not fused into
# the CPU's u8 x s8 integer kernels, whose 16-bit pair sums saturate on x86 CPUs without VNNI (AVX2 only; onnxruntime
# documents it). Measured on the tiny preset on a 2-core AMD EPYC with AVX2 only (2026-11-27): the int8 fidelity
# was 27.8 dB PSNR against fp32 with the fused kernels and 35.2 dB computed as written.
EXACT_QDQ = {"session.disable_quant_qdq": "1"}


def _ports_checked(backend, manifest: Manifest, component: str, path: Path):
    """The graph's inputs are the ones the manifest names (the checksums prove the file is the one the manifest
    names, not that the manifest describes it): otherwise BundleError, before any run."""
    want = {p["name"] for p in manifest.components[component].inputs}
    have = set(backend.inputs)
    if want != have:
        close = getattr(backend, "close", None)
        if close:
            close()
        raise BundleError(f"{path}: the graph takes {', '.join(sorted(have)) or 'nothing'}; the bundle's manifest "
                          f"says {component} takes {', '.join(sorted(want)) or 'nothing'}")
    return backend


# Low memory on CUDA (a batch runs stage-major: the UNet stays loaded for every trial of a chunk, then the VAE):
# whether the UNet replays a captured CUDA graph there too, and whether its graphs draw activations from the
# process's shared arena (whose regions outlive the session) or from an arena of their own, freed with the session.
# Measured on an H100 (2026-11-27, SD 1.5 fp16 512^2, 10-trial batch, weights in blocks; benchmarks/results/
# cuda-h100-lean.json): graph + own arena 0.698 s per image at a 2004 MB peak, against 0.663 s for the normal
# mode's batch; graph + shared arena 0.749 s, 2056 MB; neither 0.773 s, 2086 MB. With a chunk of 4 trials the
# shared arena grew to 2572 MB (the VAE stage's regions stay for the next chunk's UNet), its own arena 2010 MB.
LOW_MEMORY_CUDA_GRAPH = True
LOW_MEMORY_SHARED_ARENA = False


def arena_bytes(manifest: Manifest, low_memory: bool = False) -> int:
    """The shared CUDA arena's first region for this bundle: what SD 1.5's UNet and VAE needed for one 512^2 image
    (ort_session.ARENA_REGION for fp16 activations, ARENA_REGION_FP32 otherwise; in low memory ARENA_REGION_LOW, twice
    that for fp32), scaled by the latent's area."""
    from .ort_session import ARENA_REGION, ARENA_REGION_FP32, ARENA_REGION_LOW

    h, w = manifest.latent_size
    fp16 = manifest.precision == "fp16"
    base = ARENA_REGION_LOW * (1 if fp16 else 2) if low_memory else ARENA_REGION if fp16 else ARENA_REGION_FP32
    return int(base * h * w / 64 ** 2) >> 20 << 20


# Names of earlier releases, kept for their callers.
PROVIDERS = ORT_PROVIDERS


class Session(OrtSession):
    """One ONNX file on a provider, 'auto' resolved: the onnxruntime backend under its earlier name."""

    def __init__(self, path: str | Path, provider: str = "cpu", threads: int | None = None,
                 provider_options: dict | None = None):
        super().__init__(Path(path), resolve(provider), threads, provider_options)
