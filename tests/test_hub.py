"""Hub ids resolved from the local Hugging Face cache only (laid out here as huggingface_hub lays it out: blobs named
by content hash, snapshot files as relative symlinks, refs naming the commit), with the network blocked; `nsdedge
doctor`; the default bundle's notice."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytest.importorskip("huggingface_hub")

from nsdedge.errors import InputError  # noqa: E402
from nsdedge.hub import parse, resolve  # noqa: E402

COMMIT = "3f1c2d4e5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d"
NO_NETWORK = """
import socket
def _refuse(*a, **k):
    raise OSError("network access attempted in a test that forbids it")
socket.socket.connect = _refuse
socket.create_connection = _refuse
"""


def lay_out(cache: Path, repo: str, files: dict[str, Path], commit: str = COMMIT, ref: str = "main") -> Path:
    """Put `files` (path in the repo -> a local file) into `cache` the way `hf download` does; returns the snapshot."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    for rel, src in files.items():
        data = Path(src).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snap


def tree(folder: Path, prefix: str = "") -> dict[str, Path]:
    return {prefix + str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network access attempted in a test that forbids it")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_parse_hub_ids():
    assert parse("h94/IP-Adapter:models/image_encoder") == ("h94/IP-Adapter", None, "models/image_encoder")
    assert parse("madebyollin/taesd@v1.0:") == ("madebyollin/taesd", "v1.0", None)
    assert parse("stable-diffusion-v1-5/stable-diffusion-v1-5") == ("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                                                    None, None)
    assert parse("weights.safetensors") is None and parse("a/b/c") is None and parse("./x/y") is None


def test_resolve_hits_misses_and_paths(tmp_path, no_network):
    cache = tmp_path / "hub"
    ip = tmp_path / "ip.safetensors"
    ip.write_bytes(b"not read here")
    enc = tmp_path / "enc"
    enc.mkdir()
    (enc / "config.json").write_text("{}")
    (enc / "model.safetensors").write_bytes(b"x")
    snap = lay_out(cache, "h94/IP-Adapter", {"models/ip-adapter-plus_sd15.safetensors": ip,
                                             **tree(enc, "models/image_encoder/")})

    path, ref = resolve("h94/IP-Adapter:models/ip-adapter-plus_sd15.safetensors", "ip_adapter", cache_dir=cache)
    assert path == snap / "models/ip-adapter-plus_sd15.safetensors" and path.read_bytes() == b"not read here"
    assert ref.record() == {"id": "h94/IP-Adapter", "revision": "main", "commit": COMMIT,
                            "path": "models/ip-adapter-plus_sd15.safetensors"}
    path, ref = resolve(f"h94/IP-Adapter@{COMMIT}:models/image_encoder", "image_encoder", cache_dir=cache)
    assert path == snap / "models/image_encoder" and ref.commit == COMMIT and ref.revision == COMMIT

    # a path on disk is a path, whatever it looks like
    assert resolve(str(ip), "ip_adapter", cache_dir=cache) == (ip, None)

    # missing from the cache: one line with the exact download command, and nothing fetched
    with pytest.raises(InputError) as e:
        resolve("h94/IP-Adapter:models/ip-adapter-plus_sdxl_vit-h.safetensors", "ip_adapter", option="--ip-adapter",
                cache_dir=cache)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--ip-adapter h94/IP-Adapter:")
    assert "run `hf download h94/IP-Adapter models/ip-adapter-plus_sdxl_vit-h.safetensors` first" in msg
    with pytest.raises(InputError, match=r"hf download madebyollin/taesd --include 'config.json' --include "
                                         r"'diffusion_pytorch_model.safetensors' --revision v2"):
        resolve("madebyollin/taesd@v2", "tiny_vae", cache_dir=cache)
    with pytest.raises(InputError, match="name the file inside the repository"):
        resolve("h94/IP-Adapter", "ip_adapter", cache_dir=cache)


def test_a_partial_snapshot_names_what_is_missing(tmp_path, no_network):
    cache = tmp_path / "hub"
    cfg = tmp_path / "config.json"
    cfg.write_text("{}")
    lay_out(cache, "stable-diffusion-v1-5/stable-diffusion-v1-5", {"unet/config.json": cfg})
    with pytest.raises(InputError) as e:
        resolve("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd", option="--sd", cache_dir=cache)
    msg = str(e.value)
    assert "without scheduler/scheduler_config.json (and 6 more)" in msg
    assert "--include 'unet/diffusion_pytorch_model.safetensors'" in msg and "--include 'tokenizer/*'" in msg


def test_export_from_hub_ids_offline(tiny_weights, tmp_path):
    """The real exporter on hub ids: --sd, --ip-adapter and --image-encoder from the cache, network blocked in the
    process; the manifest records id, revision and commit, and the weights' hashes as for paths."""
    cache = tmp_path / "hub"
    lay_out(cache, "org/sd15-tiny", tree(tiny_weights["sd"]))
    lay_out(cache, "org/ip-tiny", {"models/ip-adapter-plus_sd15.safetensors": tiny_weights["ip_safetensors"],
                                   **tree(tiny_weights["image_encoder"], "models/image_encoder/")}, commit="a" * 40)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(NO_NETWORK))
    env = {"HF_HUB_CACHE": str(cache), "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "bundle"
    r = run_cli("export", "--sd", "org/sd15-tiny", "--ip-adapter", "org/ip-tiny:models/ip-adapter-plus_sd15.safetensors",
                "--image-encoder", "org/ip-tiny@main:models/image_encoder",
                "--decoder", f"subj01={tiny_weights['decoder-synth01']}", "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["hub"] == {
        "--sd": {"id": "org/sd15-tiny", "revision": "main", "commit": COMMIT, "path": None},
        "--ip-adapter": {"id": "org/ip-tiny", "revision": "main", "commit": "a" * 40,
                         "path": "models/ip-adapter-plus_sd15.safetensors"},
        "--image-encoder": {"id": "org/ip-tiny", "revision": "main", "commit": "a" * 40,
                            "path": "models/image_encoder"}}
    from nsdedge.export.sources import file_digest

    assert m["source"]["ip_adapter"] == file_digest(tiny_weights["ip_safetensors"])
    info = run_cli("info", str(out))
    assert f"--sd org/sd15-tiny@{COMMIT[:12]}" in info.stdout

    # a miss: exit 2, one line with the command, nothing written
    r = run_cli("export", "--sd", "org/sd15-tiny", "--ip-adapter", "org/ip-tiny:models/ip-adapter-plus_sd15.bin",
                "--image-encoder", "org/ip-tiny:models/image_encoder",
                "--decoder", f"subj01={tiny_weights['decoder-synth01']}", "--out", str(tmp_path / "b2"), env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "hf download org/ip-tiny models/ip-adapter-plus_sd15.bin" in r.stderr
    assert not (tmp_path / "b2").exists()


def test_doctor(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    lay_out(tmp_path / "hub", "latent-consistency/lcm-lora-sdv1-5",
            {"pytorch_lora_weights.safetensors": Path(__file__)})
    before = sorted(tmp_path.rglob("*"))
    r = run_cli("doctor", "--json", env=env)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    cpu = next(p for p in d["providers"] if p["provider"] == "cpu")
    assert cpu["starts"] and d["python"] and d["packages"]["numpy"]
    assert {p["provider"] for p in d["providers"]} >= {"cpu", "cuda", "tensorrt", "engine", "openvino"}
    hub = {w["option"]: w for w in d["hub_weights"]}
    assert hub["--lora"]["found"] and hub["--lora"]["commit"] == COMMIT
    assert not hub["--sd"]["found"] and hub["--sd"]["download"].startswith(
        "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include")
    assert d["disk"]["huggingface_cache"]["path"] == str(tmp_path / "hub")
    r = run_cli("doctor", env=env)
    assert r.returncode == 0 and "providers (--provider):" in r.stdout and "cpu       starts" in r.stdout
    assert sorted(tmp_path.rglob("*")) == before          # nothing written


def test_doctor_warns_of_two_onnxruntime_wheels_in_one_environment(monkeypatch):
    """`pip install ".[gpu,export]"` puts the export extra's CPU onnxruntime beside onnxruntime-gpu: the last
    installed wins the shared package folder, so doctor says so and how to keep one."""
    import importlib.metadata

    from nsdedge import doctor

    real = importlib.metadata.version
    fake = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: fake[name] if name in fake else real(name))
    (warning,) = doctor._conflicts()
    assert "onnxruntime 1.32.0, onnxruntime-gpu 1.31.1 are" in warning and "pip uninstall -y onnxruntime" in warning
    assert f"warning: {warning}" in doctor.format_report({**doctor.report(), "conflicts": [warning]})
    fake.pop("onnxruntime-gpu")
    assert doctor._conflicts() == []


def test_the_command_line_keeps_onnxruntime_telemetry_off_unless_the_user_set_it(tmp_path, monkeypatch):
    """onnxruntime >= 1.29 writes a device id into the user's cache (and sends 1DS events) unless
    ORT_DISABLE_TELEMETRY is set before it starts: nsdedge's command line sets it; a user's own value stands."""
    pytest.importorskip("onnxruntime")
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
    r = run_cli("doctor", env={"XDG_CACHE_HOME": str(tmp_path / "a")})
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "a" / "Microsoft").exists()
    probe = ("import os, sys; sys.argv = ['nsdedge', '--help']; from nsdedge import cli\n"
             "try: cli.main()\nexcept SystemExit: pass\nprint(os.environ['ORT_DISABLE_TELEMETRY'])")
    for given, want in ((None, "1"), ("0", "0")):
        env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
        env.update({"ORT_DISABLE_TELEMETRY": given} if given else {})
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip().splitlines()[-1] == want
