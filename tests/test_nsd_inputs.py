"""NSD as Brain-Diffuser stores it: float64 voxel files and uint8 425 x 425 stimuli, read memory-mapped, turned
into the inputs of `nsdedge fit` (tokens from `nsdedge embed`) and `nsdedge run` (rows chosen with --trials)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_cli
from nsdedge.eval.images import ImageSet
from nsdedge.voxels import load_voxels


def test_voxels_memory_mapped_rows(tmp_path):
    x = np.random.default_rng(0).standard_normal((20, 30))          # float64, as Brain-Diffuser saves
    np.save(tmp_path / "fmri.npy", x)
    got = load_voxels(tmp_path / "fmri.npy", rows=slice(5, 8))
    assert got.dtype == np.float32 and got.shape == (3, 30)
    np.testing.assert_array_equal(got, x[5:8].astype(np.float32))
    from nsdedge.errors import InputError

    with pytest.raises(InputError, match="select nothing"):
        load_voxels(tmp_path / "fmri.npy", rows=slice(40, 50))


def test_embed_matches_diffusers_ip_adapter_path(tiny_weights, tmp_path):
    """`nsdedge embed` gives the tokens diffusers' pipeline computes for the same image: encode_image (CLIP
    hidden_states[-2]) and then the Resampler diffusers loads from the same .bin."""
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    rng = np.random.default_rng(0)
    stim = rng.integers(0, 256, (3, 50, 50, 3), dtype=np.uint8)
    np.save(tmp_path / "stim.npy", stim)
    r = run_cli("embed", "--stimuli", str(tmp_path / "stim.npy"), "--ip-adapter", str(tiny_weights["ip_bin"]),
                "--image-encoder", str(tiny_weights["image_encoder"]), "--batch", "2", "--out",
                str(tmp_path / "tokens.npy"))
    assert r.returncode == 0, r.stderr
    tokens = np.load(tmp_path / "tokens.npy")
    assert tokens.shape == (3, 16, 768) and tokens.dtype == np.float32
    assert not list(tmp_path.glob(".*partial*"))

    enc = CLIPVisionModelWithProjection.from_pretrained(tiny_weights["image_encoder"]).eval()
    side = enc.config.image_size
    unet = UNet2DConditionModel.from_pretrained(tiny_weights["sd"] / "unet")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_weights["sd"], safety_checker=None, requires_safety_checker=False, image_encoder=enc,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        unet=unet)
    pipe.load_ip_adapter(str(tiny_weights["ip_bin"].parent), subfolder="", weight_name=tiny_weights["ip_bin"].name,
                         image_encoder_folder=None)
    with torch.no_grad():
        hidden, _ = pipe.encode_image(Image.fromarray(stim[1]), "cpu", 1, output_hidden_states=True)
        ref = pipe.unet.encoder_hid_proj.image_projection_layers[0](hidden).numpy()
    np.testing.assert_allclose(tokens[1], ref[0], rtol=1e-5, atol=1e-5)


def test_nsd_files_to_run_and_eval(tiny_weights, tiny_bundle, tmp_path):
    """The documented path: Brain-Diffuser's test file -> `run --trials` -> `eval` against the stimulus file."""
    rng = np.random.default_rng(1)
    np.save(tmp_path / "nsd_test_fmriavg_nsdgeneral_sub1.npy", rng.standard_normal((6, 256)) * 300)   # float64
    stim = rng.integers(0, 256, (6, 425, 425, 3), dtype=np.uint8)
    np.save(tmp_path / "nsd_test_stim_sub1.npy", stim)
    out = tmp_path / "recons"
    r = run_cli("run", "--voxels", str(tmp_path / "nsd_test_fmriavg_nsdgeneral_sub1.npy"), "--bundle",
                str(tiny_bundle), "--steps", "2", "--trials", "2:5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["0002.png", "0003.png", "0004.png"]
    whole = run_cli("run", "--voxels", str(tmp_path / "nsd_test_fmriavg_nsdgeneral_sub1.npy"), "--bundle",
                    str(tiny_bundle), "--steps", "2", "--out", str(tmp_path / "all"))
    assert whole.returncode == 0, whole.stderr
    assert (out / "0003.png").read_bytes() == (tmp_path / "all" / "0003.png").read_bytes()   # row 3, seed + 3
    assert isinstance(ImageSet(tmp_path / "nsd_test_stim_sub1.npy")._array, np.memmap)
    r = run_cli("eval", "--recons", str(out), "--stimuli", str(tmp_path / "nsd_test_stim_sub1.npy"), "--pixel-only")
    assert r.returncode == 0, r.stderr
    assert "3 images" in r.stdout
    bad = run_cli("run", "--voxels", str(tmp_path / "nsd_test_fmriavg_nsdgeneral_sub1.npy"), "--bundle",
                  str(tiny_bundle), "--trials", "5:2", "--out", str(out))
    assert bad.returncode == 2 and bad.stderr.startswith("error: --trials")
