"""`nsdedge export` and the bundle: parity recorded, round trip, atomicity, --force, clear errors."""

import json

import numpy as np
import pytest

from nsdedge.bundle import SCHEMA_VERSION, read_manifest
from tests.conftest import ROOT, run_cli

pytest.importorskip("diffusers")


def test_bundle_layout_and_manifest(tiny_bundle, tiny_weights):
    m = read_manifest(tiny_bundle)
    assert m.schema_version == SCHEMA_VERSION and m.precision == "fp32"
    assert set(m.components) == {"unet", "vae_decoder", "decoder-subj01"}
    assert m.vae_scale_factor == 2 and m.image_size == (64, 64) and m.latent_size == (32, 32)
    assert m.vae_scaling_factor == pytest.approx(0.18215)
    assert m.subjects == {"subj01": "decoder-subj01"}
    for c in m.components.values():
        for output, err in c.parity.items():
            assert 0 <= err < 1e-4, (c.name, output, err)
    unet = {i["name"]: i for i in m.components["unet"].inputs}
    assert list(unet) == ["sample", "timestep", "encoder_hidden_states", "ip_tokens", "ip_scale"]
    assert unet["sample"]["shape"][0] == "batch" and isinstance(unet["sample"]["shape"][2], str)
    assert unet["ip_tokens"]["shape"][1:] == [16, 768]
    assert m.components["decoder-subj01"].parity["ip_tokens"] < 1e-5
    assert m.components["unet"].source.startswith("unet=sha256-tree:")
    assert m.scheduler_config["steps_offset"] == 1
    with np.load(tiny_bundle / "constants.npz") as c:
        assert c["prompt_embeds"].shape == (1, 77, 768)
        assert c["negative_prompt_embeds"].shape == (1, 77, 768)
        assert c["uncond_ip_tokens"].shape == (1, 16, 768)
        assert np.abs(c["uncond_ip_tokens"]).max() > 0          # the Resampler's output, not zeros
        assert not np.allclose(c["prompt_embeds"], c["negative_prompt_embeds"])


def test_onnx_target_fuses_attention(tiny_bundle):
    """Every attention of the UNet (self, text, ip) and of the VAE is one MultiHeadAttention node, and no
    (B, heads, S, S) score map is left: no Softmax in either graph. Parity above is measured on these graphs."""
    import onnx

    m = read_manifest(tiny_bundle, verify=False)
    assert m.extra["fused_attention"] is True
    unet = [n.op_type for n in onnx.load(str(tiny_bundle / "unet.onnx")).graph.node]
    vae = [n.op_type for n in onnx.load(str(tiny_bundle / "vae_decoder.onnx")).graph.node]
    # 12 in the tiny UNet: self, text and ip attention of each of its 4 transformer blocks
    assert unet.count("MultiHeadAttention") >= 12 and "Softmax" not in unet
    assert vae.count("MultiHeadAttention") >= 1 and "Softmax" not in vae


