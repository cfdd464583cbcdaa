"""`nsdedge run`: outputs, resuming, and bad input (one line, exit 2, nothing written)."""

import json
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, run_cli


def _run(bundle, voxels, out, *extra):
    return run_cli("run", "--voxels", str(voxels), "--bundle", str(bundle), "--steps", "2", "--out", str(out), *extra)


def test_one_trial_to_png(tiny_bundle, trial, tmp_path):
    out = tmp_path / "img.png"
    r = _run(tiny_bundle, trial, out)
    assert r.returncode == 0, r.stderr
    img = np.asarray(Image.open(out))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png", "trial.npy"]


def test_low_memory_from_the_command_line_writes_the_same_images_and_says_the_provider(tiny_bundle, tmp_path):
    """`run --low-memory` (stage-major on the CPU provider: the same bytes) and `--provider auto` names what ran."""
    from nsdedge.runtime.session import resolve

    vox = tmp_path / "v.npy"
    np.save(vox, np.random.default_rng(4).standard_normal((3, 256)).astype(np.float32))
    normal = _run(tiny_bundle, vox, tmp_path / "normal", "--provider", "cpu")
    lean = _run(tiny_bundle, vox, tmp_path / "lean", "--low-memory", "--provider", "cpu")
    auto = _run(tiny_bundle, vox, tmp_path / "auto", "--provider", "auto", "--trials", "0:1")
    for r, out, provider in ((normal, "normal", "cpu"), (lean, "lean", "cpu"), (auto, "auto", resolve("auto"))):
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().endswith(f"to {tmp_path / out} (provider {provider})"), r.stdout
    for name in ("0000.png", "0001.png", "0002.png"):
        assert (tmp_path / "normal" / name).read_bytes() == (tmp_path / "lean" / name).read_bytes()


def test_batch_to_directory_and_resume(tiny_bundle, tmp_path):
    vox = tmp_path / "many.npz"
    np.savez(vox, betas=np.random.default_rng(1).standard_normal((3, 256)))      # float64, as NSD files are
    out = tmp_path / "out"
    r = _run(tiny_bundle, vox, out)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0000.png", "0001.png", "0002.png", "nsdedge-run.json"]
    first = (out / "0001.png").read_bytes()
    (out / "0001.png").unlink()                      # as if interrupted before image 1 was written
    stamp = (out / "0000.png").stat().st_mtime_ns
    r = _run(tiny_bundle, vox, out)
    assert r.returncode == 0 and "2 of 3 images already" in r.stderr
    assert (out / "0001.png").read_bytes() == first   # seed + i: the same bytes as before
    assert (out / "0000.png").stat().st_mtime_ns == stamp
    r = _run(tiny_bundle, vox, out, "--seed", "9")
    assert r.returncode == 2 and "other settings" in r.stderr


