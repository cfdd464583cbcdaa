"""The few-step path: a LoRA fused at export, the numpy LCM scheduler, the tiny VAE, and run defaults."""

import json

import numpy as np
import pytest

from nsdedge.errors import InputError
from nsdedge.runtime import Reconstructor
from tests.conftest import run_cli


def _voxels(n=1, seed=3):
    return np.random.default_rng(seed).standard_normal((n, 256)).astype(np.float32)


def test_parity_with_diffusers_lcm_pipeline(tiny_lcm_bundle, tiny_lcm_weights, monkeypatch):
    """diffusers' StableDiffusionPipeline with the LoRA loaded and fused, IP-Adapter-Plus (Resampler bypassed),
    LCMScheduler and AutoencoderTiny as its VAE, guidance 1, against the fp32 runtime: within 2/255."""
    torch = pytest.importorskip("torch")
    import diffusers.schedulers.scheduling_lcm as lcm_module
    from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    w = tiny_lcm_weights
    sd = w["sd"]
    pipe = StableDiffusionPipeline(
        vae=AutoencoderTiny.from_pretrained(w["tiny_vae"]), text_encoder=CLIPTextModel.from_pretrained(sd / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(sd / "tokenizer"), unet=UNet2DConditionModel.from_pretrained(sd / "unet"),
        scheduler=LCMScheduler.from_pretrained(sd / "scheduler"), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(w["lora"].parent), weight_name=w["lora"].name)
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    pipe.load_ip_adapter(str(w["ip_bin"].parent), subfolder="", weight_name=w["ip_bin"].name,
                         image_encoder_folder=None)
    pipe.unet.encoder_hid_proj = None
    pipe.unet.config.encoder_hid_dim_type = None
    pipe.set_ip_adapter_scale(0.8)

    rec = Reconstructor(tiny_lcm_bundle, "cpu")
    tokens = rec.decode(_voxels(), "subj01")
    seed = 11
    latents = rec.initial_latents(1, seed)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))   # the runtime's per-step noise

    def noise(shape, generator=None, device=None, dtype=None):
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))
    monkeypatch.setattr(lcm_module, "randn_tensor", noise)
    with torch.no_grad():
        text, _ = pipe.encode_prompt(rec.manifest.prompt, "cpu", 1, False)
        out = pipe(prompt_embeds=torch.cat([text, torch.from_numpy(tokens)], 1), latents=torch.from_numpy(latents),
                   num_inference_steps=4, guidance_scale=1.0, height=64, width=64, output_type="np").images
    expected = (out * 255).round().astype(np.uint8)
    ours = rec.generate(tokens, ip_scale=0.8, seed=seed)          # the bundle's run defaults: lcm, 4, 1.0, tiny
    diff = np.abs(ours.astype(int) - expected.astype(int))
    assert diff.max() <= 2, diff.max()
    assert np.abs(expected.astype(int) - expected.mean()).max() > 10     # not a flat image


