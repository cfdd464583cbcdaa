"""Bad input found by a sweep of every command (2026-11-27, second round): odd .npy headers, JSON nested too deep,
manifests that name graphs they do not describe, NaN options, outputs inside an input bundle, oversized or 16-bit
images. Each test failed before its fix."""

import hashlib
import shutil
import struct
import warnings
import zipfile
import zlib

import numpy as np
import pytest

from nsdedge.bundle import is_nsdedge_json, read_manifest
from nsdedge.errors import BundleError, InputError
from nsdedge.jobs import read_job
from nsdedge.voxels import read_array
from tests.conftest import edited_manifest, one_line_error, run_cli


def _npy_with_header(path, header: str):
    """An .npy (version 1) whose header dict is `header`, followed by 4 KB of data."""
    text = header.ljust(118) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode() + bytes(4096))
    return path


@pytest.mark.parametrize("header", [
    "{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 256), }",      # mmap: OverflowError
    "{'descr': '<f4', 'fortran_order': False, 'shape': (2,256)), }",       # tokenize.TokenError
    "{'descr': '<f4', 'fortran_order': False, 'shape': (2, -256), }",
])
def test_npy_headers_numpy_cannot_map_are_input_errors(tmp_path, header):
    with pytest.raises(InputError, match="not a readable"):
        read_array(_npy_with_header(tmp_path / "x.npy", header))


def test_an_npz_member_that_is_not_an_npy_is_an_input_error(tmp_path):
    with zipfile.ZipFile(tmp_path / "x.npz", "w") as z:
        z.writestr("x.npy", "plain text, not an array")
    with pytest.raises(InputError, match="not a numpy array"):
        read_array(tmp_path / "x.npz")


def test_json_nested_too_deep_is_refused_not_a_recursion_error(tiny_bundle, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "job.json").write_text(deep)
    with pytest.raises(InputError, match="job file"):
        read_job(tmp_path / "job.json")
    assert not is_nsdedge_json(tmp_path / "job.json")
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "manifest.json").write_text(deep)
    with pytest.raises(BundleError, match="unreadable manifest"):
        read_manifest(bundle, verify=False)


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["components"].pop("unet"), "must include unet"),
    (lambda m: m["components"].pop("vae_decoder"), "must include unet"),
    (lambda m: m["components"]["unet"].update(inputs=m["components"]["unet"]["inputs"][1:]), "no input 'sample'"),
    (lambda m: m["scheduler_config"].update(beta_end=-5), "beta_end -5"),
    (lambda m: m["scheduler_config"].update(beta_start="x"), "beta_start 'x'"),
    (lambda m: m["scheduler_config"].update(beta_start=0.5, beta_end=0.9), "alpha_bar"),
    (lambda m: m["scheduler_config"].update(trained_betas=[0.1, 0.2]), "alpha_bar"),
    (lambda m: m["scheduler_config"].update(beta_schedule="cosine"), "cosine"),
])
def test_a_manifest_must_describe_a_runnable_bundle(tiny_bundle, tmp_path, edit, needle):
    with pytest.raises(BundleError, match="malformed") as e:
        read_manifest(edited_manifest(tiny_bundle, tmp_path / "b", edit), verify=False)
    assert needle in str(e.value)


def test_a_graph_that_is_not_the_one_the_manifest_describes(tiny_bundle, trial, tmp_path):
    """The checksums prove the files are the manifest's, not that the manifest describes them: the VAE's graph
    standing in for the UNet (its hash updated) was a KeyError traceback after the progress line."""
    def swap(m):
        data = (tiny_bundle / "vae_decoder.onnx").read_bytes()
        m["files"]["unet.onnx"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    bundle = edited_manifest(tiny_bundle, tmp_path / "b", swap)
    shutil.copy(bundle / "vae_decoder.onnx", bundle / "unet.onnx")
    r = run_cli("run", "--voxels", str(trial), "--bundle", str(bundle), "--steps", "2", "--out", str(tmp_path / "o"))
    one_line_error(r, "unet.onnx", "the graph takes latent", "sample")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [
    ["fit-federated", "--subject", "a=x.npy:y.npy", "--subject", "b=x.npy:y.npy", "--lr", "nan", "--out", "o"],
    ["fit-federated", "--subject", "a=x.npy:y.npy", "--cpus-per-client", "nan", "--out", "o"],
    ["fit", "--voxels", "x.npy", "--embeddings", "y.npy", "--kind", "mlp", "--val-fraction", "nan", "--out", "d"],
    ["run", "--voxels", "x.npy", "--backend", "ray", "--gpus-per-actor", "nan"],
])
def test_nan_is_not_a_number_in_range(args, tmp_path):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2 and "nan is not a finite number" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("alphas", ["nan", "inf", "1,nan"])
def test_ridge_penalties_must_be_finite(tmp_path, alphas):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((8, 32)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.standard_normal((8, 16, 768)).astype(np.float32))
    r = run_cli("fit", "--voxels", str(tmp_path / "x.npy"), "--embeddings", str(tmp_path / "y.npy"), "--alphas",
                alphas, "--out", str(tmp_path / "d.safetensors"))
    one_line_error(r, "positive finite")
    assert not (tmp_path / "d.safetensors").exists()