def _bad_inputs(tmp_path):
    d = tmp_path
    cases = {}
    cases["missing"] = (d / "nope.npy", "no such file")
    (d / "text.npy").write_text("hello")
    cases["not an array"] = (d / "text.npy", "not a readable")
    np.save(d / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases["object array"] = (d / "obj.npy", "pickled or object")
    (d / "pickle.npy").write_bytes(pickle.dumps(np.zeros(256)))
    cases["raw pickle"] = (d / "pickle.npy", "pickled or object")
    np.save(d / "rank3.npy", np.zeros((2, 2, 256), np.float32))
    cases["rank 3"] = (d / "rank3.npy", "shape (V,) or (N, V)")
    np.save(d / "short.npy", np.zeros(100, np.float32))
    cases["wrong length"] = (d / "short.npy", "100 voxels per trial, the subject's decoder expects 256")
    nan = np.zeros((2, 256), np.float32)
    nan[1, 3] = np.nan
    np.save(d / "nan.npy", nan)
    cases["nan"] = (d / "nan.npy", "NaN or Inf")
    inf = np.zeros(256)
    inf[0] = np.inf
    np.save(d / "inf.npy", inf)
    cases["inf"] = (d / "inf.npy", "NaN or Inf")
    np.save(d / "empty.npy", np.zeros((0, 256), np.float32))
    cases["empty"] = (d / "empty.npy", "empty")
    np.save(d / "strings.npy", np.array(["a", "b"]))
    cases["strings"] = (d / "strings.npy", "numeric")
    np.savez(d / "two.npz", a=np.zeros(256), b=np.zeros(256))
    cases["npz with two arrays"] = (d / "two.npz", "exactly one")
    (d / "adir.npy").mkdir()
    cases["directory"] = (d / "adir.npy", "is a directory")
    return cases


def test_bad_voxel_files(tiny_bundle, tmp_path):
    for what, (path, message) in _bad_inputs(tmp_path).items():
        out = tmp_path / f"out-{path.stem}"
        r = _run(tiny_bundle, path, out)
        assert r.returncode == 2, (what, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, r.stderr)
        assert message in lines[0] and path.name in lines[0], (what, lines[0])
        assert not out.exists(), what


def test_bad_subject_and_bundle(tiny_bundle, trial, tmp_path):
    out = tmp_path / "o"
    r = _run(tiny_bundle, trial, out, "--subject", "subj09")
    assert r.returncode == 2 and "unknown subject 'subj09'" in r.stderr and not out.exists()

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / "vae_decoder.onnx").unlink()
    r = _run(broken, trial, out)
    assert r.returncode == 2 and "missing file vae_decoder.onnx" in r.stderr and "Traceback" not in r.stderr

    shutil.copy(tiny_bundle / "vae_decoder.onnx", broken / "vae_decoder.onnx")
    with open(broken / "constants.npz", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    r = _run(broken, trial, out)
    assert r.returncode == 2 and "sha256" in r.stderr

    shutil.copy(tiny_bundle / "constants.npz", broken / "constants.npz")
    d = json.loads((broken / "manifest.json").read_text())
    d["schema_version"] = 7
    (broken / "manifest.json").write_text(json.dumps(d))
    r = _run(broken, trial, out)
    assert r.returncode == 2 and "schema version 7" in r.stderr
    r = _run(tmp_path / "no-bundle", trial, out)
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert not out.exists()

    r = _run(tiny_bundle, trial, out, "--provider", "cuda")
    try:
        import onnxruntime as ort
        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        assert r.returncode == 2 and "provider 'cuda' is not available" in r.stderr


def test_many_trials_to_one_png_refused(tiny_bundle, tmp_path):
    vox = tmp_path / "two.npy"
    np.save(vox, np.zeros((2, 256), np.float32))
    r = _run(tiny_bundle, vox, tmp_path / "x.png")
    assert r.returncode == 2 and "directory" in r.stderr


def test_default_bundle_and_example(tmp_path):
    """The README's main command: no --bundle, the example trial; the tiny bundle is built into the cache."""
    pytest.importorskip("diffusers")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = tmp_path / "recon"
    r = run_cli("run", "--voxels", str(ROOT / "examples" / "trial.npy"), "--steps", "2", "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr
    assert (out / "0000.png").is_file() and "built the default bundle (preset tiny)" in r.stderr
    assert list((tmp_path / "cache" / "nsdedge" / "bundles").iterdir())
    np.save(tmp_path / "w100.npy", np.zeros(100, np.float32))          # bad input: the error alone, no notes first
    for bad in (["--voxels", str(tmp_path / "w100.npy")], ["--voxels", str(ROOT / "examples" / "trial.npy"),
                                                           "--subject", "subj07"]):
        r = run_cli("run", *bad, "--out", str(tmp_path / "bad.png"), env=env)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("error: ") and not (tmp_path / "bad.png").exists()
    r = run_cli("run", "--voxels", str(ROOT / "examples" / "trial.npy"), "--steps", "2", "--out",
                str(tmp_path / "again.png"), env=env)
    assert r.returncode == 0 and "building the default bundle" not in r.stderr
    notice = [line for line in r.stderr.splitlines() if "random" in line]     # said once, pointing to the README
    assert len(notice) == 1 and "Real reconstructions" in notice[0]
    assert "## Real reconstructions" in (ROOT / "README.md").read_text()
