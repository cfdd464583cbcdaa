"""Shared fixtures: the tiny preset's weights saved in the real formats, and a bundle exported from them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m nsdedge.cli ...` as a user would; returns the completed process (text output)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "nsdedge.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=600)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD 1.5 + IP-Adapter-Plus + CLIP vision + decoder, saved as a user would hold them."""
    pytest.importorskip("diffusers")
    from nsdedge.export.presets import build_preset, save_weights

    return save_weights(build_preset("tiny", seed=0), tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_weights, tmp_path_factory) -> Path:
    """A bundle exported through the real loaders from the saved weights (subject subj01, 256 voxels)."""
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    r = run_cli("export", "--sd", str(tiny_weights["sd"]), "--ip-adapter", str(tiny_weights["ip_safetensors"]),
                "--image-encoder", str(tiny_weights["image_encoder"]),
                "--decoder", f"subj01={tiny_weights['decoder-synth01']}", "--out", str(out))
    assert r.returncode == 0, r.stderr
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

    return save_weights(build_preset("tiny-lcm", seed=0), tmp_path_factory.mktemp("weights-lcm"))


@pytest.fixture(scope="session")
def tiny_lcm_bundle(tiny_lcm_weights, tmp_path_factory) -> Path:
    """A few-step bundle exported through the real loaders: --lora fused, --tiny-vae beside the full VAE."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-lcm"
    w = tiny_lcm_weights
    r = run_cli("export", "--sd", str(w["sd"]), "--ip-adapter", str(w["ip_safetensors"]), "--image-encoder",
                str(w["image_encoder"]), "--decoder", f"subj01={w['decoder-synth01']}", "--lora", str(w["lora"]),
                "--tiny-vae", str(w["tiny_vae"]), "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out
