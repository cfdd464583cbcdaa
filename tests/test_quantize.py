"""fp16 and int8 bundles: smaller, faithful to fp32 (thresholds a broken quantization fails), reported."""

import numpy as np
import pytest

from nsdedge.bundle import read_manifest
from nsdedge.errors import NsdedgeError
from nsdedge.runtime import Reconstructor
from tests.conftest import derived, run_cli

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_bundle):
    """fp16 exported from the preset (export's own path: trace, then convert); int8 with each op set converted from
    the exported fp32 tiny bundle (export --from-bundle: the same conversion, no second trace)."""
    from nsdedge.export.build import export_bundle
    from nsdedge.export.presets import build_preset

    root = tmp_path_factory.mktemp("q")
    export_bundle(build_preset("tiny"), root / "fp16", precision="fp16")
    return {"fp16": root / "fp16", "int8": derived(tiny_bundle, root / "int8", "int8"),
            "int8conv": derived(tiny_bundle, root / "int8conv", "int8", int8_ops="matmul+conv")}


def _size(bundle, comp):
    m = read_manifest(bundle, verify=False)
    c = m.components[comp]
    return sum(m.files[f]["size"] for f in [c.file, *c.data_files])


def test_fp16_bundle(bundles, tiny_bundle):
    m = read_manifest(bundles["fp16"])
    assert m.precision == "fp16"
    assert {c.precision for n, c in m.components.items() if n != "vae_decoder_fp32"} == {"fp16"}
    assert m.components["vae_decoder_fp32"].precision == "fp32"
    assert _size(bundles["fp16"], "unet") < 0.7 * _size(tiny_bundle, "unet")
    f = m.extra["fidelity"]
    assert min(f["psnr_db"]) >= 40 and min(f["ssim"]) > 0.99
    assert 0.95 < f["cfg_spread_ratio"] < 1.05
    assert f["component_rel_l2"]["unet"] < 1e-2
    # the runtime feeds float32 and reads float32: inputs and outputs kept their types
    assert {i["dtype"] for i in m.components["unet"].inputs} == {"float32"}


def test_int8_bundle(bundles, tiny_bundle):
    m = read_manifest(bundles["int8"])
    assert m.components["unet"].precision == "int8" and m.components["vae_decoder"].precision == "fp32"
    # tiny: the float K/V projections of the 768-wide tokens weigh a lot here (full size: 0.28x, README)
    assert _size(bundles["int8"], "unet") < 0.75 * _size(tiny_bundle, "unet")       # MatMuls and conv weights
    assert _size(bundles["int8conv"], "unet") < 0.75 * _size(tiny_bundle, "unet")
    assert _size(bundles["int8"], "decoder-subj01") < 0.35 * _size(tiny_bundle, "decoder-subj01")
    assert read_manifest(bundles["int8"]).extra["converted_from"]["manifest_sha256"] == read_manifest(tiny_bundle).sha256
    f = m.extra["fidelity"]
    assert 1e-4 < f["component_rel_l2"]["unet"] < 0.1         # quantized, and not broken
    assert min(f["psnr_db"]) >= 30
    assert f["cfg_spread_ratio"] >= 0.9
    import onnx
    ops = {n.op_type for n in onnx.load(str(bundles["int8"] / m.components["unet"].file)).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear", "DequantizeLinear"} <= ops and "ConvInteger" not in ops
    assert m.extra["fidelity"]["int8_ops"] == ["MatMul", "ConvWeights"]
    # conv weights are int8 initializers dequantized per output channel; conv_in / conv_out keep float weights
    g = onnx.load(str(bundles["int8"] / m.components["unet"].file)).graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    for n in (n for n in g.node if n.op_type == "Conv"):
        w = n.input[1]
        if "conv_in." in w or "conv_out." in w:
            assert inits[w].data_type == onnx.TensorProto.FLOAT, n.name
        else:
            dq = producer[w]
            assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == onnx.TensorProto.INT8
            assert inits[dq.input[1]].dims[0] > 1                                     # per output channel
    mc = read_manifest(bundles["int8conv"])
    ops = {n.op_type for n in onnx.load(str(bundles["int8conv"] / mc.components["unet"].file)).graph.node}
    assert "ConvInteger" in ops
    fc = mc.extra["fidelity"]
    assert min(fc["psnr_db"]) >= 30 and fc["cfg_spread_ratio"] >= 0.9


def test_conditioning_and_time_embedding_stay_float(bundles):
    import onnx
    m = read_manifest(bundles["int8conv"], verify=False)
    g = onnx.load(str(bundles["int8conv"] / m.components["unet"].file)).graph
    for n in g.node:
        if ("ip_tokens" in n.input or "encoder_hidden_states" in n.input) and n.op_type != "Shape":
            assert n.op_type == "MatMul", n.name
        if any("conv_in." in i or "conv_out." in i for i in n.input):
            assert n.op_type == "Conv", n.name


def test_quantized_bundles_run_and_info_reports(bundles):
    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    for b in bundles.values():
        img = Reconstructor(b, "cpu")(x, steps=3)
        assert img.shape == (1, 64, 64, 3)
    r = run_cli("info", str(bundles["int8"]))
    assert r.returncode == 0 and "spread ratio" in r.stdout and "PSNR" in r.stdout


def test_fp16_vae_overflow_falls_back_to_fp32(bundles, caplog):
    rec = Reconstructor(bundles["fp16"], "cpu")
    huge = np.full((1, 4, 32, 32), 3e4, np.float32)        # scaled by 1/0.18215: beyond fp16's range
    with caplog.at_level("WARNING"):
        img = rec.decode_latents(huge)
    assert img.shape == (1, 64, 64, 3)
    assert "decoding it again in fp32" in caplog.text
    del rec.manifest.components["vae_decoder_fp32"]
    with pytest.raises(NsdedgeError, match="no fp32 VAE"):
        rec.decode_latents(huge)


def test_calibrate_command(tiny_bundle, tmp_path):
    from nsdedge.calibration import load_calibration

    np.save(tmp_path / "v.npy", np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32))
    r = run_cli("calibrate", "--bundle", str(tiny_bundle), "--voxels", str(tmp_path / "v.npy"), "--steps", "3",
                "--out", str(tmp_path / "c.npz"))
    assert r.returncode == 0, r.stderr
    c = load_calibration(tmp_path / "c.npz")
    assert c["unet"]["sample"].shape == (6, 2, 4, 32, 32)          # 2 trials x 3 steps, both CFG halves
    assert c["unet"]["noise_pred"].shape == (6, 2, 4, 32, 32)
    assert c["decoder-subj01"]["voxels"].shape == (1, 2, 256)          # one call for both trials
    assert c["vae_decoder"]["latent"].shape == (2, 1, 4, 32, 32)


