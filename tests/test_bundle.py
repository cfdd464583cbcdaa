"""Reading a bundle checks the schema, names, sizes and checksums."""

import json
import shutil

import pytest

from nsdedge.bundle import read_manifest
from nsdedge.errors import BundleError


@pytest.fixture()
def copy(tiny_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _edit(bundle, fn):
    p = bundle / "manifest.json"
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


def test_round_trip(tiny_bundle):
    m = read_manifest(tiny_bundle)
    from nsdedge.bundle import Manifest
    again = Manifest.from_json(json.loads(json.dumps(m.to_json())))
    assert again.to_json() == m.to_json()


def test_checksum_failure(copy):
    with open(copy / "vae_decoder.onnx", "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="vae_decoder.onnx fails its sha256"):
        read_manifest(copy)
    read_manifest(copy, verify=False)     # sizes still match


def test_missing_file(copy):
    (copy / "constants.npz").unlink()
    with pytest.raises(BundleError, match="missing file constants.npz"):
        read_manifest(copy)


def test_unknown_schema(copy):
    _edit(copy, lambda d: d.update(schema_version=99))
    with pytest.raises(BundleError, match="schema version 99"):
        read_manifest(copy)


@pytest.mark.parametrize("name", ["../etc/passwd", "/abs/path", "sub/dir.onnx", ".."])
def test_non_plain_names_refused(copy, name):
    _edit(copy, lambda d: d["components"]["unet"].update(file=name))
    with pytest.raises(BundleError, match="plain name"):
        read_manifest(copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        read_manifest(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        read_manifest(tmp_path / "nope")


def test_create_once_never_replaces(tmp_path):
    """The run record of a directory several workers write into: the first complete one stays."""
    from nsdedge.bundle import create_once

    p = tmp_path / "nsdedge-run.json"
    assert create_once(p, b"first") is True
    assert create_once(p, b"second") is False
    assert p.read_bytes() == b"first" and sorted(q.name for q in tmp_path.iterdir()) == ["nsdedge-run.json"]
