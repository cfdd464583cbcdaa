"""The defects of the code review in issue 13, one test (or a few) each; every one failed before its fix."""

import json
import logging
import os
import shutil
import tempfile
import time

import numpy as np
import pytest

from nsdedge.bundle import BundleWriter, read_manifest
from nsdedge.errors import BundleError
from tests.conftest import one_line_error as _one_line_error
from tests.conftest import run_cli


def _tree(path):
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None) for p in path.rglob("*"))


# 1. --force replaces only an nsdedge bundle -----------------------------------------------------------------
def test_force_never_replaces_what_is_not_a_bundle(tmp_path, tiny_bundle):
    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)
    (work / "notes" / "a.txt").write_text("keep me")
    (work / "data.npy").write_bytes(b"x")
    before = _tree(work)
    r = run_cli("export", "--preset", "tiny", "--force", "--out", ".", cwd=work)
    _one_line_error(r, "not an nsdedge bundle")
    r = run_cli("export", "--preset", "tiny", "--force", "--out", str(work / "notes"))
    _one_line_error(r, "not an nsdedge bundle")
    assert _tree(work) == before
    # the library refuses too, and a bundle holding files nsdedge did not write is not replaced either
    with pytest.raises(BundleError, match="not an nsdedge bundle"):
        BundleWriter(work, force=True)
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    (copy / "my-notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="my-notes.txt"):
        BundleWriter(copy, force=True)
    assert _tree(work) == before and (copy / "my-notes.txt").is_file()


def test_force_replaces_a_bundle(tmp_path, tiny_bundle):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    (copy / "engines").mkdir()                          # what build-engines writes counts as the bundle's
    with BundleWriter(copy, force=True) as w:
        (w.tmp / "constants.npz").write_bytes((copy / "constants.npz").read_bytes())
        m = read_manifest(copy, verify=False)
        m.components = {}
        w.commit(m)
    assert sorted(p.name for p in copy.iterdir()) == ["constants.npz", "manifest.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]          # no temporary left behind


# 2. run validates every setting before writing anything; voxels are read before the bundle -------------------
@pytest.mark.parametrize("flag,value", [("--ip-scale", "nan"), ("--guidance", "inf"), ("--seed", "-1"),
                                        ("--steps", "1000")])
def test_bad_settings_leave_nothing_behind(tiny_bundle, trial, tmp_path, flag, value):
    out = tmp_path / "out"
    r = run_cli("run", "--voxels", str(trial), "--bundle", str(tiny_bundle), *(["--steps", "2"] * (flag != "--steps")),
                flag, value, "--out", str(out))
    _one_line_error(r)
    assert not out.exists()
    r = run_cli("run", "--voxels", str(trial), "--bundle", str(tiny_bundle), "--steps", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr                  # the corrected rerun is not refused
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "nsdedge-run.json"]


def test_voxels_are_read_before_the_bundle(tmp_path):
    (tmp_path / "bad.npy").write_text("not numpy")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = run_cli("run", "--voxels", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "o"), env=env)
    _one_line_error(r, "bad.npy")
    assert not (tmp_path / "cache").exists()            # the default bundle was not built for nothing
    r = run_cli("run", "--voxels", str(tmp_path / "bad.npy"), "--bundle", str(tmp_path / "nope"))
    _one_line_error(r, "bad.npy")                       # not "bundle directory does not exist"


# 3. seeds -------------------------------------------------------------------------------------------------------
def test_seed_range(tiny_bundle, tmp_path):
    np.save(tmp_path / "two.npy", np.zeros((2, 256), np.float32))
    for seed in ("-1", str(2 ** 63 - 1)):               # seed + row must stay below 2**63
        r = run_cli("run", "--voxels", str(tmp_path / "two.npy"), "--bundle", str(tiny_bundle), "--seed", seed,
                    "--out", str(tmp_path / "o"))
        _one_line_error(r, "seed")
    assert not (tmp_path / "o").exists()


# 4. --trials on a one-trial file ------------------------------------------------------------------------------
def test_trials_on_a_single_trial_file(tiny_bundle, trial, tmp_path):
    r = run_cli("run", "--voxels", str(trial), "--bundle", str(tiny_bundle), "--trials", "5:6",
                "--out", str(tmp_path / "o"))
    _one_line_error(r, "select nothing", "1 trial")
    assert not (tmp_path / "o").exists()
    r = run_cli("run", "--voxels", str(trial), "--bundle", str(tiny_bundle), "--trials", "0:1", "--steps", "2",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "0000.png").is_file()


# 5. manifest dimensions are parsed, never evaluated -----------------------------------------------------------
def test_engine_profiles_refuse_crafted_dimensions(tiny_bundle):
    from nsdedge.runtime.trt_engine import _dim_value, profile_shapes

    env = {"batch": 2, "height": 64, "width": 48}
    assert [_dim_value(d, env) for d in ("batch", "height", "2*height_over_2", "8*width_over_8")] == [2, 64, 64, 48]
    m = read_manifest(tiny_bundle, verify=False)
    for crafted in ("9**9**9**9", "2*height_over_2+1", "__import__('os')", "batch*batch", "height_over_0", "1e9"):
        m.components["unet"].inputs[0]["shape"][2] = crafted
        t = time.perf_counter()
        with pytest.raises(BundleError, match="no value for an engine profile"):
            profile_shapes(m, "unet")
        assert time.perf_counter() - t < 1


# 6. malformed manifests, links, subject names -----------------------------------------------------------------
def test_files_entry_not_an_object(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    d = json.loads((copy / "manifest.json").read_text())
    d["files"]["constants.npz"] = "not an object"
    (copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match="files\\['constants.npz'\\]"):
        read_manifest(copy)
    _one_line_error(run_cli("info", str(copy)), "malformed")


def test_linked_file_in_a_bundle_is_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    outside = tmp_path / "elsewhere.npz"
    shutil.move(copy / "constants.npz", outside)
    (copy / "constants.npz").symlink_to(outside)
    with pytest.raises(BundleError, match="symbolic link"):
        read_manifest(copy)


def test_subject_with_a_path_separator(tiny_weights, tmp_path):
    r = run_cli("export", "--preset", "tiny", "--decoder", f"a/b={tiny_weights['decoder-synth01']}",
                "--out", str(tmp_path / "b"))
    _one_line_error(r, "subject 'a/b'")
    np.save(tmp_path / "x.npy", np.zeros((4, 8), np.float32))
    np.save(tmp_path / "y.npy", np.zeros((4, 16, 768), np.float32))
    r = run_cli("fit", "--voxels", str(tmp_path / "x.npy"), "--embeddings", str(tmp_path / "y.npy"),
                "--subject", "../up", "--out", str(tmp_path / "d.safetensors"))
    _one_line_error(r, "subject '../up'")
    assert not (tmp_path / "b").exists() and not (tmp_path / "d.safetensors").exists()


# 7. unwritable --out, -v on a command, NaN metrics in JSON ----------------------------------------------------
def test_unwritable_out_is_one_line(tiny_bundle, trial, tmp_path):
    (tmp_path / "file").write_text("a file, not a directory")
    r = run_cli("run", "--voxels", str(trial), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "file" / "o"))
    _one_line_error(r, "cannot write")
    r = run_cli("export", "--preset", "tiny", "--out", str(tmp_path / "file" / "b"))
    _one_line_error(r, "cannot write")
    assert (tmp_path / "file").read_text() == "a file, not a directory"


def test_verbose_on_the_command(tiny_bundle, trial, tmp_path):
    r = run_cli("run", "-v", "--voxels", str(trial), "--bundle", str(tiny_bundle), "--steps", "2",
                "--out", str(tmp_path / "x.png"))
    assert r.returncode == 0, r.stderr
    assert "INFO nsdedge" in r.stderr and (tmp_path / "x.png").is_file()


def test_nan_metrics_make_valid_json(tmp_path):
    flat = np.full((3, 32, 32, 3), 128, np.uint8)             # constant images: PixCorr is undefined (NaN)
    np.save(tmp_path / "a.npy", flat)
    np.save(tmp_path / "b.npy", flat)
    r = run_cli("eval", "--recons", str(tmp_path / "a.npy"), "--stimuli", str(tmp_path / "b.npy"), "--pixel-only",
                "--json", str(tmp_path / "m.json"))
    assert r.returncode == 0, r.stderr

    def refuse(c):
        raise ValueError(f"not JSON: {c}")
    d = json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse)
    assert d["metrics"]["PixCorr"] is None


