"""IP-Adapter-Plus checkpoints: both official layouts, and clear errors for wrong keys or shapes."""

import pickle

import pytest

torch = pytest.importorskip("torch")

from nsdedge.errors import WeightsError  # noqa: E402
from nsdedge.export.ip_adapter import ResamplerConfig, read_ip_adapter, save_ip_adapter  # noqa: E402


def test_bin_and_safetensors_hold_the_same_weights(tiny_weights):
    a = read_ip_adapter(tiny_weights["ip_bin"])
    b = read_ip_adapter(tiny_weights["ip_safetensors"])
    assert a.resampler == b.resampler
    assert a.resampler.num_queries == 16 and a.resampler.output_dim == 768
    assert set(a.ip_adapter) == set(b.ip_adapter)
    for k in a.image_proj:
        assert torch.equal(a.image_proj[k], b.image_proj[k])
    for k in a.ip_adapter:
        assert torch.equal(a.ip_adapter[k], b.ip_adapter[k])


def test_official_sd15_resampler_shapes():
    s = ResamplerConfig().shapes()
    assert s["latents"] == (1, 16, 768)
    assert s["proj_in.weight"] == (768, 1280)
    assert s["layers.3.0.to_kv.weight"] == (1536, 768)
    assert s["layers.0.1.1.weight"] == (3072, 768)


def test_wrong_shape_names_file_and_key(tiny_weights, tmp_path):
    w = read_ip_adapter(tiny_weights["ip_bin"])
    w.image_proj["proj_out.weight"] = torch.zeros(768, 3)
    bad = tmp_path / "bad.safetensors"
    save_ip_adapter(w, bad)
    with pytest.raises(WeightsError, match=r"bad\.safetensors.*image_proj\.proj_out\.weight"):
        read_ip_adapter(bad)


def test_missing_key_is_named(tiny_weights, tmp_path):
    w = read_ip_adapter(tiny_weights["ip_bin"])
    del w.image_proj["norm_out.bias"]
    bad = tmp_path / "bad.bin"
    save_ip_adapter(w, bad)
    with pytest.raises(WeightsError, match=r"missing key image_proj\.norm_out\.bias"):
        read_ip_adapter(bad)


def test_pickled_code_is_never_executed(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("open('/tmp/nsdedge-pwned', 'w').write('x')",))

    bad = tmp_path / "evil.bin"
    bad.write_bytes(pickle.dumps({"image_proj": Boom(), "ip_adapter": {}}))
    with pytest.raises(WeightsError, match="evil.bin") as e:
        read_ip_adapter(bad)
    assert "never loads" in str(e.value) and "weights_only=False" not in str(e.value)   # not torch's unsafe advice


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="x.safetensors"):
        read_ip_adapter(bad)
