"""Training the MLP decoder (`nsdedge fit --kind mlp`) on synthetic subjects with a known answer."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nsdedge.decoders.mlp import MLPConfig  # noqa: E402
from nsdedge.decoders.synth import make_subjects  # noqa: E402
from nsdedge.decoders.train import decoder_loss, token_corr, train_mlp, two_way  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

SMALL = dict(hidden=48, blocks=2, projector_hidden=48, dropout=0.1)
FIT = dict(epochs=25, batch_size=16, lr=1e-3, patience=25)


@pytest.fixture(scope="module")
def subjects():
    """Two subjects of different voxel counts sharing the factor -> token map."""
    return make_subjects(voxels=(120, 90), n_train=96, n_test=40, factors=12, noise=1.0, seed=0)


def _predict(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_training_learns_the_known_answer_and_is_reproducible(subjects):
    d = subjects[0]
    state = torch.random.get_rng_state()
    model, report = train_mlp(d.x_train, d.y_train, MLPConfig(voxels=120, **SMALL), seed=3, **FIT)
    assert torch.equal(torch.random.get_rng_state(), state)               # the caller's stream is untouched
    assert report.val_loss[-1] < report.val_loss[0] and report.train_loss[-1] < report.train_loss[0]
    pred = _predict(model, d.x_test)
    untrained = _predict(train_mlp(d.x_train, d.y_train, MLPConfig(voxels=120, **SMALL), seed=3,
                                   **{**FIT, "epochs": 1, "lr": 1e-9})[0], d.x_test)
    assert token_corr(pred, d.y_test) > 0.15 > token_corr(untrained, d.y_test) + 0.1
    assert two_way(pred, d.y_test) > 0.9
    again, _ = train_mlp(d.x_train, d.y_train, MLPConfig(voxels=120, **SMALL), seed=3, **FIT)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other, _ = train_mlp(d.x_train, d.y_train, MLPConfig(voxels=120, **SMALL), seed=4, **FIT)
    assert not torch.equal(model.input.weight, other.input.weight)
    # the z-scoring is the training split's, stored in the model
    assert torch.allclose(model.x_mean, torch.from_numpy(d.x_train).mean(0), atol=0.3)


def test_early_stopping_keeps_the_best_epoch(subjects):
    d = subjects[1]
    model, report = train_mlp(d.x_train, d.y_train, MLPConfig(voxels=90, **SMALL), epochs=40, batch_size=16,
                              lr=5e-2, patience=2, seed=0)                # too high a rate: it stops early
    assert report.epochs < 40 and report.best_epoch == int(np.argmin(report.val_loss)) + 1
    assert report.epochs - report.best_epoch == 2


def test_loss_terms():
    y = torch.randn(6, 16, 768)
    assert float(decoder_loss(y, y, clip_weight=0)) == pytest.approx(0, abs=1e-7)
    assert float(decoder_loss(3 * y, y, clip_weight=0)) == pytest.approx(0, abs=1e-6)      # normalised
    shuffled = y[torch.tensor([1, 0, 3, 2, 5, 4])]
    assert float(decoder_loss(y, y)) < float(decoder_loss(shuffled, y))                    # the contrastive term


def test_fit_command_writes_a_decoder_export_loads(subjects, tmp_path):
    from nsdedge.export.decoder_export import export_decoder, read_any_decoder

    d = subjects[0]
    np.save(tmp_path / "x.npy", d.x_train.astype(np.float64))
    np.save(tmp_path / "y.npy", d.y_train)
    out = tmp_path / "d.safetensors"
    r = run_cli("fit", "--kind", "mlp", "--voxels", str(tmp_path / "x.npy"), "--embeddings", str(tmp_path / "y.npy"),
                "--out", str(out), "--subject", "subj05", "--hidden", "32", "--blocks", "1", "--epochs", "3",
                "--batch-size", "16", "--lr", "1e-3")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "best epoch" in r.stdout and "2-way" in r.stdout
    dec = read_any_decoder(out)
    assert dec.cfg.hidden == 32 and dec.cfg.blocks == 1 and dec.cfg.voxels == 120
    files, entry = export_decoder(dec, tmp_path / "d.onnx")
    assert entry["kind"] == "mlp" and entry["parity"]["ip_tokens"] < 1e-5
    for args, says in ((["--rank", "4"], "ridge options"), (["--device", "cuda:7"], "CUDA device"),
                       (["--device", "gpu"], "choose auto, cpu, cuda or cuda:N"),
                       (["--out", str(tmp_path / "d.pt")], "written as .safetensors")):
        argv = ["fit", "--kind", "mlp", "--voxels", str(tmp_path / "x.npy"), "--embeddings", str(tmp_path / "y.npy"),
                "--out", str(tmp_path / "bad.safetensors"), "--epochs", "1", *args]
        r = run_cli(*argv)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx", "d.safetensors", "x.npy", "y.npy"]
    code = ("import sys; sys.modules['torch'] = None; from nsdedge.cli import main; sys.argv = ['nsdedge', 'fit', "
            f"'--kind', 'mlp', '--voxels', {str(tmp_path / 'x.npy')!r}, '--embeddings', {str(tmp_path / 'y.npy')!r}, "
            f"'--out', {str(tmp_path / 'z.safetensors')!r}]; main()")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "pip install 'nsdedge[train]'" in p.stderr and len(p.stderr.strip().splitlines()) == 1
