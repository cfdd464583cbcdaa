"""The GPU path, as far as it can be checked without a GPU: providers probed (not read off the compiled-in list),
device-buffer runs (what CUDA graphs replay) on the CPU provider, and low memory running a batch stage by stage."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from nsdedge.errors import ProviderError
from nsdedge.runtime import Reconstructor, ort_session, pipeline
from nsdedge.runtime.batch import reconstruct
from nsdedge.runtime.ort_session import PROBE_MODEL, OrtSession
from nsdedge.runtime.session import available, resolve
from tests.conftest import run_cli


def fake_onnxruntime(starts: set[str], error: str = "libnvinfer.so.10: cannot open shared object file"):
    """onnxruntime as a GPU wheel looks on a machine where only the providers in `starts` load their libraries."""
    import onnxruntime as real

    class InferenceSession:
        def __init__(self, model, opts, providers):
            ep = providers[0] if isinstance(providers[0], str) else providers[0][0]
            assert model == PROBE_MODEL and len(providers) == 1           # the probe: that provider alone
            if ep not in starts:
                raise RuntimeError(f"Failed to create {ep}: {error}\nmore lines of log")
            self.ep = ep

        def run(self, outputs, feeds):
            return [np.maximum(feeds["x"], 0)]

        def get_providers(self):
            return [self.ep, "CPUExecutionProvider"]

    return types.SimpleNamespace(
        __version__="1.31.1", __file__="/nonexistent/onnxruntime/__init__.py", SessionOptions=real.SessionOptions,
        InferenceSession=InferenceSession,
        get_available_providers=lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])


@pytest.fixture
def gpu_wheel(monkeypatch):
    def install(starts: set[str]):
        monkeypatch.setattr(ort_session, "_PROBED", {})
        monkeypatch.setattr(ort_session, "onnxruntime", lambda: fake_onnxruntime(starts))
    return install


def test_a_compiled_in_provider_that_cannot_start_is_not_available(gpu_wheel):
    gpu_wheel({"CUDAExecutionProvider"})                  # CUDA loads; TensorRT's libnvinfer is missing
    assert available() == ["cpu", "cuda"]
    assert resolve("auto") == "cuda" and resolve("cuda") == "cuda"
    with pytest.raises(ProviderError) as e:
        resolve("tensorrt")
    msg = str(e.value)
    assert "TensorrtExecutionProvider does not start" in msg and "libnvinfer.so.10" in msg and "\n" not in msg
    assert "pip install 'nsdedge[gpu,trt]'" in msg                     # TensorRT's own wheels, not only [gpu]
    # nothing starts but the CPU: auto says cpu, a named GPU provider is an error naming what is missing
    gpu_wheel(set())
    assert resolve("auto") == "cpu" and available() == ["cpu"]
    with pytest.raises(ProviderError, match="CUDAExecutionProvider does not start"):
        resolve("cuda")


def test_probe_is_cached_per_process(gpu_wheel, monkeypatch):
    gpu_wheel({"CUDAExecutionProvider"})
    assert ort_session.probe("cuda") is None
    monkeypatch.setattr(ort_session, "onnxruntime", lambda: pytest.fail("probed twice"))
    assert ort_session.probe("cuda") is None and ort_session.probe("cpu") is None


def test_probe_model_is_a_valid_onnx_graph():
    onnx = pytest.importorskip("onnx")
    m = onnx.load_from_string(PROBE_MODEL)
    onnx.checker.check_model(m, full_check=True)
    s = OrtSession(PROBE_MODEL, "cpu")
    x = np.linspace(-1, 1, 8, dtype=np.float32)[None]
    np.testing.assert_array_equal(s.run({"x": x})["y"], np.maximum(x, 0))


def test_a_gpu_provider_here_is_a_one_line_error(trial, tiny_bundle, tmp_path):
    pytest.importorskip("onnxruntime")
    if "cuda" in available():
        pytest.skip("CUDA starts here")
    r = run_cli("run", "--voxels", str(trial), "--bundle", str(tiny_bundle), "--provider", "cuda",
                "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and r.stderr.startswith("error: provider 'cuda' is not available")
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()
    # without --bundle: refused before the default bundle is built (minutes of export for nothing)
    r = run_cli("run", "--voxels", str(trial), "--provider", "cuda", "--out", str(tmp_path / "y.png"),
                env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 2 and r.stderr.startswith("error: provider 'cuda' is not available"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "cache" / "nsdedge").exists()
    (tmp_path / "job.json").write_text(json.dumps({"work": [{"voxels": str(trial), "out": str(tmp_path / "j")}]}))
    r = run_cli("run", "--job", str(tmp_path / "job.json"), "--provider", "cuda",            # a job, run here
                env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 2 and r.stderr.startswith("error: provider 'cuda' is not available"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "cache" / "nsdedge").exists()


def test_device_buffers_give_the_same_outputs_and_never_stale_constants(tiny_bundle):
    """The CUDA path keeps every input in a buffer per set of shapes, updated in place (what a captured CUDA graph
    replays); on the CPU provider the same code runs with CPU buffers."""
    plain = OrtSession(tiny_bundle / "unet.onnx", "cpu")
    dev = OrtSession(tiny_bundle / "unet.onnx", "cpu")
    dev.device_io = True
    rng = np.random.default_rng(0)

    def constants(b):
        return {"encoder_hidden_states": rng.standard_normal((b, 77, 768), dtype=np.float32),
                "ip_tokens": rng.standard_normal((b, 16, 768), dtype=np.float32),
                "ip_scale": np.array([0.7], np.float32)}

    for b in (2, 1, 2):                                   # a new block of the same shapes reuses the slot
        const = constants(b)
        with dev.bound(const):
            for t in (900.0, 100.0):
                step = {"sample": rng.standard_normal((b, 4, 32, 32), dtype=np.float32),
                        "timestep": np.array([t], np.float32)}
                np.testing.assert_array_equal(dev.run(step)["noise_pred"],
                                              plain.run({**const, **step})["noise_pred"])
    assert len(dev._slots) == 2                            # one per batch size


def _count_opens(monkeypatch) -> list[str]:
    opened = []
    real = pipeline.open_session

    def counting(bundle, component, *a, **kw):
        opened.append(component)
        return real(bundle, component, *a, **kw)

    monkeypatch.setattr(pipeline, "open_session", counting)
    return opened


def test_low_memory_runs_a_batch_stage_major_with_the_same_bytes(tiny_bundle, tmp_path, monkeypatch):
    x = np.random.default_rng(3).standard_normal((5, 256)).astype(np.float32)
    np.save(tmp_path / "v.npy", x)
    normal = reconstruct(Reconstructor(tiny_bundle, "cpu"), tmp_path / "v.npy", tmp_path / "normal", steps=3)
    opened = _count_opens(monkeypatch)
    monkeypatch.setattr("nsdedge.runtime.batch.LOW_MEMORY_CHUNK", 3)
    seen = []
    lean = Reconstructor(tiny_bundle, "cpu", low_memory=True)
    reconstruct(lean, tmp_path / "v.npy", tmp_path / "lean", steps=3,
                progress=lambda p: seen.append(max(p.done, p.denoised) * p.steps + p.step))
    # two chunks (3 + 2 trials): decoder, UNet and VAE opened once per chunk, never once per image
    assert opened == ["decoder-subj01", "unet", "vae_decoder"] * 2
    assert lean._sessions == {}                           # nothing left open after the batch
    assert seen == sorted(seen) and seen[-1] == 5 * 3     # the progress bar only moves forward
    for a, b in zip(normal.written, sorted((tmp_path / "lean").glob("*.png"))):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_keep_holds_a_graph_open_in_low_memory_only_within_the_block(tiny_bundle, monkeypatch):
    opened = _count_opens(monkeypatch)
    rec = Reconstructor(tiny_bundle, "cpu", low_memory=True)
    tokens = rec.decode(np.zeros((2, 256), np.float32))
    with rec.keep("unet"):
        rec.denoise(tokens[:1], steps=2)
        rec.denoise(tokens[1:], steps=2)
        assert "unet" in rec._sessions
    assert "unet" not in rec._sessions
    assert opened.count("unet") == 1


def test_low_memory_on_a_gpu_runs_the_guidance_halves_one_after_the_other(tiny_bundle):
    """The two halves of a guided batch at batch 1 (split_guidance: on CUDA in low memory mode), each with its own
    conditioning: the same latents as the batch of 2 to float rounding."""
    seen = []
    x = np.random.default_rng(4).standard_normal((1, 256)).astype(np.float32)
    whole = Reconstructor(tiny_bundle, "cpu")
    split = Reconstructor(tiny_bundle, "cpu", low_memory=True,
                          observer=lambda c, feeds, out: c == "unet" and seen.append(feeds))
    assert not split.split_guidance                       # on the CPU the modes give the same bytes (above)
    split.split_guidance = True                           # as on CUDA
    tokens = whole.decode(x)
    a, b = whole.denoise(tokens, steps=3, seed=5), split.denoise(tokens, steps=3, seed=5)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
    assert len(seen) == 2 * 3 and all(len(f["sample"]) == len(f["encoder_hidden_states"]) == 1 for f in seen)
    assert np.array_equal(seen[0]["ip_tokens"], split.uncond_tokens) and np.array_equal(seen[1]["ip_tokens"], tokens)
    assert np.array_equal(seen[0]["encoder_hidden_states"], split.negative_embeds)
    seen.clear()
    split.denoise(tokens, steps=2, guidance=1.0)          # no guidance: one call per step, as in the normal mode
    assert len(seen) == 2


def test_weights_are_located_in_the_graph_without_the_onnx_package(tiny_bundle, tmp_path):
    """device_weights reads ModelProto.graph.initializer itself: the same names, types, dims and bytes as onnx
    finds, for raw_data inside the file and for external data beside it."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from nsdedge.runtime.device_weights import initializers

    model = onnx.load(str(tiny_bundle / "unet.onnx"))
    want = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type in (1, 10)}
    onnx.save(model, str(tmp_path / "unet.onnx"), save_as_external_data=True, location="unet.onnx.data",
              size_threshold=1024)
    for path in (tiny_bundle / "unet.onnx", tmp_path / "unet.onnx"):
        found = initializers(path)
        assert {w.name for w in found} == set(want)
        for w in found:
            got = np.fromfile(w.file, w.dtype, int(np.prod(w.dims)), offset=w.offset).reshape(w.dims)
            assert got.dtype == want[w.name].dtype and np.array_equal(got, want[w.name]), w.name
        outside = "unet.onnx" if path.parent == tiny_bundle else "unet.onnx.data"    # raw_data inline, or beside
        assert {w.file.name for w in found if w.nbytes >= 1024} == {outside}
    big = initializers(tiny_bundle / "unet.onnx", min_bytes=64 << 10)
    assert big and all(w.nbytes >= 64 << 10 for w in big)


