"""Batch reconstruction in the library (nsdedge.runtime.batch): same bytes as the pipeline, resume, and a run
record keyed by what made the images (manifest hash, provider, settings, voxels, version), not by paths."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from nsdedge.errors import InputError
from nsdedge.runtime import Reconstructor, reconstruct
from nsdedge.runtime.batch import RUN_RECORD, Settings, read_trials
from tests.conftest import run_cli


@pytest.fixture()
def voxels(tmp_path):
    p = tmp_path / "v.npy"
    np.save(p, np.random.default_rng(3).standard_normal((4, 256)))          # float64, as NSD's files
    return p


def _png(path):
    return np.asarray(Image.open(path))


def test_rows_keep_their_names_and_seeds(tiny_bundle, voxels, tmp_path):
    out = tmp_path / "out"
    seen = []
    result = reconstruct(tiny_bundle, voxels, out, trials="1:3", steps=2, seed=5, provider="cpu",
                         progress=lambda p: seen.append((p.done, p.todo, p.skipped, p.step)))
    assert [p.name for p in result.written] == ["0001.png", "0002.png"] and result.provider == "cpu"
    assert seen[0] == (0, 2, 0, 0) and (1, 2, 0, 2) in seen and seen[-1] == (2, 2, 0, 0)   # start, a step, the end
    rec = Reconstructor(tiny_bundle, "cpu")
    x = np.load(voxels).astype(np.float32)
    for row in (1, 2):                     # row r: seed + r, exactly as the pipeline makes it
        want = rec(x[row:row + 1], steps=2, seed=5 + row)[0]
        assert np.array_equal(_png(out / f"{row:04d}.png"), want)
    # the command line writes the same bytes through the same function
    r = run_cli("run", "--voxels", str(voxels), "--bundle", str(tiny_bundle), "--trials", "2:3", "--steps", "2",
                "--seed", "5", "--provider", "cpu", "--out", str(tmp_path / "cli"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cli" / "0002.png").read_bytes() == (out / "0002.png").read_bytes()


def test_resume_skips_what_is_there(tiny_bundle, voxels, tmp_path):
    out = tmp_path / "out"
    first = reconstruct(tiny_bundle, voxels, out, steps=2, provider="cpu")
    assert len(first.written) == 4 and not first.skipped
    data = (out / "0002.png").read_bytes()
    (out / "0002.png").unlink()
    again = reconstruct(tiny_bundle, voxels, out, steps=2, provider="cpu")
    assert [p.name for p in again.written] == ["0002.png"] and len(again.skipped) == 3
    assert (out / "0002.png").read_bytes() == data
    # another range of the same job goes into the same directory
    more = reconstruct(tiny_bundle, voxels, out, trials="3:", steps=2, provider="cpu")
    assert more.written == [] and [p.name for p in more.skipped] == ["0003.png"]


def test_record_is_keyed_by_the_manifest_not_the_path(tiny_bundle, voxels, tmp_path):
    out = tmp_path / "out"
    reconstruct(tiny_bundle, voxels, out, trials="0:1", steps=2, provider="cpu")
    record = json.loads((out / RUN_RECORD).read_text())
    key = record["key"]
    assert key["bundle_manifest_sha256"] == Reconstructor(tiny_bundle, "cpu").manifest.sha256
    assert {"provider", "steps", "guidance", "ip_scale", "scheduler", "seed", "subject", "voxels_sha256",
            "nsdedge"} <= set(key)
    # the same bundle elsewhere: the same model, accepted
    moved = tmp_path / "moved"
    shutil.copytree(tiny_bundle, moved)
    reconstruct(moved, voxels, out, trials="1:2", steps=2, provider="cpu")
    # re-exported to the same path (here: another manifest): refused, and nothing is written
    d = json.loads((moved / "manifest.json").read_text())
    d["prompt"] = "another prompt"
    (moved / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match="other settings.*bundle_manifest_sha256"):
        reconstruct(moved, voxels, out, trials="2:3", steps=2, provider="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", RUN_RECORD]
    # images of another provider
    record["key"]["provider"] = "cuda"
    (out / RUN_RECORD).write_text(json.dumps(record))
    with pytest.raises(InputError, match="provider 'cuda' -> 'cpu'"):
        reconstruct(tiny_bundle, voxels, out, trials="2:3", steps=2, provider="cpu")
    # another voxel file at the same path
    np.save(voxels, np.zeros((4, 256)))
    record["key"]["provider"] = "cpu"
    (out / RUN_RECORD).write_text(json.dumps(record))
    with pytest.raises(InputError, match="voxels_sha256"):
        reconstruct(tiny_bundle, voxels, out, trials="2:3", steps=2, provider="cpu")


def test_foreign_images_are_never_taken_as_done(tiny_bundle, voxels, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "0000.png").write_bytes(b"a user's own file")
    with pytest.raises(InputError, match="no nsdedge-run.json"):
        reconstruct(tiny_bundle, voxels, out, steps=2, provider="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["0000.png"]
    assert (out / "0000.png").read_bytes() == b"a user's own file"


def test_settings_and_trials_are_checked(voxels, tmp_path):
    for bad, msg in [(Settings(steps=0), "steps"), (Settings(guidance=float("nan")), "guidance"),
                     (Settings(ip_scale=float("inf")), "ip scale"), (Settings(scheduler="pndm"), "unknown scheduler"),
                     (Settings(seed=-1), "seed -1 out of range"), (Settings(seed=2 ** 63 - 2), "out of range")]:
        with pytest.raises(InputError, match=msg):
            bad.checked(last_row=3)
    assert Settings(seed=2 ** 63 - 4).checked(last_row=3).seed == 2 ** 63 - 4
    assert read_trials(voxels, "1:3").rows == [1, 2]
    assert read_trials(voxels, "2:").rows == [2, 3] and read_trials(voxels, "1:99").rows == [1, 2, 3]
    for bad in ("3", "a:b", "3:1", "-1:2"):
        with pytest.raises(InputError):
            read_trials(voxels, bad)
    with pytest.raises(InputError, match="select nothing"):
        read_trials(voxels, "4:9")


def test_a_failed_start_leaves_nothing_and_mismatches_are_found_first(tiny_bundle, voxels, tmp_path):
    from nsdedge.errors import ProviderError

    out = tmp_path / "out"
    rec = Reconstructor(tiny_bundle, "cpu")

    def cannot_start(component):
        raise ProviderError(f"{component}: could not start")
    rec.session = cannot_start                    # as a GPU provider that fails to start would
    with pytest.raises(ProviderError):
        reconstruct(rec, voxels, out, steps=2)
    assert not out.exists()                       # no record: the retry with other settings is not refused
    reconstruct(tiny_bundle, voxels, out, trials="0:1", steps=3, provider="cpu")
    # a rerun with other settings is refused before the bundle is even opened
    with pytest.raises(InputError, match="steps 3 -> 2"):
        reconstruct(tmp_path / "no-such-bundle", voxels, out, trials="1:2", steps=2)


def test_recorder_refuses_calls_of_different_shapes(tmp_path):
    from nsdedge.calibration import Recorder
    from nsdedge.errors import NsdedgeError

    r = Recorder()
    r("decoder-s", {"voxels": np.zeros((2, 4), np.float32)}, {})
    r("decoder-s", {"voxels": np.zeros((1, 4), np.float32)}, {})
    with pytest.raises(NsdedgeError, match="differ in shape"):
        r.save(tmp_path / "c.npz")
    assert not (tmp_path / "c.npz").exists()
