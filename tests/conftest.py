"""Shared fixtures: the tiny preset's weights saved in the real formats, and a bundle exported from them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")      # as the nsdedge command does (README: Privacy)



@pytest.hookimpl(trylast=True)                  # after `-m` has deselected: only a `pytest -m gpu` run gets here
def pytest_collection_modifyitems(config, items):
    """`@gpu` tests skip at once where no GPU backend can start (onnxruntime's CUDA and TensorRT providers probed,
    no tensorrt package):
    otherwise each would build its bundles (minutes of export) before its own skip. Each test still checks the
    provider it needs."""
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    import importlib.util

    from nsdedge.errors import NsdedgeError
    from nsdedge.runtime.ort_session import probe

    try:
        why, trt = probe("cuda"), probe("tensorrt")
    except NsdedgeError as e:                  # no onnxruntime at all
        why, trt = str(e), str(e)
    if why is None or trt is None or importlib.util.find_spec("tensorrt") is not None:
        return
    for item in gpu:
        item.add_marker(pytest.mark.skip(reason=f"no GPU backend starts here: {why}"))

def pytest_configure(config):
    """Under pytest-xdist (the README's `-n 2`) each worker takes its own share of the CPUs: what it starts (torch,
    onnxruntime, OpenVINO, the CLI's subprocesses) sizes its threads by the affinity, so two workers do not run
    a thread per core each on the same cores. Without xdist nothing changes."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and count.isdigit() and hasattr(os, "sched_setaffinity"):
        cpus, n, i = sorted(os.sched_getaffinity(0)), int(count), int(worker[2:])
        if len(cpus) >= n:
            os.sched_setaffinity(0, cpus[i::n])


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m nsdedge.cli ...` as a user would; returns the completed process (text output)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "nsdedge.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=600)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert `r` failed as bad input must: exit 2, one `error: ...` line on stderr holding `needles`, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def once_per_run(tmp_path_factory, name: str, build):
    """`build(folder)` once per test run, not once per pytest-xdist worker: the workers of a run share the parent
    of their base temporary folders, and the first to get there builds under a file lock while the other waits
    (on 2 cores the two used to export the same tiny bundles side by side, each at half speed). Returns what
    `build` returned: a Path, or a dict of Paths. Session fixtures are read-only to the tests already."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / "once-per-run"
    root.mkdir(exist_ok=True)
    record = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not record.exists():
            folder = root / name
            folder.mkdir()
            got = build(folder)
            record.write_text(json.dumps({k: str(v) for k, v in got.items()} if isinstance(got, dict) else str(got)))
    saved = json.loads(record.read_text())
    return {k: Path(v) for k, v in saved.items()} if isinstance(saved, dict) else Path(saved)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD 1.5 + IP-Adapter-Plus + CLIP vision + decoder, saved as a user would hold them."""
    pytest.importorskip("diffusers")
    from nsdedge.export.presets import build_preset, save_weights

    return once_per_run(tmp_path_factory, "weights", lambda d: save_weights(build_preset("tiny", seed=0), d))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_weights, tmp_path_factory) -> Path:
    """A bundle exported through the real loaders from the saved weights (subject subj01, 256 voxels)."""
    def build(folder: Path) -> Path:
        r = run_cli("export", "--sd", str(tiny_weights["sd"]), "--ip-adapter", str(tiny_weights["ip_safetensors"]),
                    "--image-encoder", str(tiny_weights["image_encoder"]),
                    "--decoder", f"subj01={tiny_weights['decoder-synth01']}", "--out", str(folder / "tiny"))
        assert r.returncode == 0, r.stderr
        return folder / "tiny"
    return once_per_run(tmp_path_factory, "bundles", build)


@pytest.fixture(scope="session")
def tiny_trt_bundle(tmp_path_factory) -> Path:
    """The tiny preset exported for TensorRT (plain attention, no contrib ops; subject synth01)."""
    pytest.importorskip("diffusers")
    from nsdedge.export.build import export_bundle
    from nsdedge.export.presets import build_preset

    def build(folder: Path) -> Path:
        export_bundle(build_preset("tiny"), folder / "tiny", target="tensorrt")
        return folder / "tiny"
    return once_per_run(tmp_path_factory, "trt-target", build)


MLP_SMALL = dict(voxels=48, hidden=32, blocks=2, projector_hidden=24)


@pytest.fixture(scope="session")
def two_subject_bundle(tmp_path_factory) -> Path:
    """`export --preset tiny --decoder subj02=MLP`: the preset's ridge subject synth01 (256 voxels) and a
    BrainGuard-style MLP subject subj02 (48 voxels)."""
    torch = pytest.importorskip("torch")
    from nsdedge.decoders.mlp import BrainGuardMLP, MLPConfig

    def build(root: Path) -> Path:
        torch.manual_seed(0)
        mlp = BrainGuardMLP(MLPConfig(block_order="linear-ln-gelu", **MLP_SMALL)).eval()
        mlp.x_mean.normal_()
        mlp.x_std.uniform_(0.5, 2.0)
        mlp.save(root / "mlp.safetensors", "ignored")
        r = run_cli("export", "--preset", "tiny", "--decoder", f"subj02={root / 'mlp.safetensors'}", "--out",
                    str(root / "b"))
        assert r.returncode == 0, r.stderr
        return root / "b"
    return once_per_run(tmp_path_factory, "two-subjects", build)


def edited_manifest(src: Path, dst: Path, edit) -> Path:
    """A copy of bundle `src` at `dst` whose manifest `edit(dict)` changed (the files and checksums as they were)."""
    import shutil

    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def derived(fp32: Path, out: Path, precision: str, **kw) -> Path:
    """`out`: a bundle converted from the exported fp32 bundle `fp32` (export --from-bundle, no tracing)."""
    from nsdedge.export.build import derive_bundle

    derive_bundle(fp32, out, precision=precision, **kw)
    return out


@pytest.fixture()
def trial(tmp_path) -> Path:
    p = tmp_path / "trial.npy"
    np.save(p, np.random.default_rng(7).standard_normal(256).astype(np.float32))
    return p


@pytest.fixture(scope="session")
def tiny_lcm_weights(tmp_path_factory) -> dict[str, Path]:
    """The tiny preset with a random LoRA of LCM-LoRA's shape (pytorch_lora_weights.safetensors) and a random TAESD
    (an AutoencoderTiny folder), saved as a user would hold them."""
    pytest.importorskip("peft")
    from nsdedge.export.presets import build_preset, save_weights

    return once_per_run(tmp_path_factory, "weights-lcm", lambda d: save_weights(build_preset("tiny-lcm", seed=0), d))


@pytest.fixture(scope="session")
def tiny_lcm_bundle(tiny_lcm_weights, tmp_path_factory) -> Path:
    """A few-step bundle exported through the real loaders: --lora fused, --tiny-vae beside the full VAE."""
    w = tiny_lcm_weights

    def build(folder: Path) -> Path:
        r = run_cli("export", "--sd", str(w["sd"]), "--ip-adapter", str(w["ip_safetensors"]), "--image-encoder",
                    str(w["image_encoder"]), "--decoder", f"subj01={w['decoder-synth01']}", "--lora",
                    str(w["lora"]), "--tiny-vae", str(w["tiny_vae"]), "--out", str(folder / "tiny-lcm"))
        assert r.returncode == 0, r.stderr
        return folder / "tiny-lcm"
    return once_per_run(tmp_path_factory, "bundles-lcm", build)
