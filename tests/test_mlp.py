"""The BrainGuard-style MLP decoder: both block orders, loading from safetensors and torch files, export."""

import pytest

torch = pytest.importorskip("torch")

from nsdedge.decoders.mlp import BrainGuardMLP, MLPConfig, read_mlp  # noqa: E402
from nsdedge.errors import WeightsError  # noqa: E402

SMALL = dict(voxels=48, hidden=32, blocks=2, projector_hidden=24)


def _model(order, seed=0):
    torch.manual_seed(seed)
    m = BrainGuardMLP(MLPConfig(block_order=order, **SMALL)).eval()
    m.x_mean.normal_()
    m.x_std.uniform_(0.5, 2.0)
    return m


@pytest.mark.parametrize("order", ["linear-ln-gelu", "linear-gelu-ln"])
def test_loads_from_safetensors_and_state_dict(order, tmp_path):
    m = _model(order)
    x = torch.randn(3, 48)
    m.save(tmp_path / "m.safetensors", "subj02")
    torch.save(m.state_dict(), tmp_path / "m.pt")
    a, subject = read_mlp(tmp_path / "m.safetensors")
    b, _ = read_mlp(tmp_path / "m.pt")                      # config read off the keys and shapes
    assert subject == "subj02" and b.cfg.block_order == order and b.cfg.blocks == 2
    with torch.no_grad():
        ref = m(x)
        assert ref.shape == (3, 16, 768)
        torch.testing.assert_close(a(x), ref)
        torch.testing.assert_close(b(x), ref)


def test_mismatch_named_by_key_and_shape(tmp_path):
    sd = _model("linear-ln-gelu").state_dict()
    sd["head.weight"] = sd["head.weight"][:100]
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="bad.pt"):
        read_mlp(tmp_path / "bad.pt")
    sd = _model("linear-ln-gelu").state_dict()
    with pytest.raises(WeightsError, match=r"ok.pt: key x_mean has shape \(48,\), expected \(47,\)"):
        torch.save(sd, tmp_path / "ok.pt")
        read_mlp(tmp_path / "ok.pt", MLPConfig(voxels=47, hidden=32, blocks=2, projector_hidden=24))


def test_onnx_export_parity(tmp_path):
    pytest.importorskip("onnx")
    from nsdedge.export.decoder_export import export_mlp_decoder

    m = _model("linear-gelu-ln")
    m.subject = "subj07"
    files, entry = export_mlp_decoder(m, tmp_path / "d.onnx")
    assert files == ["d.onnx"] and entry["parity"]["ip_tokens"] < 1e-5 and entry["kind"] == "mlp"


def test_bundle_with_two_subjects_of_both_kinds(two_subject_bundle, tmp_path):
    """--decoder with a preset: the preset's synthetic ridge subject plus an MLP subject, run by --subject."""
    import numpy as np

    from nsdedge.bundle import read_manifest
    from tests.conftest import run_cli

    out = two_subject_bundle
    m = read_manifest(out)
    assert m.subjects == {"synth01": "decoder-synth01", "subj02": "decoder-subj02"}
    assert m.components["decoder-subj02"].extra["kind"] == "mlp"
    np.save(tmp_path / "v.npy", np.zeros(48, np.float32))
    r = run_cli("run", "--voxels", str(tmp_path / "v.npy"), "--bundle", str(out), "--steps", "2",
                "--out", str(tmp_path / "o.png"))
    assert r.returncode == 2 and "choose one with --subject" in r.stderr
    r = run_cli("run", "--voxels", str(tmp_path / "v.npy"), "--bundle", str(out), "--subject", "subj02",
                "--steps", "2", "--out", str(tmp_path / "o.png"))
    assert r.returncode == 0, r.stderr
