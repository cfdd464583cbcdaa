"""OpenVINO: `--target openvino` bundles (IR, fp32 / bf16 / int8 weights) and `--provider openvino` behind the one
seam, on the tiny preset."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from nsdedge.bundle import read_manifest
from nsdedge.errors import ProviderError
from nsdedge.runtime import Reconstructor
from tests.conftest import derived, run_cli

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def ov_bundles(tmp_path_factory, tiny_bundle):
    """The tiny preset exported for OpenVINO (fp32 and int8); `onnx`: the same weights exported for onnxruntime."""
    root = tmp_path_factory.mktemp("openvino")
    out = {"onnx": tiny_bundle}
    # fp32 exported for OpenVINO (standard attention ops); int8 converted from the exported fp32 ONNX bundle
    for name, args in {"ov-fp32": ["--preset", "tiny", "--target", "openvino"],
                       "ov-int8": ["--from-bundle", str(tiny_bundle), "--target", "openvino", "--precision",
                                   "int8"]}.items():
        r = run_cli("export", *args, "--out", str(root / name))
        assert r.returncode == 0, r.stderr
        out[name] = root / name
    return out


def voxels(n=1):
    return np.random.default_rng(5).standard_normal((n, 256)).astype(np.float32)


def test_openvino_fp32_bundle_matches_onnxruntime(ov_bundles):
    m = read_manifest(ov_bundles["ov-fp32"])
    assert m.extra["target"] == "openvino" and not m.extra["fused_attention"]      # standard ops, IR files
    assert all(c.file.endswith(".xml") and c.data_files == [c.file[:-4] + ".bin"] for c in m.components.values())
    ov = Reconstructor(ov_bundles["ov-fp32"])                                      # auto: openvino
    assert ov.provider == "openvino"
    a = ov(voxels(2), steps=4)
    b = Reconstructor(ov_bundles["onnx"], "cpu")(voxels(2), steps=4)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    # an ONNX bundle runs on OpenVINO too (it reads onnxruntime's MultiHeadAttention)
    c = Reconstructor(ov_bundles["onnx"], "openvino")(voxels(2), steps=4)
    assert np.abs(c.astype(int) - b.astype(int)).max() <= 2


def test_openvino_int8_keeps_fidelity(ov_bundles):
    m = read_manifest(ov_bundles["ov-int8"])
    f = m.extra["fidelity"]
    assert m.precision == "int8" and m.components["unet"].precision == "int8"
    assert m.components["vae_decoder"].precision == "fp32"                         # the VAE keeps its weights
    assert min(f["psnr_db"]) >= 25 and f["cfg_spread_ratio"] >= 0.9 and "NNCF" in f["int8_scheme"]
    assert f["int8_recipe"] == "weights"                                           # auto without calibration data
    unet = m.components["unet"]
    fp32 = read_manifest(ov_bundles["ov-fp32"]).components["unet"]
    assert m.files[unet.data_files[0]]["size"] < 0.5 * read_manifest(ov_bundles["ov-fp32"]).files[
        fp32.data_files[0]]["size"]                                                # int8 weights on disk
    img = Reconstructor(ov_bundles["ov-int8"])(voxels(), steps=4)
    ref = Reconstructor(ov_bundles["ov-fp32"])(voxels(), steps=4)
    assert np.abs(img.astype(int) - ref.astype(int)).mean() < 8


def test_bf16_is_an_explicit_choice(ov_bundles, tmp_path, monkeypatch):
    from nsdedge.runtime import ov_session

    if ov_session.bf16_supported():
        m = read_manifest(derived(ov_bundles["onnx"], tmp_path / "bf16", "bf16", target="openvino"))
        assert m.components["unet"].precision == "bf16" and min(m.extra["fidelity"]["psnr_db"]) >= 25
        rec = Reconstructor(tmp_path / "bf16")
        assert rec.session("unet").hint == "bf16"
        # int8 computed in bf16 (--compute bf16): int8 graphs marked, the VAE as a bf16 bundle stores it, and the
        # fidelity measured as it computes
        r = run_cli("export", "--from-bundle", str(ov_bundles["onnx"]), "--target", "openvino", "--precision",
                    "int8", "--compute", "bf16", "--out", str(tmp_path / "int8-bf16"))
        assert r.returncode == 0, r.stderr
        m = read_manifest(tmp_path / "int8-bf16")
        c = m.components
        assert (c["unet"].precision, c["unet"].extra["compute"]) == ("int8", "bf16")
        assert c["vae_decoder"].precision == "bf16" and "compute" not in c["vae_decoder"].extra
        f = m.extra["fidelity"]
        assert f["compute"] == "bf16" and "computed in bf16" in f["int8_scheme"]
        assert min(f["psnr_db"]) >= 25 and f["cfg_spread_ratio"] >= 0.9
        rec = Reconstructor(tmp_path / "int8-bf16")
        assert {rec.session(n).hint for n in c} == {"bf16"}
        info = run_cli("info", str(tmp_path / "int8-bf16")).stdout
        assert "computing in: " in info and "unet bf16" in info
    # fp32 and int8 bundles never compute in bf16 behind the user's back (the plugin's default on such CPUs)
    assert Reconstructor(ov_bundles["ov-fp32"]).session("unet").hint == "f32"
    assert Reconstructor(ov_bundles["ov-int8"]).session("unet").hint == "f32"
    # a CPU without bf16: a bf16 component is refused in one line, not run in f32
    monkeypatch.setattr(ov_session, "bf16_supported", lambda: False)
    with pytest.raises(ProviderError, match="this CPU has no bf16"):
        ov_session.check_precision("bf16")
    with pytest.raises(ProviderError, match="this CPU has no bf16"):
        ov_session.check_precision("int8", "bf16")


def test_bad_combinations_and_missing_openvino_are_one_line_errors(ov_bundles, tmp_path, trial):
    r = run_cli("export", "--preset", "tiny", "--precision", "bf16", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "bf16 is for --target openvino" in r.stderr and not (tmp_path / "x").exists()
    for args in (["--precision", "int8", "--compute", "bf16"],                           # not openvino
                 ["--target", "openvino", "--compute", "bf16"],                          # fp32: --precision bf16
                 ["--target", "openvino", "--precision", "bf16", "--compute", "f32"]):
        r = run_cli("export", "--from-bundle", str(ov_bundles["onnx"]), *args, "--out", str(tmp_path / "x"))
        assert r.returncode == 2 and "--compute" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "x").exists()
    r = run_cli("run", "--voxels", str(trial), "--bundle", str(ov_bundles["ov-fp32"]), "--provider", "cpu",
                "--out", str(tmp_path / "y.png"))
    assert r.returncode == 2 and "run it with --provider openvino" in r.stderr and not (tmp_path / "y.png").exists()
    blocked = ("import sys; sys.modules['openvino'] = None; from nsdedge.cli import main; "
               f"sys.argv = ['nsdedge', 'run', '--voxels', {str(trial)!r}, '--bundle', "
               f"{str(ov_bundles['ov-fp32'])!r}, '--out', {str(tmp_path / 'z.png')!r}]; main()")
    p = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip() == "error: OpenVINO is not installed: pip install 'nsdedge[openvino]'"
    assert not (tmp_path / "z.png").exists()


def test_openvino_runtime_runs_without_torch(ov_bundles, tmp_path, trial):
    code = ("import sys\n"
            "for m in ('torch', 'diffusers', 'transformers', 'nncf', 'nsdedge.export'): sys.modules[m] = None\n"
            "from nsdedge.runtime.batch import reconstruct\n"
            f"r = reconstruct({str(ov_bundles['ov-int8'])!r}, {str(trial)!r}, {str(tmp_path / 'out')!r}, steps=2)\n"
            "print(r.provider, len(r.written))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["openvino", "1"]
    record = json.loads((tmp_path / "out" / "nsdedge-run.json").read_text())
    assert record["key"]["provider"] == "openvino"


def test_full_int8_recipe_from_recorded_calibration(tiny_bundle, tmp_path):
    """The UNet's activations quantized by NNCF from the pipeline's own recorded inputs (every step, both guidance
    halves); refused without calibration data, and a broken calibration file is one line."""
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32))
    out = tmp_path / "full"
    r = run_cli("export", "--from-bundle", str(tiny_bundle), "--target", "openvino", "--precision", "int8",
                "--calibration-voxels", str(tmp_path / "calib.npy"), "--out", str(out))   # auto: full, calibrated
    assert r.returncode == 0, r.stderr
    f = read_manifest(out).extra["fidelity"]
    assert f["int8_recipe"] == "full"
    assert f["calibration_calls"]["unet"] == 2 * 10 and "activations" in f["int8_scheme"]   # 2 fit trials x 10 steps
    assert min(f["psnr_db"]) >= 25 and f["cfg_spread_ratio"] >= 0.9
    assert Reconstructor(out)(voxels(), steps=2).shape == (1, 64, 64, 3)
    for args, says in ((["--int8-recipe", "full"], "need calibration data"),
                       (["--int8-recipe", "full", "--calibration", str(tmp_path / "calib.npy")], "error: ")):
        r = run_cli("export", "--preset", "tiny", "--target", "openvino", "--precision", "int8", *args,
                    "--out", str(tmp_path / "refused"))
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "refused").exists()


def test_bad_calibration_data_is_refused_before_any_conversion(tiny_bundle, tmp_path):
    """A recorded calibration file that cannot feed the bundle's graphs, or calibration trials of no subject's voxel
    count, is a one-line error naming the file before NNCF (or anything else) runs, and no bundle is left; what
    `nsdedge calibrate` records passes."""
    from nsdedge.calibration import load_calibration, record_calibration
    from nsdedge.errors import InputError
    from nsdedge.export.quantize import check_records

    rec = Reconstructor(tiny_bundle, "cpu")
    good = tmp_path / "good.npz"
    record_calibration(rec, np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32), steps=2).save(good)
    data = load_calibration(good)
    check_records(good, rec.manifest, data)

    def nan_sample(u):
        u["sample"] = u["sample"].copy()
        u["sample"][0, 0, 0, 0, 0] = np.nan

    def without_ip_tokens(u):
        u.pop("ip_tokens")
        u.pop("ip_tokens@calls", None)

    cases = {"missing": (without_ip_tokens, "calls lack ip_tokens"),
             "extra": (lambda u: u.update(mask=u["sample"]), "hold mask, not inputs of the graph"),
             "shape": (lambda u: u.update(encoder_hidden_states=u["encoder_hidden_states"][..., :512]),
                       "encoder_hidden_states calls are (2, 77, 512); the graph takes (batch, 77, 768)"),
             "calls": (lambda u: u.update(sample=u["sample"][:-1]), "different numbers of calls"),
             "nan": (nan_sample, "unet/sample is not finite")}
    for name, (change, says) in cases.items():
        arrays = {c: dict(a) for c, a in data.items()}
        change(arrays["unet"])
        bad = tmp_path / f"{name}.npz"
        np.savez(bad, **{f"{c}/{n}": v for c, a in arrays.items() for n, v in a.items()})
        with pytest.raises(InputError, match=f"{bad}: .*{says}".replace("(", r"\(").replace(")", r"\)")):
            derived(tiny_bundle, tmp_path / "refused", "int8", target="openvino", int8_recipe="full", calibration=bad)
        assert not (tmp_path / "refused").exists()
    r = run_cli("export", "--from-bundle", str(tiny_bundle), "--target", "openvino", "--precision", "int8",
                "--calibration", str(bad), "--out", str(tmp_path / "refused"))
    last = r.stderr.strip().splitlines()[-1]                      # (after the progress lines: one error line)
    assert r.returncode == 2 and last.startswith(f"error: {bad}: ") and "Traceback" not in r.stderr, r.stderr
    np.save(tmp_path / "v100.npy", np.zeros((3, 100), np.float32))
    with pytest.raises(InputError, match="v100.npy: trials of 100 voxels; the bundle's subjects take subj01 256"):
        derived(tiny_bundle, tmp_path / "refused", "int8", target="openvino", calibration_voxels=tmp_path / "v100.npy")
    r = run_cli("export", "--preset", "tiny", "--target", "openvino", "--precision", "int8", "--calibration-voxels",
                str(tmp_path / "v100.npy"), "--out", str(tmp_path / "refused"))     # before minutes of tracing
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'v100.npy'}: trials of 100 voxels; the bundle's subjects take synth01 256"), r.stderr
    assert "parity check" not in r.stderr and not (tmp_path / "refused").exists()


def test_an_ir_that_is_off_its_onnx_graph_fails_the_export(tiny_bundle, tmp_path, monkeypatch):
    """The fp32 IR is checked against the fp32 ONNX graph like any export: OpenVINO misreading a graph (played by
    the VAE's largest weight scaled on its way to the IR) fails the export and leaves no bundle."""
    import openvino

    from nsdedge.errors import ParityError

    real = openvino.save_model

    def misread(model, path, **kw):
        if str(path).endswith("vae_decoder.xml"):
            weights = [op for op in model.get_ops() if op.get_type_name() == "Constant" and
                       op.get_element_type() == openvino.Type.f32]
            w = max(weights, key=lambda op: int(np.prod(op.get_output_shape(0))))
            w.output(0).replace(openvino.op.Constant(w.get_data() * 1.5).output(0))
        return real(model, path, **kw)

    monkeypatch.setattr(openvino, "save_model", misread)
    with pytest.raises(ParityError, match="vae_decoder: the OpenVINO IR is off the fp32 ONNX graph"):
        derived(tiny_bundle, tmp_path / "ov", "fp32", target="openvino")
    assert not (tmp_path / "ov").exists()
    monkeypatch.setattr(openvino, "save_model", real)
    assert read_manifest(derived(tiny_bundle, tmp_path / "ov", "fp32", target="openvino")).components[
        "vae_decoder"].parity["fp32_vs_fp32"] < 1e-4


@pytest.mark.slow           # (a second NNCF calibration: kept out of the default run for its time)
def test_hybrid_int8_recipe_from_recorded_calibration(tiny_bundle, tmp_path):
    """hybrid (optimum-intel's): int8-weight MatMuls, the rest quantized from the same calibration."""
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32))
    hybrid = derived(tiny_bundle, tmp_path / "hybrid", "int8", target="openvino", int8_recipe="hybrid",
                     calibration_voxels=tmp_path / "calib.npy")
    h = read_manifest(hybrid).extra["fidelity"]
    assert h["int8_recipe"] == "hybrid" and "hybrid" in h["int8_scheme"]
    assert min(h["psnr_db"]) >= 25 and h["cfg_spread_ratio"] >= 0.9
    from nsdedge.runtime.ov_session import core

    ops = core().read_model(str(hybrid / "unet.xml")).get_ordered_ops()
    assert any(op.get_type_name() == "FakeQuantize" for op in ops)                     # activations quantized
    assert any(op.get_type_name() == "Constant" and op.get_element_type().get_type_name() in ("i8", "u8")
               for op in ops)                                                          # int8 weights