def test_unconditional_tokens_follow_ip_adapter(tiny_bundle, tiny_weights):
    """Resampler over CLIP hidden_states[-2] of a zeros image, computed here through diffusers' own path."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    from nsdedge.export.ip_adapter import read_ip_adapter

    unet = UNet2DConditionModel.from_pretrained(tiny_weights["sd"] / "unet")
    unet._load_ip_adapter_weights([read_ip_adapter(tiny_weights["ip_bin"]).state_dict()], low_cpu_mem_usage=False)
    enc = CLIPVisionModelWithProjection.from_pretrained(tiny_weights["image_encoder"])
    size = enc.config.image_size
    with torch.no_grad():
        hidden = enc(torch.zeros(1, 3, size, size), output_hidden_states=True).hidden_states[-2]
        expected = unet.encoder_hid_proj.image_projection_layers[0](hidden).numpy()
    with np.load(tiny_bundle / "constants.npz") as c:
        np.testing.assert_allclose(c["uncond_ip_tokens"], expected, rtol=1e-5, atol=1e-6)


def test_info_prints_summary(tiny_bundle):
    r = run_cli("info", str(tiny_bundle))
    assert r.returncode == 0, r.stderr
    for word in ("unet", "vae_decoder", "decoder-subj01", "fp32", "parity (rel L2)", "e-0", "subj01 (256 voxels)"):
        assert word in r.stdout


def test_existing_bundle_needs_force(tiny_bundle):
    before = (tiny_bundle / "manifest.json").read_bytes()
    r = run_cli("export", "--preset", "tiny", "--out", str(tiny_bundle))
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert (tiny_bundle / "manifest.json").read_bytes() == before


def test_failed_export_leaves_no_bundle(tmp_path, monkeypatch):
    """A parity failure midway (after the UNet was written) leaves neither a bundle nor a temporary directory."""
    from nsdedge.errors import ParityError
    from nsdedge.export import build, presets

    calls = {"n": 0}
    real = build.export_and_verify

    def failing(module, spec, *a, **k):
        calls["n"] += 1
        if spec.component == "vae_decoder":
            raise ParityError("vae_decoder.image: relative L2 error 1 > 0.0001")
        return real(module, spec, *a, **k)

    monkeypatch.setattr(build, "export_and_verify", failing)
    out = tmp_path / "b"
    with pytest.raises(ParityError, match="vae_decoder.image"):
        build.export_bundle(presets.build_preset("tiny"), out)
    assert calls["n"] == 2
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_atomically(tiny_bundle, tmp_path):
    import shutil

    from nsdedge.export import build, presets

    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)                  # an exported bundle (preset tiny, seed 0)
    first = json.loads((out / "manifest.json").read_text())["files"]["unet.onnx"]["sha256"]
    build.export_bundle(presets.build_preset("tiny", seed=1), out, force=True)
    second = read_manifest(out).files["unet.onnx"]["sha256"]
    assert first != second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.parametrize("args, message", [
    (["--sd", "/nonexistent/sd", "--ip-adapter", "x.bin", "--image-encoder", "enc", "--decoder", "s=d"],
     "d: no such decoder file"),
    (["--preset", "tiny", "--decoder", "subj01"], "expected SUBJECT=FILE"),
    (["--preset", "tiny", "--sd", "x"], "either --preset or --sd"),
    (["--preset", "tiny", "--resolution", "63"], "multiple of"),
])
def test_bad_export_arguments(tmp_path, args, message):
    out = tmp_path / "b"
    r = run_cli("export", *args, "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()[-1]) > 0
    assert not out.exists()


def test_bad_weight_files_are_named(tiny_weights, tmp_path):
    broken = tmp_path / "ip.safetensors"
    broken.write_bytes(b"\x00" * 64)
    out = tmp_path / "b"
    r = run_cli("export", "--sd", str(tiny_weights["sd"]), "--ip-adapter", str(broken), "--image-encoder",
                str(tiny_weights["image_encoder"]), "--decoder", f"s1={tiny_weights['decoder-synth01']}",
                "--out", str(out))
    assert r.returncode == 2 and "ip.safetensors" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    r = run_cli("export", "--sd", str(tmp_path / "nope"), "--ip-adapter", str(tiny_weights["ip_bin"]),
                "--image-encoder", str(tiny_weights["image_encoder"]), "--decoder",
                f"s1={tiny_weights['decoder-synth01']}", "--out", str(out))
    assert r.returncode == 2 and "nope: no such SD 1.5 folder" in r.stderr
    sd = tmp_path / "sd"
    sd.mkdir()
    r = run_cli("export", "--sd", str(sd), "--ip-adapter", str(tiny_weights["ip_bin"]), "--image-encoder",
                str(tiny_weights["image_encoder"]), "--decoder", f"s1={tiny_weights['decoder-synth01']}",
                "--out", str(out))
    assert r.returncode == 2 and "missing unet/" in r.stderr


def test_from_bundle_refuses_what_it_cannot_convert(tiny_bundle, tmp_path):
    """export --from-bundle: only an fp32 ONNX bundle, as it is (no weight options), TensorRT only from a bundle
    exported for it; one line, nothing written."""
    cases = ((["--from-bundle", str(tiny_bundle), "--preset", "tiny", "--precision", "fp16"], "would need a new export"),
             (["--from-bundle", str(tmp_path), "--precision", "fp16"], "not a bundle"),
             (["--from-bundle", str(tiny_bundle), "--precision", "int8", "--target", "tensorrt", "--calibration-voxels",
               str(ROOT / "examples" / "trial.npy")], "fused attention, which TensorRT cannot parse"),
             (["--from-bundle", str(tiny_bundle)], "is fp32 already"))
    for args, message in cases:
        r = run_cli("export", *args, "--out", str(tmp_path / "b"))
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "b").exists()