def test_a_weight_block_is_what_onnxruntime_computes_with(tiny_bundle):
    """The block's views replace the graph's own weights (the CPU provider stands in for CUDA: the same DLPack
    views of host memory): the same outputs, and writing the block changes them."""
    ort = pytest.importorskip("onnxruntime")
    from nsdedge.runtime.device_weights import WeightBlock, initializers

    path = tiny_bundle / "vae_decoder.onnx"
    block = WeightBlock(path, "cpu", min_bytes=0)
    assert set(block.values) == {w.name for w in initializers(path)}
    assert block.nbytes >= sum(w.nbytes for w in initializers(path))
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.disable_prepacking", "1")
    block.supply(opts)
    viewed = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    own = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    z = {"latent": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    before = viewed.run(None, z)[0]
    assert np.array_equal(before, own.run(None, z)[0])
    block._host[:] = 0
    assert not np.array_equal(viewed.run(None, z)[0], before)
    del viewed
    block.free()
    assert not block.values


def test_a_truncated_weight_file_is_refused_before_any_copy(tiny_bundle, tmp_path):
    onnx = pytest.importorskip("onnx")
    from nsdedge.runtime.device_weights import WeightBlock

    onnx.save(onnx.load(str(tiny_bundle / "unet.onnx")), str(tmp_path / "unet.onnx"), save_as_external_data=True,
              location="unet.onnx.data", size_threshold=1024)
    data = tmp_path / "unet.onnx.data"
    data.write_bytes(data.read_bytes()[:-4096])
    with pytest.raises(ValueError, match="unet.onnx.data ends before weight"):
        WeightBlock(tmp_path / "unet.onnx", "cpu", min_bytes=0)


def test_a_graph_whose_block_cannot_be_made_loads_its_weights_itself_said_once(tiny_bundle, tmp_path, monkeypatch,
                                                                              caplog):
    """_weight_block (the CUDA path): no block for a graph without weights over the threshold, and where one
    cannot be made (no CUDA runtime here; a damaged file) None and one warning per process, nothing supplied."""
    from nsdedge.runtime import device_weights

    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(ort_session, "_WARNED", set())
    made = []
    real = device_weights.WeightBlock
    monkeypatch.setattr(device_weights, "WeightBlock", lambda path, device, n: made.append(real(path, "cpu", n))
                        or made[-1])
    monkeypatch.setattr(ort_session, "WEIGHT_BLOCK_BYTES", 1 << 30)          # nothing that large: no block
    assert ort_session._weight_block(tiny_bundle / "vae_decoder.onnx", ort.SessionOptions()) is None
    assert made and not made[-1].values
    monkeypatch.setattr(ort_session, "WEIGHT_BLOCK_BYTES", 0)
    block = ort_session._weight_block(tiny_bundle / "vae_decoder.onnx", ort.SessionOptions())
    assert block is made[-1] and block.values
    block.free()
    (tmp_path / "bad.onnx").write_bytes(b"\x0a\xff\xff\xff")                 # a length running past the end
    monkeypatch.setattr(device_weights, "WeightBlock", real)
    with caplog.at_level("WARNING", logger=ort_session.log.name):
        for _ in range(2):
            assert ort_session._weight_block(tmp_path / "bad.onnx", ort.SessionOptions()) is None
    assert len([r for r in caplog.records if "weights one cudaMalloc each" in r.getMessage()]) == 1


def test_the_cuda_defaults_are_the_measured_ones():
    """What benchmarks/results/cuda-h100-lean.json measured as the best (README, benchmarks/README.md)."""
    from nsdedge.runtime import session

    assert ort_session.WEIGHT_BLOCK_BYTES == 1 << 20
    assert ort_session.ARENA_REGION == 384 << 20 and ort_session.ARENA_REGION_FP32 == 896 << 20
    assert session.LOW_MEMORY_CUDA_GRAPH is True and session.LOW_MEMORY_SHARED_ARENA is False


def test_closing_a_session_frees_its_weight_block_after_the_session(tiny_bundle):
    freed = []
    sess = OrtSession(tiny_bundle / "vae_decoder.onnx", "cpu")
    sess._weights = types.SimpleNamespace(free=lambda: freed.append(sess.sess))
    sess.close()
    assert freed == [None] and sess.sess is None              # the session was gone when the block was freed
    held = OrtSession(tiny_bundle / "vae_decoder.onnx", "cpu")
    held._weights = types.SimpleNamespace(free=lambda: freed.append("freed under a live session"))
    keep = held.sess                                          # someone still holds the session: the block stays
    held.close()
    assert freed == [None] and keep is not None


def test_on_a_gpu_provider_the_voxel_decoders_run_on_the_cpu(tiny_bundle, monkeypatch):
    from nsdedge.runtime import session

    cuda_here = session.probe("cuda") is None
    monkeypatch.setattr(session, "resolve", lambda provider: provider)        # as if CUDA and TensorRT started
    for provider in ("cuda", "tensorrt", "engine"):
        dec = session.open_session(tiny_bundle, "decoder-subj01", provider)
        assert dec.provider == "cpu"
        assert dec.run({"voxels": np.zeros((1, 256), np.float32)})["ip_tokens"].shape == (1, 16, 768)
    if not cuda_here:                                                         # the UNet still asks for CUDA
        with pytest.raises(ProviderError, match="onnxruntime could not start CUDAExecutionProvider"):
            session.open_session(tiny_bundle, "unet", "cuda")


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_cuda_sessions_ask_for_the_graph_and_arena_low_memory_is_set_to(tiny_bundle, monkeypatch, graph, shared):
    """The UNet's CUDA graph and the shared arena: always in the normal mode, in low memory as the two switches say;
    the VAE never captures a graph."""
    from nsdedge.runtime import session

    asked = []
    monkeypatch.setattr(session, "resolve", lambda provider: provider)
    monkeypatch.setattr(session, "OrtSession", lambda path, provider, **kw: asked.append(kw) or kw)
    monkeypatch.setattr(session, "_ports_checked", lambda backend, *args: backend)      # (the fake has no graph)
    monkeypatch.setattr(session, "LOW_MEMORY_CUDA_GRAPH", graph)
    monkeypatch.setattr(session, "LOW_MEMORY_SHARED_ARENA", shared)
    for low in (False, True):
        for component in ("unet", "vae_decoder"):
            kw = session.open_session(tiny_bundle, component, "cuda", low_memory=low)
            want_graph = component == "unet" and (not low or graph)
            assert (kw["provider_options"].get("enable_cuda_graph") == "1") == want_graph, (low, component)
            assert kw["shared_arena"] == (not low or shared)
            assert kw["provider_options"]["cudnn_conv_algo_search"] == ("HEURISTIC" if low else "EXHAUSTIVE")
    kw = session.open_session(tiny_bundle, "unet", "cuda", profile="/tmp/x")     # the profiler: node by node
    assert "enable_cuda_graph" not in kw["provider_options"]


def test_the_shared_cuda_arena_region_scales_with_the_latent_and_the_activation_type():
    from nsdedge.runtime.ort_session import ARENA_REGION, ARENA_REGION_FP32, ARENA_REGION_LOW
    from nsdedge.runtime.session import arena_bytes

    for size, precision, want, low in [((64, 64), "fp16", ARENA_REGION, ARENA_REGION_LOW),
                                       ((64, 64), "fp32", ARENA_REGION_FP32, 2 * ARENA_REGION_LOW),
                                       ((96, 96), "fp16", ARENA_REGION * 2.25, ARENA_REGION_LOW * 2.25),
                                       ((8, 8), "int8", ARENA_REGION_FP32 / 64, ARENA_REGION_LOW / 32)]:
        fake = types.SimpleNamespace(latent_size=size, precision=precision)
        assert arena_bytes(fake) == int(want) >> 20 << 20
        assert arena_bytes(fake, low_memory=True) == int(low) >> 20 << 20


def test_the_shared_cuda_arena_takes_one_region_size_capped_and_floored(monkeypatch):
    registered = []
    fake = types.SimpleNamespace(OrtMemoryInfo=lambda *a: a, OrtAllocatorType=types.SimpleNamespace(
        ORT_ARENA_ALLOCATOR=1), OrtMemType=types.SimpleNamespace(DEFAULT=0), OrtArenaCfg=dict,
        create_and_register_allocator_v2=lambda ep, mem, opts, cfg: registered.append(cfg))
    for asked, region in [(None, ort_session.ARENA_REGION), (0, 1 << 20), (5 << 30, ort_session.ARENA_REGION_MAX)]:
        monkeypatch.setattr(ort_session, "_SHARED_ARENA", {})
        assert ort_session.shared_cuda_arena(fake, 0, asked)
        assert ort_session.shared_cuda_arena(fake, 0, 123 << 20)           # once per process: the first size holds
        assert registered.pop() == {"initial_chunk_size_bytes": region, "arena_extend_strategy": 0,
                                    "max_dead_bytes_per_chunk": 1 << 20}
        assert not registered


# -- on a GPU -----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_low_memory_and_cuda_graphs_match_the_cpu(tiny_bundle, tmp_path):
    from nsdedge.runtime.session import probe

    pytest.importorskip("onnxruntime")
    if probe("cuda") is not None:
        pytest.skip(probe("cuda"))
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    cpu = Reconstructor(tiny_bundle, "cpu")(x, steps=4)
    cuda = Reconstructor(tiny_bundle, "cuda")
    assert cuda.session("unet").cuda_graph                 # captured, not silently run node by node
    for _ in range(2):                                     # the second call replays the captured graphs
        assert np.abs(cuda(x, steps=4).astype(int) - cpu.astype(int)).max() <= 3
    lean = Reconstructor(tiny_bundle, "cuda", low_memory=True)(x, steps=4)
    assert np.abs(lean.astype(int) - cpu.astype(int)).max() <= 3


@pytest.mark.gpu
@pytest.mark.parametrize("graph,shared,blocks", [(True, False, 0), (True, True, None), (False, False, None)])
def test_cuda_low_memory_with_or_without_its_graph_and_shared_arena_matches_the_cpu(tiny_bundle, tmp_path,
                                                                                     monkeypatch, graph, shared,
                                                                                     blocks):
    """Each low-memory configuration compare.py measures (graph=, lowshared=, weights=): the CPU's images over two
    chunks of a batch (the second runs on what the first left), the UNet captured where asked (the default: graph,
    own arenas, every weight of the tiny graphs in a block)."""
    from PIL import Image

    from nsdedge.runtime import batch, session

    pytest.importorskip("onnxruntime")
    if session.probe("cuda") is not None:
        pytest.skip(session.probe("cuda"))
    monkeypatch.setattr(session, "LOW_MEMORY_CUDA_GRAPH", graph)
    monkeypatch.setattr(session, "LOW_MEMORY_SHARED_ARENA", shared)
    monkeypatch.setattr(batch, "LOW_MEMORY_CHUNK", 2)
    monkeypatch.setattr(ort_session, "WEIGHT_BLOCK_BYTES", blocks)
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    np.save(tmp_path / "v.npy", x)
    cpu = reconstruct(Reconstructor(tiny_bundle, "cpu"), tmp_path / "v.npy", tmp_path / "cpu", steps=4).written
    lean = Reconstructor(tiny_bundle, "cuda", low_memory=True)
    with lean.keep("unet"):
        lean.denoise(lean.decode(x[:1]), steps=2)
        assert lean.session("unet").cuda_graph == graph
        assert (lean.session("unet")._weights is not None) == (blocks == 0)
    reconstruct(lean, tmp_path / "v.npy", tmp_path / "lean", steps=4)
    assert lean._sessions == {}
    for a, b in zip(cpu, sorted((tmp_path / "lean").glob("*.png")), strict=True):
        assert a.name == b.name
        assert np.abs(np.asarray(Image.open(a)).astype(int) - np.asarray(Image.open(b)).astype(int)).max() <= 3


@pytest.mark.gpu
def test_cuda_weight_blocks_give_the_same_images_and_close_cleanly(tiny_bundle, monkeypatch):
    """Every weight of the tiny bundle in a block (threshold 0): the images without blocks, in the normal mode and
    in the low-memory mode, whose sessions close (and free their blocks) between stages; then a second bundle."""
    import gc

    from nsdedge.runtime.session import probe

    pytest.importorskip("onnxruntime")
    if probe("cuda") is not None:
        pytest.skip(probe("cuda"))
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    monkeypatch.setattr(ort_session, "WEIGHT_BLOCK_BYTES", None)
    plain = Reconstructor(tiny_bundle, "cuda")(x, steps=4).astype(int)
    monkeypatch.setattr(ort_session, "WEIGHT_BLOCK_BYTES", 0)
    rec = Reconstructor(tiny_bundle, "cuda")
    assert np.abs(rec(x, steps=4).astype(int) - plain).max() <= 1
    assert rec.session("unet")._weights is not None and rec.session("unet")._weights.values
    del rec
    gc.collect()
    lean = Reconstructor(tiny_bundle, "cuda", low_memory=True)
    for _ in range(2):
        assert np.abs(lean(x, steps=4).astype(int) - plain).max() <= 3
    assert lean._sessions == {}


# -- --target cuda: onnxruntime's GPU fusions --------------------------------------------------------------------
def _ops(path):
    import onnx

    return [(n.domain, n.op_type) for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.fixture(scope="module")
def gn8_bundle(tmp_path_factory):
    """The tiny preset with 8 groups per group norm (4 and 8 channels per group: onnxruntime's CUDA GroupNorm takes
    an even number; the tiny preset's 32 groups of 32 channels give 1), exported fp32 for onnxruntime."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from nsdedge.export.build import export_bundle
    from nsdedge.export.presets import build_preset

    src = build_preset("tiny")
    torch = pytest.importorskip("torch")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        src.unet = UNet2DConditionModel.from_config({**src.unet.config, "norm_num_groups": 8}).eval()
        src.vae = AutoencoderKL.from_config({**src.vae.config, "norm_num_groups": 8}).eval()
    out = tmp_path_factory.mktemp("gn8") / "fp32"
    export_bundle(src, out)
    return out


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_cuda_target_graphs_fuse_norms_and_convs_and_keep_the_contract(gn8_bundle, tmp_path, precision):
    """What --target cuda writes (the conversion itself; its images can only be checked on a GPU, below): every
    group norm a GroupNorm / SkipGroupNorm, every Conv an NhwcConv, the graph's inputs and outputs unchanged (fp32
    at the edges, as the runtime feeds them), fp16 weights in the fp16 graph, a valid ONNX graph."""
    import onnx

    from nsdedge.export.cuda_graph import to_cuda

    for name, file in (("unet", "unet.onnx"), ("vae_decoder", "vae_decoder.onnx")):
        dst = tmp_path / f"{name}.cuda.onnx"
        files, got = to_cuda(gn8_bundle / file, dst, name, precision)
        assert got == precision and files[0] == dst.name
        before, after = _ops(gn8_bundle / file), _ops(dst)
        assert ("", "Conv") not in after and after.count(("com.microsoft", "NhwcConv")) == before.count(("", "Conv"))
        norms = after.count(("com.microsoft", "GroupNorm")) + after.count(("com.microsoft", "SkipGroupNorm"))
        assert norms >= before.count(("", "InstanceNormalization")) - 1 > 0    # the VAE's attention norm may stay
        model = onnx.load(str(dst))
        onnx.checker.check_model(model)
        src = onnx.load(str(gn8_bundle / file), load_external_data=False)
        assert [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input] == \
            [(i.name, i.type.tensor_type.elem_type) for i in src.graph.input]
        assert [o.name for o in model.graph.output] == [o.name for o in src.graph.output]
        assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
        names = [n.name for n in model.graph.node if n.name]
        assert len(names) == len(set(names))                  # onnxruntime refuses a repeated node name
        big = [t for t in model.graph.initializer if np.prod(t.dims) > 1024]
        want = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
        assert big and all(t.data_type == want for t in big)


def test_cuda_target_refuses_group_norms_the_kernel_cannot_take(tiny_bundle, tmp_path):
    """The tiny preset's 32 groups of 32 channels (one per group): onnxruntime's CUDA GroupNorm would fail at run
    time, so the conversion says so in one line instead (and export says it before tracing)."""
    from nsdedge.errors import NsdedgeError
    from nsdedge.export.cuda_graph import check_group_norms, to_cuda
    from nsdedge.export.presets import build_preset

    with pytest.raises(NsdedgeError, match="32 channels in 32 groups") as e:
        to_cuda(tiny_bundle / "unet.onnx", tmp_path / "u.onnx", "unet", "fp16")
    assert "\n" not in str(e.value) and not (tmp_path / "u.onnx").exists()
    with pytest.raises(NsdedgeError, match="32 channels in 32 groups"):
        check_group_norms("UNet", build_preset("tiny").unet.config)
    sd15 = types.SimpleNamespace(norm_num_groups=32, block_out_channels=(128, 256, 512, 512))      # SD 1.5's VAE
    check_group_norms("VAE", sd15)                                              # 4 to 16 channels per group


def test_cuda_target_is_refused_where_cuda_does_not_start_and_a_cuda_bundle_runs_on_cuda_only(tiny_bundle, tmp_path,
                                                                                              trial):
    """No GPU here: the export is refused in one line before any work (its fidelity is measured on CUDA) and
    nothing is written; a bundle whose manifest says target cuda refuses the CPU in one line."""
    import json
    import shutil

    from nsdedge.errors import NsdedgeError
    from nsdedge.export.build import check_options

    for source in (["--from-bundle", str(tiny_bundle)], ["--preset", "tiny"]):
        r = run_cli("export", *source, "--target", "cuda", "--precision", "fp16", "--out", str(tmp_path / "cu"))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "--target cuda" in r.stderr and "CUDAExecutionProvider" in r.stderr and not (tmp_path / "cu").exists()
    with pytest.raises(NsdedgeError, match="fp16 or fp32"):
        check_options("int8", "cuda")
    fake = tmp_path / "fake-cuda"
    shutil.copytree(tiny_bundle, fake)
    m = json.loads((fake / "manifest.json").read_text())
    m["target"] = "cuda"
    (fake / "manifest.json").write_text(json.dumps(m))
    assert "runs on onnxruntime's CUDA provider only" in run_cli("info", str(fake)).stdout
    for provider in ("cpu", "auto"):
        r = run_cli("run", "--bundle", str(fake), "--voxels", str(trial), "--out", str(tmp_path / f"o-{provider}.png"),
                    "--provider", provider, "--no-verify", "--steps", "2")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "--target cuda" in r.stderr and not (tmp_path / f"o-{provider}.png").exists()


@pytest.mark.gpu
def test_cuda_target_bundle_matches_the_portable_one_on_cuda(gn8_bundle, tmp_path):
    """On a GPU: the fused fp16 bundle makes the images of the portable fp16 bundle (within fp16 rounding), with
    CUDA graphs captured, in the normal and the low-memory mode; its fidelity report was measured."""
    from nsdedge.bundle import read_manifest
    from nsdedge.runtime.session import probe
    from tests.conftest import derived

    if probe("cuda") is not None:
        pytest.skip(probe("cuda"))
    cu = derived(gn8_bundle, tmp_path / "cu16", "fp16", target="cuda")
    plain = derived(gn8_bundle, tmp_path / "fp16", "fp16")
    f = read_manifest(cu).extra["fidelity"]
    assert f["target"] == "cuda" and min(f["psnr_db"]) > 30
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    ref = Reconstructor(plain, "cuda")(x, steps=4)
    fused = Reconstructor(cu, "auto")
    assert fused.provider == "cuda"
    out = fused(x, steps=4)
    assert fused.session("unet").cuda_graph                 # captured, not silently run node by node
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 3
    lean = Reconstructor(cu, "cuda", low_memory=True)(x, steps=4)
    assert np.abs(lean.astype(int) - ref.astype(int)).max() <= 3