def test_a_derived_bundle_inside_the_one_it_converts_is_refused(tiny_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    before = sorted(p.name for p in bundle.iterdir())
    r = run_cli("export", "--from-bundle", str(bundle), "--precision", "fp16", "--out", str(bundle / "sub"))
    one_line_error(r, "inside an input")
    assert sorted(p.name for p in bundle.iterdir()) == before


def _png_header_only(path, width: int, height: int):
    """A PNG whose header claims width x height (8-bit RGB); no pixel data needed to be refused."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [10_000, 30_000])          # over Pillow's pixel limit (a warning), over twice it
def test_eval_refuses_a_decompression_bomb_in_one_line(tmp_path, side):
    from nsdedge.eval.images import ImageSet

    with warnings.catch_warnings(), pytest.raises(InputError, match="not a readable image"):
        warnings.simplefilter("error")                     # Pillow's warning does not reach the user either
        ImageSet._read_file(None, _png_header_only(tmp_path / "0000.png", side, side))


def test_eval_reads_16_bit_grey_on_its_own_scale(tmp_path):
    from PIL import Image

    from nsdedge.eval.images import ImageSet

    grey = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    image = ImageSet._read_file(None, tmp_path / "g.png")
    assert image.shape == (64, 64, 3) and np.allclose(image[..., 1], grey / 65535.0)


@pytest.mark.parametrize("damage, needle", [
    (lambda p: p.write_bytes(b"not a png at all"), "not a readable image"),
    (lambda p: __import__("PIL.Image").Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(p), "differ in size"),
])
def test_eval_finds_bad_images_before_its_progress_line(tmp_path, damage, needle):
    """Every image's header is read before the progress bar starts: an error is the one line said (it was the
    bar's label and then the error)."""
    from PIL import Image

    recons = tmp_path / "recons"
    recons.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(recons / f"{i:04d}.png")
    np.save(tmp_path / "stim.npy", rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8))
    damage(recons / "0002.png")
    r = run_cli("eval", "--recons", str(recons), "--stimuli", str(tmp_path / "stim.npy"), "--pixel-only")
    one_line_error(r, needle)


def test_torch_warnings_about_a_users_file_stay_inside(tmp_path):
    """An old pickle protocol made torch warn (three lines on stderr) before nsdedge refused the file."""
    import pickle

    from nsdedge.decoders.mlp import read_mlp
    from nsdedge.errors import WeightsError

    with open(tmp_path / "d.bin", "wb") as f:
        pickle.dump({"a": 1}, f, protocol=4)
    with warnings.catch_warnings(), pytest.raises(WeightsError, match="never loads anything else"):
        warnings.simplefilter("error")
        read_mlp(tmp_path / "d.bin")


def test_too_few_trials_for_an_mlp_before_its_progress_line(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((3, 32)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.standard_normal((3, 16, 768)).astype(np.float32))
    r = run_cli("fit", "--voxels", str(tmp_path / "x.npy"), "--embeddings", str(tmp_path / "y.npy"), "--kind", "mlp",
                "--out", str(tmp_path / "d.safetensors"))
    one_line_error(r, "at least 4")


def test_sigterm_during_export_leaves_nothing_behind(tiny_bundle, tmp_path):
    """SIGTERM (a scheduler's kill) ended the process at once and left export's hidden .partial folder; now it is
    cleaned up as for Ctrl-C, and the command says so."""
    import os
    import signal
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-m", "nsdedge.cli", "export", "--from-bundle", str(tiny_bundle),
                          "--precision", "fp16", "--out", str(tmp_path / "b")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 120
    while not any(q.name.endswith(".partial") for q in tmp_path.iterdir()) and p.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143 and err.strip().splitlines()[-1] == "terminated", err
    assert list(tmp_path.iterdir()) == []


def test_a_model_whose_schedule_no_bundle_could_hold_is_refused_before_tracing():
    """A scheduler config every read of the bundle would refuse (beta_start 0) was exported, then unreadable: export
    checks the model's sources with the manifest's own check (bundle.schedule_problem) before tracing."""
    import types

    from nsdedge.errors import WeightsError
    from nsdedge.export.build import _check_run_defaults
    from nsdedge.export.presets import SD15_SCHEDULER_CONFIG

    src = types.SimpleNamespace(scheduler_config={**SD15_SCHEDULER_CONFIG, "beta_start": 0}, run_defaults={},
                                tiny_vae=None, full_vae=True)
    with pytest.raises(WeightsError, match="beta_start 0"):
        _check_run_defaults(src)
    _check_run_defaults(types.SimpleNamespace(**{**vars(src), "scheduler_config": SD15_SCHEDULER_CONFIG}))


def test_a_png_damaged_past_its_header_is_an_error_not_a_traceback(tmp_path):
    from PIL import Image

    from nsdedge.eval.images import ImageSet

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(tmp_path / "d.png")
    data = bytearray((tmp_path / "d.png").read_bytes())
    second = data.index(b"IDAT", data.index(b"IDAT") + 4)
    data[second:second + 4] = b"\x01\x02\x03\x04"                   # Pillow: SyntaxError "broken PNG file"
    (tmp_path / "d.png").write_bytes(bytes(data))
    ImageSet.check(type("S", (), {"_array": None, "_files": {0: tmp_path / "d.png"}, "path": tmp_path})(), [0])
    with pytest.raises(InputError, match="not a readable image"):
        ImageSet._read_file(None, tmp_path / "d.png")