def test_a_graph_openvino_cannot_read_is_one_provider_error(tmp_path):
    from nsdedge.runtime.ov_session import OvSession

    (tmp_path / "unet.xml").write_text("<net name='broken'><layers><layer id='0' type='Nonsense'/></layers></net>")
    with pytest.raises(ProviderError, match="unet.xml: OpenVINO could not read") as e:
        OvSession(tmp_path / "unet.xml")
    assert "\n" not in str(e.value)


def test_a_graph_that_fails_while_it_runs_is_one_provider_error(ov_bundles, monkeypatch):
    """OpenVINO's errors at inference (e.g. memory) are one ProviderError line naming the graph, as at read and
    compile; inputs left out or not the graph's are refused, not filled from the previous call."""
    from nsdedge.runtime.ov_session import OvSession

    s = OvSession(ov_bundles["ov-fp32"] / "vae_decoder.xml")

    class Failing:                                  # a request whose inference fails as OpenVINO's do
        def infer(self, feeds):
            raise RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp:223:\nstd::bad_alloc\n")

    for feeds in ({}, {"latent": np.zeros((1, 4, 8, 8), np.float32), "mask": np.zeros(3, np.float32)}):
        with pytest.raises(ProviderError, match="vae_decoder.xml takes latent; given "):   # not the last call's input
            s.run(feeds)
    monkeypatch.setattr(s, "_request", lambda shapes: Failing())
    with pytest.raises(ProviderError, match=r"vae_decoder.xml: OpenVINO could not run it \(Exception from") as e:
        s.run({"latent": np.zeros((1, 4, 8, 8), np.float32)})
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_compiled_graphs_give_back_their_mapped_weights(ov_bundles):
    from nsdedge.runtime.ov_session import release_pages

    rec = Reconstructor(ov_bundles["ov-fp32"])
    a = rec(voxels(), steps=2)
    assert release_pages(ov_bundles["ov-fp32"] / "unet.xml") >= 1      # the IR's weights are still mapped, read-only
    assert release_pages(ov_bundles["ov-fp32"] / "missing.xml") == 0
    assert np.array_equal(rec(voxels(), steps=2), a)                   # and read back when needed: same image


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_compile_releases_the_ir_pages_while_it_compiles(ov_bundles, monkeypatch):
    """Compiling reads the whole mapped IR: its pages leave the process's RSS as compile goes (peak = repacked
    weights plus about one interval's pages), not only once it is done."""
    import time

    from nsdedge.runtime import ov_session

    real, calls, compiling = ov_session.core(), [], []

    class SlowCore:                                 # a compile that takes a while, with the real one inside it
        def read_model(self, path):
            return real.read_model(path)

        def compile_model(self, *args):
            compiling.append(time.monotonic())
            compiled = real.compile_model(*args)
            time.sleep(0.2)
            compiling.append(time.monotonic())
            return compiled

    def release_pages(path):
        calls.append((time.monotonic(), path))
        return 1

    monkeypatch.setattr(ov_session, "core", SlowCore)
    monkeypatch.setattr(ov_session, "release_pages", release_pages)
    monkeypatch.setattr(ov_session, "RELEASE_EVERY", 0.02)
    s = ov_session.OvSession(ov_bundles["ov-fp32"] / "vae_decoder.xml")
    shape = (1, 4, *read_manifest(ov_bundles["ov-fp32"]).latent_size)
    s.run({"latent": np.zeros(shape, np.float32)})
    start, end = compiling
    during = [t for t, p in calls if start < t < end]
    assert len(during) >= 3 and {p for _, p in calls} == {s.path}
    assert calls[-1][0] >= end                                      # and once more when it is done
    n = len(calls)
    s.run({"latent": np.ones(shape, np.float32)})                   # compiled already: nothing more
    assert len(calls) == n

    calls.clear()
    with ov_session.releasing_pages(s.path, every=None):          # no helper: only the final release
        time.sleep(0.05)
    assert len(calls) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_only_shared_read_only_mappings_of_the_graph_are_released(tmp_path):
    import mmap

    from nsdedge.runtime.ov_session import release_pages

    data = np.arange(1 << 18, dtype=np.float32)
    (tmp_path / "g.bin").write_bytes(data.tobytes())
    (tmp_path / "other.bin").write_bytes(data.tobytes())
    with open(tmp_path / "g.bin", "rb") as f, open(tmp_path / "other.bin", "rb") as o:
        private = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)   # r--p: could hide writes
        other = mmap.mmap(o.fileno(), 0, access=mmap.ACCESS_READ)                         # another graph's file
        assert np.frombuffer(private, np.float32).sum() == data.sum()
        assert release_pages(tmp_path / "g.xml") == 0
        shared = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)                        # r--s, as OpenVINO maps
        assert np.frombuffer(shared, np.float32).sum() == data.sum()
        assert release_pages(tmp_path / "g.xml") == 1
        assert np.array_equal(np.frombuffer(shared, np.float32), data)                   # read back: the file's
        for m in (private, other, shared):
            m.close()
