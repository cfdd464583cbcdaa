"""Building TensorRT engines from a bundle's ONNX graphs, on the target GPU, into the keyed engine cache.

The cache, its keys and the runner are nsdedge/runtime/trt_engine.py. Needs the tensorrt Python package
(pip install 'nsdedge[trt]'), not torch.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from .. import __version__
from ..bundle import ENGINES, Manifest, atomic_write_bytes, json_text
from ..errors import NsdedgeError
from ..runtime.trt_engine import (
    ENGINE_COMPONENTS,
    WORKSPACE_BYTES,
    EngineKey,
    check_engine,
    engine_key,
    engine_paths,
    require_tensorrt,
    this_device,
)

log = logging.getLogger(__name__)


def record_engine(cache: Path, key: EngineKey, plan_bytes: bytes, seconds: float) -> Path:
    """Store a built plan and its record (the key, the plan's sha256) in the cache; returns the plan's path."""
    plan, meta = engine_paths(cache, key)
    plan.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(plan, plan_bytes)
    atomic_write_bytes(meta, json_text({"key": key.as_json(), "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(),
                                        "plan_bytes": len(plan_bytes), "build_seconds": round(seconds, 1),
                                        "nsdedge": __version__}).encode())
    return plan


def build_engine(onnx_path: Path, key: EngineKey, timing_cache: Path) -> bytes:
    """Serialised engine for `onnx_path` under `key` (profiles, flags, workspace), reusing the timing cache.

    A strongly typed key builds a strongly typed network and sets no precision flag (TensorRT refuses both
    together); TensorRT 11 builds nothing else and has no precision flags left, so a weakly typed key (one made
    for another TensorRT) is refused there rather than built as something it does not say."""
    trt = require_tensorrt()
    major = int(trt.__version__.split(".")[0])
    creation = trt.NetworkDefinitionCreationFlag
    strongly = "strongly-typed" in key.flags
    if strongly and major < 11 and not hasattr(creation, "STRONGLY_TYPED"):
        raise NsdedgeError(f"TensorRT {trt.__version__} has no strongly typed networks (TensorRT 10 or later has)")
    if not strongly and not hasattr(trt.BuilderFlag, "FP16"):
        raise NsdedgeError(f"TensorRT {trt.__version__} builds only strongly typed networks; this engine key asks "
                           f"for builder flags {list(key.flags)} (made for another TensorRT)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major < 10:                                          # TensorRT 8.x needs explicit batch asked for
        flags = 1 << int(creation.EXPLICIT_BATCH)
    if strongly and major < 11:                             # 11: always on, the flag deprecated and ignored
        flags |= 1 << int(creation.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):          # reads <file>.data beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise NsdedgeError(f"{onnx_path.name}: TensorRT {trt.__version__} cannot parse the graph: {errors} "
                           f"(older TensorRT: export with --opset 17, see README's Jetson notes)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, key.workspace)
    for flag in () if strongly else key.flags:
        config.set_flag({"fp16": trt.BuilderFlag.FP16, "int8": trt.BuilderFlag.INT8}[flag])
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for prof in key.profiles:
        p = builder.create_optimization_profile()
        for name, mn, opt, mx in prof:
            p.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(p)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise NsdedgeError(f"{onnx_path.name}: TensorRT could not build an engine (see its log above)")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)     # the first build on a GPU: no folder yet
    atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def build_engines(bundle: Path, manifest: Manifest, cache: Path | None = None, batches=(1, 2),
                  dynamic: bool = False, workspace: int = WORKSPACE_BYTES, force: bool = False,
                  progress=lambda s: None, strongly_typed: bool = False) -> dict[str, Path]:
    """Build (or reuse) an engine per ENGINE_COMPONENTS component for this GPU; returns the plan paths.
    `strongly_typed`: strongly typed engines where TensorRT still builds both (10); 11 builds nothing else."""
    if manifest.extra.get("target") == "openvino":
        raise NsdedgeError(f"{bundle} holds OpenVINO IR: export with --target tensorrt for engines")
    if manifest.extra.get("target") == "cuda":
        raise NsdedgeError(f"{bundle} holds graphs fused for onnxruntime's CUDA provider (--target cuda): export with "
                           f"--target tensorrt for engines")
    if manifest.extra.get("fused_attention"):
        raise NsdedgeError(f"{bundle} was exported for onnxruntime (its attention is com.microsoft.MultiHeadAttention, "
                           f"which TensorRT's parser does not know): export it with --target tensorrt for engines")
    device = this_device()
    cache = Path(cache or Path(bundle) / ENGINES)
    out = {}
    for comp in [c for c in manifest.components if c.removesuffix("_fp32") in ENGINE_COMPONENTS]:
        key = engine_key(manifest, comp, device, batches, dynamic, workspace, strongly_typed)
        why = check_engine(cache, key)
        if why is None and not force:
            progress(f"{comp}: engine up to date")
            out[comp] = engine_paths(cache, key)[0]
            continue
        progress(f"{comp}: building ({why or 'forced'}); minutes for a full UNet")
        t = time.perf_counter()
        plan = build_engine(Path(bundle) / manifest.components[comp].file, key,
                            cache / device.folder() / "timing.cache")
        out[comp] = record_engine(cache, key, plan, time.perf_counter() - t)
    return out