def test_run_defaults_and_overrides(tiny_lcm_bundle, tiny_bundle, tmp_path):
    rec = Reconstructor(tiny_lcm_bundle, "cpu")
    m = json.loads((tiny_lcm_bundle / "manifest.json").read_text())
    assert m["run_defaults"] == {"scheduler": "lcm", "steps": 4, "guidance": 1.0, "vae": "tiny"}
    assert m["lora"]["scale"] == 1.0 and m["components"]["taesd_decoder"]["scaling_factor"] == 1.0
    tokens = rec.decode(_voxels(), "subj01")
    default = rec.generate(tokens, seed=2)
    assert np.array_equal(default, rec.generate(tokens, seed=2, scheduler="lcm", steps=4, guidance=1.0, vae="tiny"))
    assert not np.array_equal(default, rec.generate(tokens, seed=2, vae="full"))
    assert not np.array_equal(default, rec.generate(tokens, seed=2, steps=2))
    # a bundle without run defaults keeps nsdedge's (20 DDIM steps, guidance 7.5, the full VAE)
    assert Reconstructor(tiny_bundle, "cpu").defaults == {"steps": 20, "guidance": 7.5, "ip_scale": 1.0,
                                                          "scheduler": "ddim", "vae": "full"}
    with pytest.raises(InputError, match="vae 'tiny'"):
        Reconstructor(tiny_bundle, "cpu").decode_latents(np.zeros((1, 4, 32, 32), np.float32), vae="tiny")
    # the command says which settings came from the bundle, and the run record holds them resolved
    np.save(tmp_path / "v.npy", _voxels(2))
    r = run_cli("run", "--voxels", str(tmp_path / "v.npy"), "--bundle", str(tiny_lcm_bundle), "--steps", "2",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "the bundle's run settings: scheduler lcm, guidance 1.0, vae tiny" in r.stderr
    key = json.loads((tmp_path / "o" / "nsdedge-run.json").read_text())["key"]
    assert (key["scheduler"], key["steps"], key["guidance"], key["vae"]) == ("lcm", 2, 1.0, "tiny")
    r = run_cli("run", "--voxels", str(tmp_path / "v.npy"), "--bundle", str(tiny_bundle), "--vae", "tiny",
                "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "vae 'tiny'" in r.stderr and not (tmp_path / "x").exists()


def test_tiny_vae_only_bundle_and_bad_loras(tiny_lcm_weights, tmp_path):
    from safetensors.torch import load_file, save_file

    w = tiny_lcm_weights
    base = ["export", "--sd", str(w["sd"]), "--ip-adapter", str(w["ip_safetensors"]), "--image-encoder",
            str(w["image_encoder"]), "--decoder", f"subj01={w['decoder-synth01']}"]
    lora = load_file(str(w["lora"]))
    key = next(iter(lora))
    lora[key.replace("down_blocks.0", "down_blocks.7")] = lora.pop(key)
    save_file(lora, str(tmp_path / "bad.safetensors"))
    r = run_cli(*base, "--lora", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "b1"))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: ") and "bad.safetensors" in last and "down_blocks.7" in last
    assert "Traceback" not in r.stderr
    (tmp_path / "pickle.bin").write_bytes(b"\x80\x04")
    r = run_cli(*base, "--lora", str(tmp_path / "pickle.bin"), "--out", str(tmp_path / "b2"))
    assert r.returncode == 2 and "not a .safetensors file" in r.stderr
    r = run_cli(*base, "--no-full-vae", "--out", str(tmp_path / "b3"))
    assert r.returncode == 2 and "needs --tiny-vae" in r.stderr
    assert not any((tmp_path / b).exists() for b in ("b1", "b2", "b3"))
    # TAESD alone, with explicit run defaults instead of a LoRA's
    out = tmp_path / "taesd-only"
    r = run_cli(*base, "--tiny-vae", str(w["tiny_vae"]), "--no-full-vae", "--run-defaults",
                "scheduler=ddim-trailing,steps=3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rec = Reconstructor(out, "cpu")
    assert "vae_decoder" not in rec.manifest.components and rec.defaults["vae"] == "tiny"
    assert rec.defaults["scheduler"] == "ddim-trailing" and rec.defaults["steps"] == 3
    assert rec(_voxels(), "subj01").shape == (1, 64, 64, 3)
    r = run_cli(*base, "--run-defaults", "steps=many", "--out", str(tmp_path / "b4"))
    assert r.returncode == 2 and "steps=many" in r.stderr


def test_bench_reports_per_trial_latency_of_the_few_step_path(tiny_lcm_bundle, tmp_path):
    r = run_cli("bench", "--bundle", str(tiny_lcm_bundle), "--runs", "1", "--json", str(tmp_path / "b.json"))
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "b.json").read_text())
    assert (d["scheduler"], d["steps"], d["guidance"], d["vae"]) == ("lcm", 4, 1.0, "tiny")
    assert {"taesd_decode", "vae_decode"} <= set(d["stages"]) and d["stages"]["end_to_end"]["runs"] == 5
    assert "one trial at a time" in r.stdout


def test_kohya_layout_fuses_like_peft_layout_and_unloadable_keys_are_refused():
    """A LoRA in kohya's layout (lora_down / lora_up / alpha) goes through diffusers' converter and fuses to the same
    UNet; one whose keys the loader would skip (an adapter name in them) is refused, not fused as nothing."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from nsdedge.errors import WeightsError
    from nsdedge.export.few_step import fuse_lora
    from nsdedge.export.presets import build_preset

    a, b, c = (build_preset("tiny-lcm", seed=0) for _ in range(3))
    rank = a.lora["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"].shape[0]
    kohya = {}
    for k, v in a.lora.items():
        path, kind = k.removeprefix("unet.").rsplit(".lora_", 1)
        base = "lora_unet_" + path.replace(".", "_")
        kohya[base + (".lora_down.weight" if kind.startswith("A") else ".lora_up.weight")] = v
        kohya[base + ".alpha"] = torch.tensor(float(rank))              # alpha = rank: scale 1, as PEFT's default
    fuse_lora(a.unet, a.text_encoder, a.lora, 1.0, "peft.safetensors")
    fuse_lora(b.unet, b.text_encoder, kohya, 1.0, "kohya.safetensors")
    x = (torch.randn(1, 4, 32, 32), torch.tensor([500.0]), torch.randn(1, 77, 768))
    with torch.no_grad():
        assert torch.allclose(a.unet(*x).sample, b.unet(*x).sample, atol=1e-6)
    named = {k.replace(".weight", ".default.weight"): v for k, v in c.lora.items()}
    with pytest.raises(WeightsError, match="changed no weight"):
        fuse_lora(c.unet, c.text_encoder, named, 1.0, "named.safetensors")


def test_run_defaults_must_fit_the_bundle(tiny_lcm_weights, tmp_path):
    w = tiny_lcm_weights
    base = ["export", "--sd", str(w["sd"]), "--ip-adapter", str(w["ip_safetensors"]), "--image-encoder",
            str(w["image_encoder"]), "--decoder", f"subj01={w['decoder-synth01']}"]
    for extra, message in ((["--run-defaults", "vae=tiny"], "add --tiny-vae"),
                           (["--run-defaults", "scheduler=lcm,steps=60"], "at most 50"),
                           (["--lora-scale", "0.5"], "--lora-scale needs --lora")):
        r = run_cli(*base, *extra, "--out", str(tmp_path / "b"))
        assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1], (extra, r.stderr)
        assert not (tmp_path / "b").exists()