# 8. the calibration recorder keeps per-image constants once -----------------------------------------------------
def test_recorder_stores_constants_once_per_image(tiny_bundle, tmp_path):
    from nsdedge.calibration import Recorder, calls, load_calibration
    from nsdedge.runtime import Reconstructor

    everything = []                                      # what the pipeline fed, call by call

    class Both(Recorder):
        def __call__(self, component, inputs, outputs):
            everything.append((component, {k: np.array(v) for k, v in inputs.items()}))
            super().__call__(component, inputs, outputs)

    rec = Reconstructor(tiny_bundle, "cpu", observer=(recorder := Both()))
    rec(np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32), steps=3)
    a = recorder.arrays()
    assert a["unet/sample"].shape[0] == 6                          # 2 trials x 3 steps
    assert a["unet/encoder_hidden_states"].shape[0] == 2           # once per image, not per step
    assert a["unet/ip_tokens"].shape[0] == 2 and list(a["unet/ip_tokens@calls"]) == [0, 0, 0, 1, 1, 1]
    recorder.save(tmp_path / "c.npz")
    loaded = load_calibration(tmp_path / "c.npz")
    fed = [f for c, f in everything if c == "unet"]
    for source in (recorder.by_component()["unet"], loaded["unet"]):
        got = calls(source)
        assert len(got) == len(fed) == 6
        for g, f in zip(got, fed):
            assert g.keys() == f.keys() and all(np.array_equal(g[k], f[k]) for k in f)