@pytest.fixture(scope="module")
def trt_int8(tmp_path_factory, tiny_trt_bundle):
    root = tmp_path_factory.mktemp("trt")
    vox = root / "calib.npy"
    np.save(vox, np.random.default_rng(5).standard_normal((5, 256)).astype(np.float32))  # 3 calibrate, 2 held out
    return derived(tiny_trt_bundle, root / "b", "int8", target="tensorrt", calibration_voxels=vox)


def test_tensorrt_int8_is_static_qdq_from_calibration(trt_int8, tiny_bundle):
    import onnx
    from onnx import numpy_helper

    m = read_manifest(trt_int8)
    assert m.extra["target"] == "tensorrt" and m.components["unet"].precision == "int8"
    f = m.extra["fidelity"]
    assert f["target"] == "tensorrt" and f["int8_scheme"].startswith("static QDQ")
    assert f["calibration_calls"]["unet"] == 3 * 10                  # 3 trials x 10 steps, batch 2 each
    assert min(f["psnr_db"]) >= 30 and f["cfg_spread_ratio"] >= 0.9
    # static per-tensor activations on the tiny random UNet's convs: 0.12 measured (MatMuls alone 0.017)
    assert 1e-3 < f["component_rel_l2"]["unet"] < 0.2
    g = onnx.load(str(trt_int8 / m.components["unet"].file)).graph
    ops = {n.op_type for n in g.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert not ops & {"MatMulInteger", "DynamicQuantizeLinear", "ConvInteger"}   # explicit, not dynamic
    assert "MultiHeadAttention" not in ops and m.extra["fused_attention"] is False   # TensorRT parses standard ops
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    per_channel = symmetric = 0
    for n in g.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits:
            zp = numpy_helper.to_array(inits[n.input[2]])
            assert zp.dtype == np.int8 and not zp.any()                # symmetric int8 activations
            symmetric += 1
        if n.op_type == "Conv":
            w = producer.get(n.input[1])
            name_has = lambda frag: frag in n.input[1] or (w is not None and any(frag in i for i in w.input))  # noqa: E731
            if name_has("conv_in.") or name_has("conv_out."):
                assert w is None or w.op_type != "DequantizeLinear", n.name      # kept in float
            elif w is not None and w.op_type == "DequantizeLinear":
                scale = numpy_helper.to_array(inits[w.input[1]])
                assert scale.ndim == 1 and scale.shape[0] > 1                  # per output channel
                per_channel += 1
    assert per_channel > 0 and symmetric > 0
    img = Reconstructor(trt_int8, "cpu")(np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32),
                                          steps=3)
    assert img.shape == (1, 64, 64, 3)


def test_tensorrt_int8_needs_calibration(tmp_path):
    r = run_cli("export", "--preset", "tiny", "--precision", "int8", "--target", "tensorrt", "--out",
                str(tmp_path / "b"))
    assert r.returncode == 2 and "calibration" in r.stderr and not (tmp_path / "b").exists()
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    for f, message in (("junk.npz", "not a readable calibration"), ("other.npz", "holds no UNet inputs")):
        r = run_cli("export", "--preset", "tiny", "--precision", "int8", "--target", "tensorrt", "--calibration",
                    str(tmp_path / f), "--out", str(tmp_path / "b"))
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "b").exists()


def test_tensorrt_int8_from_recorded_calibration_file(tiny_bundle, tiny_trt_bundle, tmp_path):
    """`nsdedge calibrate` output is reused by export --calibration. It was recorded on the tiny bundle (same
    UNet and VAE as the preset) whose subject is subj01: the preset's decoder synth01 has no calibration inputs
    and stays fp32 rather than being quantized blind."""
    np.save(tmp_path / "v.npy", np.random.default_rng(1).standard_normal((2, 256)).astype(np.float32))
    r = run_cli("calibrate", "--bundle", str(tiny_bundle), "--voxels", str(tmp_path / "v.npy"), "--steps", "3",
                "--out", str(tmp_path / "c.npz"))
    assert r.returncode == 0, r.stderr
    r = run_cli("export", "--from-bundle", str(tiny_trt_bundle), "--precision", "int8", "--target", "tensorrt",
                "--calibration", str(tmp_path / "c.npz"), "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    m = read_manifest(tmp_path / "b")
    f = m.extra["fidelity"]
    assert f["calibration_calls"]["unet"] == 6 and "decoder-synth01" not in f["calibration_calls"]
    assert m.components["unet"].precision == "int8" and m.components["decoder-synth01"].precision == "fp32"
    assert f["cfg_spread_ratio"] >= 0.9
