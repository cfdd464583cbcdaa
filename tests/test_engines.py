"""TensorRT engines and GPU providers: everything that can be checked without a GPU (profiles, cache keys,
staleness, provider options, errors), and @gpu tests that build and run engines where a GPU is."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nsdedge.bundle import read_manifest
from nsdedge.export.trt_build import record_engine
from nsdedge.runtime.trt_engine import Device, check_engine, engine_key, engine_paths, pick_profile, profile_shapes
from nsdedge.errors import ProviderError
from nsdedge.runtime.session import cuda_options, open_graph, resolve, tensorrt_options
from tests.conftest import run_cli

ORIN = Device("Orin (nvgpu)", "8.7", "8.5.2")
H100 = Device("NVIDIA H100 80GB HBM3", "9.0", "10.3.0")


def test_static_profiles_per_batch(tiny_bundle):
    m = read_manifest(tiny_bundle, verify=False)
    prof = profile_shapes(m, "unet")
    assert len(prof) == 2
    for batch, p in zip((1, 2), prof):
        shapes = {name: (mn, opt, mx) for name, mn, opt, mx in p}
        assert shapes["sample"] == ((batch, 4, 32, 32),) * 3             # min = opt = max: static
        assert shapes["ip_tokens"][0] == (batch, 16, 768) and shapes["timestep"][0] == (1,)
    (vae,) = profile_shapes(m, "vae_decoder", batches=(1,))
    assert vae == (("latent", (1, 4, 32, 32), (1, 4, 32, 32), (1, 4, 32, 32)),)


def test_dynamic_profile_and_pick(tiny_bundle):
    m = read_manifest(tiny_bundle, verify=False)
    ((sample, *_),) = profile_shapes(m, "unet", batches=(1, 2, 4), dynamic=True)
    name, mn, opt, mx = sample
    assert name == "sample" and mn[0] == 1 and opt == (4, 4, 32, 32) and mx[0] == 4
    assert mn[2] < 32 < mx[2] and mn[2] % m.extra["unet_multiple"] == 0
    key = engine_key(m, "unet", H100)
    two = {"sample": (2, 4, 32, 32), "timestep": (1,), "encoder_hidden_states": (2, 77, 768),
           "ip_tokens": (2, 16, 768), "ip_scale": (1,)}
    assert pick_profile(key, two) == 1
    with pytest.raises(ProviderError, match="no engine profile holds"):
        pick_profile(key, {**two, "sample": (2, 4, 40, 40)})


def test_engine_key_covers_gpu_version_graph_and_settings(tiny_bundle):
    m = read_manifest(tiny_bundle, verify=False)
    base = engine_key(m, "unet", H100)
    assert base.digest() == engine_key(m, "unet", H100).digest()                      # stable
    others = [engine_key(m, "unet", ORIN), engine_key(m, "unet", Device(H100.gpu, H100.compute_capability, "10.4.0")),
              engine_key(m, "unet", H100, batches=(1,)), engine_key(m, "unet", H100, dynamic=True),
              engine_key(m, "unet", H100, workspace=1 << 30), engine_key(m, "vae_decoder", H100)]
    assert len({k.digest() for k in [base, *others]}) == len(others) + 1
    m.files[m.components["unet"].file]["sha256"] = "0" * 64                           # another graph
    assert engine_key(m, "unet", H100).digest() != base.digest()
    assert engine_paths(tiny_bundle, base)[0].parent.name == "nvidia-h100-80gb-hbm3_sm90_trt10.3.0"


def test_engine_cache_refuses_stale_foreign_and_corrupted(tiny_bundle, tmp_path):
    m = read_manifest(tiny_bundle, verify=False)
    key = engine_key(m, "unet", ORIN)
    assert check_engine(tmp_path, key) == "no unet engine built yet"
    plan = record_engine(tmp_path, key, b"serialized engine bytes", 12.0)
    assert check_engine(tmp_path, key) is None
    # the same bundle on another GPU: the cache holds only Orin's engine
    why = check_engine(tmp_path, engine_key(m, "unet", H100))
    assert "no unet engine for NVIDIA H100" in why and ORIN.folder() in why
    # a plan replaced behind the record's back
    plan.write_bytes(b"something else")
    assert "does not match its recorded sha256" in check_engine(tmp_path, key)
    # a record edited to claim another TensorRT
    plan.write_bytes(b"serialized engine bytes")
    meta = plan.with_suffix(".json")
    rec = json.loads(meta.read_text())
    rec["key"]["device"]["tensorrt"] = "8.6.1"
    meta.write_text(json.dumps(rec))
    assert "built for other device" in check_engine(tmp_path, key)


def test_onnxruntime_tensorrt_and_cuda_options(tiny_bundle, tmp_path):
    m = read_manifest(tiny_bundle, verify=False)
    o = tensorrt_options(m, "unet", tmp_path)
    assert o["trt_engine_cache_enable"] and o["trt_engine_cache_path"] == str(tmp_path)
    assert o["trt_fp16_enable"] is False and o["trt_int8_enable"] is False                     # an fp32 bundle
    assert o["trt_profile_min_shapes"].split(",")[0] == "sample:1x4x32x32"
    assert "sample:2x4x32x32" in o["trt_profile_max_shapes"]
    m.components["unet"].precision = "int8"                                                    # a QDQ bundle
    o = tensorrt_options(m, "unet", tmp_path)
    assert o["trt_int8_enable"] and o["trt_fp16_enable"] and not o["trt_int8_use_native_calibration_table"]
    assert cuda_options(low_memory=True, gpu_mem_limit=2 << 30) == {
        "cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_use_max_workspace": "0", "gpu_mem_limit": 2 << 30}
    lean = cuda_options(cuda_graph=True)               # the default: lean arena, capped workspace, a CUDA graph
    assert lean["enable_cuda_graph"] == "1" and lean["cudnn_conv_algo_search"] == "EXHAUSTIVE"


def test_missing_gpu_backends_are_clear_errors(tiny_bundle, trial, tmp_path):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    with pytest.raises(ProviderError, match="pip install 'nsdedge\\[trt\\]'"):
        resolve("engine")
    for args in (["build-engines", str(tiny_bundle)],
                 ["run", "--voxels", str(trial), "--bundle", str(tiny_bundle), "--provider", "engine",
                  "--out", str(tmp_path / "x.png")]):
        r = run_cli(*args)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tiny_bundle / "engines").exists()


def test_engines_need_a_tensorrt_target_bundle(tiny_bundle):
    """A --target onnx bundle has contrib-op attention that TensorRT cannot parse: refused before any GPU work."""
    from nsdedge.export.trt_build import build_engines
    from nsdedge.errors import NsdedgeError

    with pytest.raises(NsdedgeError, match="--target tensorrt"):
        build_engines(tiny_bundle, read_manifest(tiny_bundle, verify=False), tiny_bundle / "never")
    assert not (tiny_bundle / "never").exists()


def test_bound_constants_give_the_same_outputs(tiny_bundle):
    """I/O binding (constants uploaded once, as the GPU path keeps them on the device) changes nothing."""
    s = open_graph(tiny_bundle / "unet.onnx", "cpu")
    rng = np.random.default_rng(0)
    const = {"encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32),
             "ip_tokens": rng.standard_normal((2, 16, 768), dtype=np.float32), "ip_scale": np.array([0.7], np.float32)}
    step = {"sample": rng.standard_normal((2, 4, 32, 32), dtype=np.float32), "timestep": np.array([500.0], np.float32)}
    plain = s.run({**const, **step})["noise_pred"]
    with s.bound(const):
        bound = s.run(step)["noise_pred"]
    np.testing.assert_array_equal(plain, bound)


# -- on a GPU -----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_native_engines_build_cache_and_match_cpu(tmp_path):
    pytest.importorskip("tensorrt")
    pytest.importorskip("diffusers")
    from nsdedge.errors import ProviderError
    from nsdedge.runtime.session import resolve
    from nsdedge.runtime.trt_engine import this_device

    try:                                  # TensorRT installed is not enough: cuda-python and a GPU must be there
        resolve("engine"), this_device()
    except ProviderError as e:
        pytest.skip(str(e))
    from nsdedge.export.trt_build import build_engines
    from nsdedge.export.build import export_bundle
    from nsdedge.export.presets import build_preset
    from nsdedge.runtime import Reconstructor

    tiny_bundle = tmp_path / "trt"
    export_bundle(build_preset("tiny"), tiny_bundle, target="tensorrt")
    m = read_manifest(tiny_bundle)
    plans = build_engines(tiny_bundle, m, tmp_path)
    assert set(plans) == {"unet", "vae_decoder"} and all(p.exists() for p in plans.values())
    again = build_engines(tiny_bundle, m, tmp_path)                       # cached: nothing rebuilt
    assert {k: p.stat().st_mtime for k, p in again.items()} == {k: p.stat().st_mtime for k, p in plans.items()}
    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    gpu = Reconstructor(tiny_bundle, "engine", engine_cache=tmp_path)(x, steps=4)
    cpu = Reconstructor(tiny_bundle, "cpu")(x, steps=4)
    assert np.abs(gpu.astype(int) - cpu.astype(int)).max() <= 3


@pytest.mark.gpu
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_onnxruntime_gpu_providers_match_cpu(tiny_bundle, tmp_path, provider):
    from nsdedge.runtime import Reconstructor
    from nsdedge.runtime.session import probe

    pytest.importorskip("onnxruntime")
    why = probe(provider)
    if why is not None:                      # compiled in is not enough: it must start (libraries, a GPU)
        pytest.skip(why)
    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    gpu = Reconstructor(tiny_bundle, provider, engine_cache=tmp_path)(x, steps=4)
    cpu = Reconstructor(tiny_bundle, "cpu")(x, steps=4)
    assert np.abs(gpu.astype(int) - cpu.astype(int)).max() <= 3