# 9. no process-wide side effects --------------------------------------------------------------------------------
def test_presets_leave_torch_global_generator_alone():
    torch = pytest.importorskip("torch")
    from nsdedge.export.presets import build_preset

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_preset("tiny", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_quantizers_leave_logging_and_tempdir_alone(tiny_bundle, tmp_path, caplog):
    pytest.importorskip("onnxruntime.quantization")
    from nsdedge.export.quantize import to_int8_dynamic, to_int8_qdq

    shutil.copy(tiny_bundle / "decoder-subj01.onnx", tmp_path / "d.onnx")
    seen = []

    class Feeds(list):                    # iterated while the quantizer calibrates: what does the process look like?
        def __iter__(self):
            seen.append((logging.getLogger().level, tempfile.tempdir))
            return super().__iter__()

    feeds = Feeds({"voxels": np.random.default_rng(i).standard_normal((1, 256)).astype(np.float32)} for i in range(3))
    with caplog.at_level(logging.WARNING):
        root = logging.getLogger()
        before = (root.level, list(root.handlers), tempfile.tempdir)
        to_int8_dynamic(tmp_path / "d.onnx", tmp_path / "d.int8.onnx", ("MatMul",))
        to_int8_qdq(tmp_path / "d.onnx", tmp_path / "d.qdq.onnx", feeds, ("MatMul",))
        assert (root.level, list(root.handlers), tempfile.tempdir) == before
    assert seen and all(s == before[::2] for s in seen)
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.int8.onnx", "d.onnx", "d.qdq.onnx"]   # no scratch left


def test_writes_follow_the_umask_without_touching_it(tmp_path, monkeypatch):
    from nsdedge.bundle import atomic_write_bytes

    def forbidden(*a):
        raise AssertionError("os.umask called")

    old = os.umask(0o027)                                  # the test's own setting, restored below
    try:
        monkeypatch.setattr(os, "umask", forbidden)
        atomic_write_bytes(tmp_path / "f", b"x")
        with BundleWriter(tmp_path / "b") as w:
            (w.tmp / "constants.npz").write_bytes(b"")
            mode = os.stat(w.tmp).st_mode & 0o777
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert os.stat(tmp_path / "f").st_mode & 0o777 == 0o640 and mode == 0o750
