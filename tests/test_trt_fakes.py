"""Native TensorRT engines without a GPU: the builder, the engine cache and EngineSession against fakes of
TensorRT 10 and 11 and of cuda-python (tests/fake_tensorrt.py). Which network and flags each TensorRT is given,
the timing cache, reuse, the order of the runtime calls, and images equal to the CPU's."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from nsdedge.bundle import read_manifest
from nsdedge.errors import NsdedgeError, ProviderError
from nsdedge.export.trt_build import build_engine, build_engines
from nsdedge.runtime import Reconstructor
from nsdedge.runtime.session import open_graph, open_session
from nsdedge.runtime.trt_engine import (
    Device,
    engine_key,
    engine_paths,
    require_cudart,
    this_device,
)
from tests.fake_tensorrt import (
    GPU_NAME,
    TENSORRT_10,
    TENSORRT_11,
    FakeAPIError,
    install,
)

pytest.importorskip("onnx")


def calls(gpu, name: str) -> list[tuple]:
    return [c for c in gpu.calls if c[0] == name]


def test_tensorrt_10_builds_with_flags_reuses_and_strongly_typed_when_asked(tiny_trt_bundle, tmp_path, monkeypatch):
    gpu = install(monkeypatch, TENSORRT_10)
    m = read_manifest(tiny_trt_bundle, verify=False)
    device = this_device()
    assert device == Device(GPU_NAME, "9.0", TENSORRT_10) and not device.strongly_typed
    cache = tmp_path / "engines"
    folder = cache / device.folder()
    assert not folder.exists()                                    # the first build on this GPU makes it
    plans = build_engines(tiny_trt_bundle, m, cache)
    assert set(plans) == {"unet", "vae_decoder"}
    for comp, plan in plans.items():
        key = engine_key(m, comp, device)
        assert key.flags == () and plan == engine_paths(cache, key)[0] and plan.parent == folder   # an fp32 bundle
        record = json.loads(plan.with_suffix(".json").read_text())
        assert record["key"]["flags"] == [] and json.loads(plan.read_bytes())["onnx"].endswith(f"{comp}.onnx")
    assert calls(gpu, "create_network") == [("create_network", 0)] * 2 and not calls(gpu, "set_flag")
    (first, second) = [c[1] for c in calls(gpu, "create_timing_cache")]
    assert first == 0 and second > 0                               # none yet, then the unet's read back
    timing = json.loads((folder / "timing.cache").read_bytes())
    assert timing["graphs"] == ["unet.onnx", "vae_decoder.onnx"]

    gpu.calls.clear()                                              # built already: nothing is rebuilt
    mtimes = {k: p.stat().st_mtime_ns for k, p in plans.items()}
    said = []
    assert build_engines(tiny_trt_bundle, m, cache, progress=said.append) == plans
    assert not calls(gpu, "build_serialized_network") and {k: p.stat().st_mtime_ns for k, p in plans.items()} == mtimes
    assert said == ["unet: engine up to date", "vae_decoder: engine up to date"]

    strong = build_engines(tiny_trt_bundle, m, cache, strongly_typed=True)  # another engine, beside the first
    assert all(strong[k] != plans[k] and plans[k].exists() for k in plans)
    bit = 1 << int(sys.modules["tensorrt"].NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert calls(gpu, "create_network") == [("create_network", bit)] * 2 and not calls(gpu, "set_flag")
    assert json.loads(strong["unet"].with_suffix(".json").read_text())["key"]["flags"] == ["strongly-typed"]
    only_typed = tmp_path / "typed"                                # built --strongly-typed alone: run finds it
    build_engines(tiny_trt_bundle, m, only_typed, strongly_typed=True)
    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    typed = Reconstructor(tiny_trt_bundle, "engine", engine_cache=only_typed, verify=False)(x, steps=2)
    assert np.abs(typed.astype(int) - Reconstructor(tiny_trt_bundle, "cpu")(x, steps=2).astype(int)).max() <= 1


@pytest.mark.parametrize("version, asked, network, flags, key", [
    (TENSORRT_10, False, 0, ["FP16"], ("fp16",)),
    (TENSORRT_10, True, 1 << 1, [], ("strongly-typed",)),
    (TENSORRT_11, False, 0, [], ("strongly-typed",)),               # 11: strongly typed whatever is asked
    (TENSORRT_11, True, 0, [], ("strongly-typed",)),
])
def test_fp16_precision_per_tensorrt(tiny_trt_bundle, tmp_path, monkeypatch, version, asked, network, flags, key):
    gpu = install(monkeypatch, version)
    m = read_manifest(tiny_trt_bundle, verify=False)
    for comp in m.components.values():
        comp.precision = "fp16"                                    # as an fp16 bundle's manifest says
    plans = build_engines(tiny_trt_bundle, m, tmp_path, strongly_typed=asked)
    assert engine_key(m, "unet", this_device(), strongly_typed=asked).flags == key
    assert calls(gpu, "create_network") == [("create_network", network)] * 2
    assert [c[1] for c in calls(gpu, "set_flag")] == flags * 2
    assert json.loads(plans["unet"].read_bytes())["flags"] == flags


def test_tensorrt_11_refuses_a_weakly_typed_key(tiny_trt_bundle, tmp_path, monkeypatch):
    gpu = install(monkeypatch, TENSORRT_11)
    m = read_manifest(tiny_trt_bundle, verify=False)
    m.components["unet"].precision = "fp16"
    assert this_device().strongly_typed
    key = engine_key(m, "unet", Device(GPU_NAME, "9.0", TENSORRT_10))             # made for TensorRT 10
    with pytest.raises(NsdedgeError, match="builds only strongly typed networks"):
        build_engine(tiny_trt_bundle / "unet.onnx", key, tmp_path / "timing.cache")
    assert not calls(gpu, "create_network")                       # refused before anything is built


@pytest.mark.parametrize("version", [TENSORRT_10, TENSORRT_11])
def test_engine_images_match_cpu_and_calls_are_in_order(tiny_trt_bundle, tmp_path, monkeypatch, version):
    gpu = install(monkeypatch, version)
    build_engines(tiny_trt_bundle, read_manifest(tiny_trt_bundle, verify=False), tmp_path)
    gpu.calls.clear()
    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    engine = Reconstructor(tiny_trt_bundle, "engine", engine_cache=tmp_path)(x, steps=2)
    cpu = Reconstructor(tiny_trt_bundle, "cpu")(x, steps=2)
    assert engine.shape == cpu.shape and np.abs(engine.astype(int) - cpu.astype(int)).max() <= 1

    assert len(calls(gpu, "execute_async_v3")) == 3                # two UNet steps, one VAE decode
    start = gpu.calls.index(("set_optimization_profile_async", 1))  # guidance: batch 2, the second profile
    end = gpu.calls.index(("execute_async_v3",), start) + 3
    latent, f32 = (2, 4, 32, 32), 4

    def fed(name, shape, first):
        n = int(np.prod(shape)) * f32
        return [*([("cudaMalloc", n)] if first else []), ("cudaMemcpyAsync", "HostToDevice", n),
                ("cudaStreamSynchronize",), ("set_input_shape", name, shape), ("set_tensor_address", name)]

    def step(first):
        return [*([("set_optimization_profile_async", 1)] if first else []),
                *fed("sample", latent, first), *fed("timestep", (1,), first),
                *[c for name, shape in (("encoder_hidden_states", (2, 77, 768)), ("ip_tokens", (2, 16, 768)),
                                        ("ip_scale", (1,)))
                  for c in (("set_input_shape", name, shape), ("set_tensor_address", name))],   # bound: on the device
                ("get_tensor_shape", "noise_pred"), *([("cudaMalloc", 2 * 4 * 32 * 32 * f32)] if first else []),
                ("set_tensor_address", "noise_pred"), ("execute_async_v3",),
                ("cudaMemcpyAsync", "DeviceToHost", 2 * 4 * 32 * 32 * f32), ("cudaStreamSynchronize",)]

    assert gpu.calls[start:end] == step(first=True)
    assert gpu.calls[end:end + len(step(first=False))] == step(first=False)
    assert ("set_optimization_profile_async", 0) in gpu.calls[end:]    # the VAE decodes batch 1


def test_bound_constants_are_uploaded_once(tiny_trt_bundle, tmp_path, monkeypatch):
    gpu = install(monkeypatch, TENSORRT_11)
    build_engines(tiny_trt_bundle, read_manifest(tiny_trt_bundle, verify=False), tmp_path)
    unet = open_session(tiny_trt_bundle, "unet", "engine", engine_cache=tmp_path)
    cpu = open_graph(tiny_trt_bundle / "unet.onnx", "cpu")
    rng = np.random.default_rng(0)
    const = {"encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32),
             "ip_tokens": rng.standard_normal((2, 16, 768), dtype=np.float32), "ip_scale": np.array([0.7], np.float32)}
    steps = [{"sample": rng.standard_normal((2, 4, 32, 32), dtype=np.float32),
              "timestep": np.array([t], np.float32)} for t in (900.0, 500.0, 100.0)]

    def uploads():
        return len([c for c in gpu.calls if c[:2] == ("cudaMemcpyAsync", "HostToDevice")])

    for _ in range(2):                                             # a new block uploads its constants again
        gpu.calls.clear()
        with unet.bound(const):
            for s in steps:
                np.testing.assert_array_equal(unet.run(s)["noise_pred"], cpu.run({**const, **s})["noise_pred"])
        assert uploads() == len(const) + len(steps[0]) * len(steps)
    with pytest.raises(ProviderError, match="inputs not fed: encoder_hidden_states, ip_tokens, ip_scale"):
        unet.run(steps[0])                                         # outside the block the constants are gone


def test_the_fakes_refuse_what_tensorrt_and_cuda_refuse(tiny_trt_bundle, monkeypatch):
    """The checks the tests above rely on do bite."""
    install(monkeypatch, TENSORRT_10)
    trt, cudart = sys.modules["tensorrt"], require_cudart()
    builder = trt.Builder(trt.Logger())
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    trt.OnnxParser(network, trt.Logger()).parse_from_file(str(tiny_trt_bundle / "vae_decoder.onnx"))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    profile.set_shape("latent", (1, 4, 32, 32), (1, 4, 32, 32), (1, 4, 32, 32))
    config.add_optimization_profile(profile)
    with pytest.raises(FakeAPIError, match="on a strongly typed network"):
        builder.build_serialized_network(network, config)
    config.flags.clear()
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(builder.build_serialized_network(network, config))
    context = engine.create_execution_context()
    _, stream = cudart.cudaStreamCreate()
    with pytest.raises(FakeAPIError, match="before an optimization profile"):
        context.set_input_shape("latent", (1, 4, 32, 32))
    context.set_optimization_profile_async(0, stream)
    with pytest.raises(FakeAPIError, match="outside profile 0"):
        context.set_input_shape("latent", (2, 4, 32, 32))
    with pytest.raises(FakeAPIError, match="asked before the shapes"):
        context.get_tensor_shape("image")
    context.set_input_shape("latent", (1, 4, 32, 32))
    _, small = cudart.cudaMalloc(16)
    with pytest.raises(FakeAPIError, match="run past the allocation"):
        cudart.cudaMemcpyAsync(small, np.zeros(8, np.float32).ctypes.data, 32,
                               cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)
    context.set_tensor_address("latent", small)
    with pytest.raises(FakeAPIError, match="run past the allocation"):
        context.execute_async_v3(stream)
    with pytest.raises(FakeAPIError, match="never created"):
        context.execute_async_v3(cudart.cudaStream_t(1))
    cudart.cudaFree(small)
    with pytest.raises(FakeAPIError, match="not a live allocation"):
        cudart.cudaFree(small)


def test_cudart_import_paths(monkeypatch):
    """cuda.bindings.runtime first; `from cuda import cudart` only for a cuda-python without cuda.bindings."""
    old = types.ModuleType("cuda.cudart")
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    sys.modules["cuda"].cudart = old
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)        # cuda-python < 12.6.1
    assert require_cudart() is old
    install(monkeypatch, TENSORRT_11)
    assert require_cudart() is sys.modules["cuda.bindings.runtime"]

    def broken(name):
        raise ImportError("libcudart.so.13: cannot open shared object file")

    sys.modules["cuda"].cudart = old                               # were it there, it must not hide the error
    monkeypatch.setattr(sys.modules["cuda.bindings"], "__getattr__", broken, raising=False)
    monkeypatch.delattr(sys.modules["cuda.bindings"], "runtime")
    with pytest.raises(ProviderError, match="does not load: libcudart.so.13"):
        require_cudart()
    for name in ("cuda", "cuda.bindings"):                          # no cuda-python at all
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ProviderError, match="pip install 'nsdedge\\[trt\\]'"):
        require_cudart()
