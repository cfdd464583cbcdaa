"""Outputs never replace what nsdedge did not write (nor the command's own inputs); damaged files, odd manifests and
bad options are one-line errors. Each test failed before its fix (review of 2026-11-27)."""

import json
import os
import shutil
import zlib

import numpy as np
import pytest
from PIL import Image

from nsdedge.bundle import check_new_file, is_nsdedge_json, read_manifest
from nsdedge.errors import BundleError, InputError, first_line
from nsdedge.eval.images import ImageSet
from nsdedge.runtime.batch import is_nsdedge_png, png_bytes
from nsdedge.voxels import load_voxels
from tests.conftest import edited_manifest
from tests.conftest import one_line_error as _one_line_error
from tests.conftest import run_cli


def _bad_crc_npz(path, arr):
    np.savez(path, arr)                              # stored, not deflated: the array's bytes sit in the file
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF                               # inside the array's data: the zip's CRC no longer matches
    path.write_bytes(bytes(data))
    return path


def test_outputs_never_replace_inputs_or_files_nsdedge_did_not_write(tiny_bundle, trial, tmp_path):
    # fit: --out the voxel file itself
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal((6, 256)).astype(np.float32))
    y = tmp_path / "y.npy"
    np.save(y, np.zeros((6, 16, 768), np.float32))
    before = x.read_bytes()
    _one_line_error(run_cli("fit", "--voxels", str(x), "--embeddings", str(y), "--out", str(x)), "an input")
    assert x.read_bytes() == before
    # bench --json into the bundle it measures
    manifest = (tiny_bundle / "manifest.json").read_bytes()
    _one_line_error(run_cli("bench", "--bundle", str(tiny_bundle), "--runs", "1", "--json",
                            str(tiny_bundle / "manifest.json")), "inside an input")
    assert (tiny_bundle / "manifest.json").read_bytes() == manifest
    # run --out a PNG that nsdedge did not write: kept; one it wrote: replaced on a rerun
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(photo)
    mine = photo.read_bytes()
    _one_line_error(run_cli("run", "--voxels", str(trial), "--bundle", str(tiny_bundle), "--steps", "1", "--out",
                            str(photo)), "not a file nsdedge wrote")
    assert photo.read_bytes() == mine
    out = tmp_path / "r.png"
    for _ in range(2):
        r = run_cli("run", "--voxels", str(trial), "--bundle", str(tiny_bundle), "--steps", "1", "--out", str(out))
        assert r.returncode == 0, r.stderr
    assert is_nsdedge_png(out) and not is_nsdedge_png(photo)
    # run --out a directory inside the bundle
    _one_line_error(run_cli("run", "--voxels", str(trial), "--bundle", str(tiny_bundle), "--steps", "1", "--out",
                            str(tiny_bundle / "recons")), "inside an input")
    assert not (tiny_bundle / "recons").exists()


def test_check_new_file_recognises_what_nsdedge_wrote(tmp_path):
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"command": "nsdedge eval --recons a", "pixcorr": 0.1}))
    assert check_new_file(report, ours=is_nsdedge_json) == report
    scripted = tmp_path / "s.json"                     # the CLI called from a script: argv names no nsdedge
    scripted.write_text(json.dumps({"command": "my_script.py", "nsdedge_version": "0.1"}))
    assert check_new_file(scripted, ours=is_nsdedge_json) == scripted
    theirs = tmp_path / "t.json"
    theirs.write_text(json.dumps({"results": 1}))
    with pytest.raises(InputError, match="not a file nsdedge wrote"):
        check_new_file(theirs, ours=is_nsdedge_json, flag="--json")
    with pytest.raises(InputError, match="is a directory"):
        check_new_file(tmp_path)
    link = tmp_path / "alias.json"
    link.symlink_to(report)
    with pytest.raises(InputError, match="an input of this command"):
        check_new_file(report, inputs=[link])              # the same file by another name
    png = tmp_path / "a.png"
    png.write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    assert is_nsdedge_png(png) and np.array_equal(np.asarray(Image.open(png)), np.zeros((8, 8, 3), np.uint8))
    # a PNG whose header claims 20000 x 20000 (Pillow refuses to open it): read, never decoded
    ihdr = b"IHDR" + (20000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    chunk = len(ihdr[4:]).to_bytes(4, "big") + ihdr + zlib.crc32(ihdr).to_bytes(4, "big")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + b"\0\0\0\0IEND" + zlib.crc32(b"IEND").to_bytes(4, "big"))
    with pytest.raises(InputError, match="not a file nsdedge wrote"):
        check_new_file(bomb, ours=is_nsdedge_png)


def test_embed_never_writes_over_its_stimuli(tiny_weights, tmp_path):
    stim = tmp_path / "stim.npy"
    np.save(stim, np.zeros((2, 16, 16, 3), np.uint8))
    before = stim.read_bytes()
    _one_line_error(run_cli("embed", "--stimuli", str(stim), "--ip-adapter", str(tiny_weights["ip_bin"]),
                            "--image-encoder", str(tiny_weights["image_encoder"]), "--out", str(stim)), "an input")
    assert stim.read_bytes() == before


