"""Weights that would have been exported wrong, or failed late with a traceback, are one WeightsError naming the file,
before any tracing (review of 2026-11-27: each failed before its fix)."""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from safetensors.torch import load_file, save_file  # noqa: E402

from nsdedge.bundle import BundleWriter  # noqa: E402
from nsdedge.errors import WeightsError  # noqa: E402


def test_a_folder_missing_weights_is_refused_not_filled_with_random_values(tiny_weights, tmp_path):
    from nsdedge.export.few_step import load_tiny_vae
    from nsdedge.export.sources import load_image_encoder, load_sd15

    enc = tmp_path / "image_encoder"
    shutil.copytree(tiny_weights["image_encoder"], enc)
    state = load_file(enc / "model.safetensors")
    gone = next(k for k in state if k.endswith("q_proj.weight"))
    save_file({k: v for k, v in state.items() if k != gone}, enc / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=rf"missing keys: .*{gone}"):
        load_image_encoder(enc)
    load_image_encoder(tiny_weights["image_encoder"])                    # the complete folder loads
    no_proj = tmp_path / "no_projection"                                  # IP-Adapter reads hidden states only
    shutil.copytree(tiny_weights["image_encoder"], no_proj)
    save_file({k: v for k, v in state.items() if not k.startswith("visual_projection.")},
              no_proj / "model.safetensors", metadata={"format": "pt"})
    load_image_encoder(no_proj)
    with pytest.raises(WeightsError, match="not a complete AutoencoderTiny"):
        load_tiny_vae(tiny_weights["sd"] / "vae")                         # an AutoencoderKL is not a TAESD
    sd = tmp_path / "sd15"
    shutil.copytree(tiny_weights["sd"], sd)
    (sd / "scheduler" / "scheduler_config.json").write_text("[]")
    with pytest.raises(WeightsError, match="not a JSON object"):
        load_sd15(sd)


def test_ip_adapter_weights_must_be_finite_tensors(tiny_weights, tmp_path):
    from nsdedge.export.ip_adapter import read_ip_adapter

    flat = load_file(tiny_weights["ip_safetensors"])
    key = next(iter(flat))
    flat[key] = torch.full_like(flat[key], float("nan"))
    save_file(flat, tmp_path / "nan.safetensors")
    with pytest.raises(WeightsError, match=f"{key[len('image_proj.'):]}.*NaN"):
        read_ip_adapter(tmp_path / "nan.safetensors")
    torch.save({"image_proj": ["a"], "ip_adapter": {}}, tmp_path / "lists.bin")
    with pytest.raises(WeightsError, match="dicts of tensors"):
        read_ip_adapter(tmp_path / "lists.bin")
    lfs = tmp_path / "pointer.bin"                                        # a git-lfs pointer, not the weights
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(WeightsError, match="not a weights-only torch file"):
        read_ip_adapter(lfs)


def test_decoders_must_make_16_by_768_finite_tokens(tmp_path):
    from nsdedge.decoders.linear import LinearDecoder, read_decoder
    from nsdedge.decoders.mlp import BrainGuardMLP, MLPConfig, read_mlp

    rng = np.random.default_rng(0)
    d = 8 * 768
    LinearDecoder("subj01", x_mean=np.zeros(10, np.float32), x_std=np.ones(10, np.float32),
                  bias=np.zeros(d, np.float32), weight=rng.standard_normal((10, d)).astype(np.float32),
                  tokens=8).save(tmp_path / "tok8.safetensors")
    with pytest.raises(WeightsError, match="8 x 768 tokens"):
        read_decoder(tmp_path / "tok8.safetensors")
    no_blocks = BrainGuardMLP(MLPConfig(voxels=10, hidden=8, blocks=0, projector_hidden=8))   # fit --blocks 0
    save_file({k: v.contiguous() for k, v in no_blocks.state_dict().items()}, tmp_path / "b0.safetensors",
              metadata=no_blocks.metadata("subj01"))
    read_mlp(tmp_path / "b0.safetensors")
    model = BrainGuardMLP(MLPConfig(voxels=10, hidden=8, blocks=1, projector_hidden=8))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = model.metadata("subj01")
    save_file(state, tmp_path / "ok.safetensors", metadata=meta)
    read_mlp(tmp_path / "ok.safetensors")
    bad_order = {**meta, "config": json.dumps({**json.loads(meta["config"]), "block_order": "bogus"})}
    save_file(state, tmp_path / "order.safetensors", metadata=bad_order)
    with pytest.raises(WeightsError, match="unknown block order"):
        read_mlp(tmp_path / "order.safetensors")
    bad_size = {**meta, "config": json.dumps({**json.loads(meta["config"]), "voxels": -10})}
    save_file(state, tmp_path / "size.safetensors", metadata=bad_size)
    with pytest.raises(WeightsError, match="sizes out of range"):
        read_mlp(tmp_path / "size.safetensors")
    nan = dict(state)
    nan["head.weight"] = torch.full_like(nan["head.weight"], float("nan"))
    save_file(nan, tmp_path / "nan.safetensors", metadata=meta)
    with pytest.raises(WeightsError, match="head.weight .*NaN"):
        read_mlp(tmp_path / "nan.safetensors")


def test_a_failed_export_removes_the_folders_it_made(tmp_path):
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "theirs.txt").write_text("x")
    for out in (tmp_path / "a" / "b" / "bundle", tmp_path / "kept" / "new" / "bundle",
                tmp_path / "c" / ".." / "d" / "bundle"):
        with pytest.raises(RuntimeError):
            with BundleWriter(out):
                raise RuntimeError("a late failure")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["theirs.txt"]


def test_export_with_bad_weights_or_settings_prints_only_the_error(tiny_weights, tmp_path):
    """No progress line comes before what is checked (weights, then export's settings): stderr is the one error."""
    from tests.conftest import one_line_error, run_cli

    sd = tmp_path / "sd15"
    shutil.copytree(tiny_weights["sd"], sd)
    unet = next((sd / "unet").glob("*.safetensors"))
    state = load_file(unet)
    gone = next(iter(state))
    save_file({k: v for k, v in state.items() if k != gone}, unet, metadata={"format": "pt"})
    common = ["--ip-adapter", str(tiny_weights["ip_safetensors"]), "--image-encoder", str(tiny_weights["image_encoder"]),
              "--decoder", f"subj01={tiny_weights['decoder-synth01']}"]
    one_line_error(run_cli("export", "--sd", str(sd), *common, "--out", str(tmp_path / "a")), "missing keys", gone)
    one_line_error(run_cli("export", "--sd", str(tiny_weights["sd"]), *common, "--resolution", "99",
                           "--out", str(tmp_path / "b")), "--resolution 99")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_adapter_for_another_token_width_is_refused_before_tracing(tmp_path):
    """An SD 1.5 IP-Adapter (768-wide tokens) with a UNet whose cross-attention takes another width (SD 2.x: 1024):
    one WeightsError naming both widths, before anything is traced or written."""
    from diffusers import UNet2DConditionModel

    from nsdedge.export.build import export_bundle
    from nsdedge.export.presets import build_preset

    src = build_preset("tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        src.unet = UNet2DConditionModel.from_config({**src.unet.config, "cross_attention_dim": 512}).eval()
    with pytest.raises(WeightsError, match="tokens 768 wide, the UNet's cross-attention takes 512"):
        export_bundle(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
