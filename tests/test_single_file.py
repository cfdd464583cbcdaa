"""SD 1.5 from a single-file original (LDM) checkpoint, through diffusers' converter, gives the same bundle."""

import numpy as np
import pytest

from tests.conftest import run_cli

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def single_file(tiny_weights, tmp_path_factory):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from tests.ldm_checkpoint import write_single_file

    sd = tiny_weights["sd"]
    path = tmp_path_factory.mktemp("single") / "tiny-sd15.safetensors"
    write_single_file(UNet2DConditionModel.from_pretrained(sd / "unet"), AutoencoderKL.from_pretrained(sd / "vae"),
                      CLIPTextModel.from_pretrained(sd / "text_encoder"), path)
    return path


def test_single_file_loads_the_same_weights(single_file, tiny_weights):
    import torch
    from diffusers import UNet2DConditionModel

    from nsdedge.export.sources import load_sd15

    parts = load_sd15(single_file, tiny_weights["sd"])
    ref = UNet2DConditionModel.from_pretrained(tiny_weights["sd"] / "unet").state_dict()
    got = parts["unet"].state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert parts["scheduler_config"]["steps_offset"] == 1


def test_export_from_single_file(single_file, tiny_weights, tiny_bundle, tmp_path):
    from nsdedge.runtime import Reconstructor

    out = tmp_path / "b"
    r = run_cli("export", "--sd", str(single_file), "--sd-config", str(tiny_weights["sd"]), "--ip-adapter",
                str(tiny_weights["ip_bin"]), "--image-encoder", str(tiny_weights["image_encoder"]),
                "--decoder", f"subj01={tiny_weights['decoder-synth01']}", "--out", str(out))
    assert r.returncode == 0, r.stderr
    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    a = Reconstructor(out, "cpu")(x, steps=3)
    b = Reconstructor(tiny_bundle, "cpu")(x, steps=3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_single_file_without_configs(single_file, tiny_weights, tmp_path):
    r = run_cli("export", "--sd", str(single_file), "--ip-adapter", str(tiny_weights["ip_bin"]), "--image-encoder",
                str(tiny_weights["image_encoder"]), "--decoder", f"s={tiny_weights['decoder-synth01']}",
                "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "--sd-config" in r.stderr and "Traceback" not in r.stderr
    junk = tmp_path / "junk.safetensors"
    from safetensors.numpy import save_file
    save_file({"w": np.zeros(3, np.float32)}, str(junk))
    r = run_cli("export", "--sd", str(junk), "--sd-config", str(tiny_weights["sd"]), "--ip-adapter",
                str(tiny_weights["ip_bin"]), "--image-encoder", str(tiny_weights["image_encoder"]),
                "--decoder", f"s={tiny_weights['decoder-synth01']}", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "junk.safetensors: cannot load as an SD 1.5 checkpoint" in r.stderr
    assert not (tmp_path / "b").exists()