def test_eval_outputs_are_checked_before_the_metrics(tmp_path):
    recons, stim = tmp_path / "recons", tmp_path / "stim.npy"
    recons.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (i * 50, 0, 0)).save(recons / f"{i:04d}.png")
    np.save(stim, np.zeros((2, 16, 16, 3), np.uint8))
    before = stim.read_bytes()
    _one_line_error(run_cli("eval", "--recons", str(recons), "--stimuli", str(stim), "--pixel-only", "--json",
                            str(stim)), "an input")
    assert stim.read_bytes() == before
    report = recons / "metrics.json"                   # a report among the images it scores: written, rewritten
    for _ in range(2):
        r = run_cli("eval", "--recons", str(recons), "--stimuli", str(stim), "--pixel-only", "--json", str(report))
        assert r.returncode == 0, r.stderr
    assert "nsdedge_version" in json.loads(report.read_text())
    Image.new("RGB", (24, 16)).save(recons / "0001.png")              # one image of another size
    with pytest.raises(InputError, match="differ in size"):
        ImageSet(recons).read([0, 1])
    np.save(stim, np.zeros((2, 1, 1, 3), np.uint8))
    with pytest.raises(InputError, match="at least 8x8"):
        ImageSet(stim)


def test_damaged_files_are_one_line_errors(tiny_bundle, tmp_path):
    crc = _bad_crc_npz(tmp_path / "crc.npz", np.zeros((2, 256), np.float32))
    with pytest.raises(InputError, match="BadZipFile"):
        load_voxels(crc)
    _one_line_error(run_cli("run", "--voxels", str(crc), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "o")),
                    "crc.npz")
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((6, 256), np.float32))
    (tmp_path / "empty.npy").write_bytes(b"")
    _one_line_error(run_cli("fit", "--voxels", str(x), "--embeddings", str(tmp_path / "empty.npy"), "--out",
                            str(tmp_path / "d.safetensors")), "empty.npy")
    assert first_line(EOFError()) == "EOFError"
    # --no-verify checks sizes only: a graph damaged in place is one line, not onnxruntime's traceback
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    unet = copy / "unet.onnx"
    data = bytearray(unet.read_bytes())
    data[:64] = b"\xff" * 64
    unet.write_bytes(bytes(data))
    trial = tmp_path / "t.npy"
    np.save(trial, np.zeros(256, np.float32))
    r = run_cli("run", "--voxels", str(trial), "--bundle", str(copy), "--no-verify", "--steps", "1",
                "--out", str(tmp_path / "o.png"))
    last = r.stderr.strip().splitlines()[-1]        # after the progress bar's label: the run had started
    assert r.returncode == 2 and "Traceback" not in r.stderr and last.startswith("error: unet.onnx"), r.stderr
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m.update(vae_scale_factor=0), "image_size"),
    (lambda m: m.update(image_size=[64]), "image_size"),
    (lambda m: m.update(latent_channels=3), "latent channels"),
    (lambda m: m.update(run_defaults={"guidance": "x"}), "run_defaults"),
    (lambda m: m["scheduler_config"].update(num_train_timesteps=0), "num_train_timesteps"),
    (lambda m: m["components"][next(k for k in m["components"] if k.startswith("decoder"))].update(voxels="many"),
     "voxels"),
    (lambda m: m["components"]["unet"].update(parity="x"), "parity"),
])
def test_a_manifest_with_values_out_of_range_is_refused(tiny_bundle, tmp_path, edit, needle):
    bad = edited_manifest(tiny_bundle, tmp_path / "b", edit)
    with pytest.raises(BundleError, match=needle) as e:
        read_manifest(bad, verify=False)
    assert str(bad / "manifest.json") in str(e.value)


def test_info_on_an_odd_field_and_bad_options_are_one_line(tiny_bundle, tmp_path):
    bad = edited_manifest(tiny_bundle, tmp_path / "b", lambda m: m.update(fidelity={"precision": "int8"}))
    _one_line_error(run_cli("info", str(bad)), "unexpected form")
    _one_line_error(run_cli("run", "--voxels", "x.npy", "--steps", "0"), "--steps", "nsdedge run --help")
    _one_line_error(run_cli("build-engines", str(tiny_bundle), "--workspace-gb", "nan"), "--workspace-gb")


def test_force_keeps_a_file_a_hand_made_manifest_claims(tmp_path):
    out = tmp_path / "fake"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "manifest.json").write_text(json.dumps({"format": "nsdedge-bundle", "files": {"notes.txt": {}}}))
    _one_line_error(run_cli("export", "--preset", "tiny", "--out", str(out), "--force"), "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"


def test_a_ridge_decoder_follows_the_umask(tmp_path):
    from nsdedge.decoders.linear import is_decoder_file, synthetic_decoder

    old = os.umask(0o027)                             # the test's own setting, restored below
    try:
        path = tmp_path / "d.safetensors"
        synthetic_decoder("subj01", 32, rank=4, seed=0).save(path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640       # mkstemp made it 0600 whatever the umask
    assert is_decoder_file(path) and not is_decoder_file(tmp_path)
