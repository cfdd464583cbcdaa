"""The linear decoder: folding, file round trip, ONNX parity, clear errors."""

import numpy as np
import pytest

from nsdedge.decoders.linear import LinearDecoder, read_decoder, synthetic_decoder
from nsdedge.errors import WeightsError


def _full_rank(seed=0, v=40):
    rng = np.random.default_rng(seed)
    d = 16 * 768
    return LinearDecoder(subject="subj01", x_mean=rng.standard_normal(v), x_std=rng.uniform(0.5, 2, v),
                         bias=rng.standard_normal(d), weight=rng.standard_normal((v, d)) * 0.1,
                         pred_mean=rng.standard_normal(d) * 0.1, pred_std=rng.uniform(0.2, 1, d),
                         target_mean=rng.standard_normal(d) * 0.1, target_std=rng.uniform(0.5, 1.5, d))


@pytest.mark.parametrize("make", [_full_rank, lambda: synthetic_decoder("s", 50, rank=8, seed=3)])
def test_folded_equals_reference(make):
    dec = make()
    x = np.random.default_rng(1).standard_normal((5, dec.voxels))
    mats, c = dec.folded()
    y = x.astype(np.float64)
    for m in mats:
        y = y @ m
    np.testing.assert_allclose((y + c).reshape(5, 16, 768), dec.predict(x), rtol=1e-4, atol=1e-5)


def test_file_round_trip(tmp_path):
    dec = _full_rank()
    dec.save(tmp_path / "d.safetensors")
    back = read_decoder(tmp_path / "d.safetensors")
    x = np.random.default_rng(2).standard_normal((3, dec.voxels))
    np.testing.assert_allclose(back.predict(x), dec.predict(x), rtol=1e-5, atol=1e-5)
    assert back.subject == "subj01" and back.voxels == 40 and back.rank is None and back.rescaled


def test_onnx_parity(tmp_path):
    pytest.importorskip("onnx")
    from nsdedge.export.decoder_export import export_linear_decoder

    for dec in (_full_rank(), synthetic_decoder("s", 64, rank=4, seed=1)):
        files, entry = export_linear_decoder(dec, tmp_path / "d.onnx")
        assert files == ["d.onnx"] and entry["parity"]["ip_tokens"] < 1e-5


def test_bad_decoder_files(tmp_path):
    from safetensors.numpy import save_file

    with pytest.raises(WeightsError, match="no such decoder file"):
        read_decoder(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="junk.safetensors"):
        read_decoder(tmp_path / "junk.safetensors")
    dec = synthetic_decoder("s", 10, rank=2, seed=0)
    dec.save(tmp_path / "ok.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ok.safetensors"), framework="numpy") as f:
        meta, arrays = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    arrays["vt"] = arrays["vt"][:, :100]
    save_file(arrays, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(WeightsError, match=r"bad.safetensors: key vt has shape \(2, 100\)"):
        read_decoder(tmp_path / "bad.safetensors")
    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="not an nsdedge ridge decoder"):
        read_decoder(tmp_path / "other.safetensors")
