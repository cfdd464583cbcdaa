"""Ridge fitting on synthetic data with known answers, against scikit-learn, and `nsdedge fit`."""

import numpy as np
import pytest

from nsdedge.decoders.linear import read_decoder
from nsdedge.decoders.ridge import fit_ridge
from nsdedge.decoders.synth import make_synthetic
from nsdedge.eval.metrics import two_way_identification
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_train=300, n_test=60, voxels=800, factors=24, noise=3.0, seed=0)


def test_same_alpha_same_weights_as_sklearn(data):
    sklearn = pytest.importorskip("sklearn.linear_model")
    dec, _ = fit_ridge(data.x_train, data.y_train, alphas=[500.0], rescale=False)
    z = (data.x_train - dec.x_mean) / dec.x_std
    ref = sklearn.Ridge(alpha=500.0, fit_intercept=True).fit(z, data.y_train.reshape(len(z), -1))
    scale = np.abs(ref.coef_).max()
    assert np.abs(ref.coef_.T - dec.weight).max() / scale < 1e-6
    assert np.abs(ref.intercept_ - dec.bias).max() < 1e-6
    np.testing.assert_allclose(dec.predict(data.x_test).reshape(len(data.x_test), -1),
                               ref.predict((data.x_test - dec.x_mean) / dec.x_std), rtol=1e-5, atol=1e-5)


def test_loo_picks_an_interior_alpha_and_identifies_held_out_trials(data):
    """Noise 3 (voxel SNR 1:9): held-out 2-way identification > 95%."""
    grid = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6]
    dec, report = fit_ridge(data.x_train, data.y_train, alphas=grid)
    assert all(grid[0] < a < grid[-1] for a in report.alphas), report.alphas
    pred = dec.predict(data.x_test)
    assert two_way_identification(data.y_test, pred) > 0.95
    # the rescaling brings per-dimension spread back to the targets'
    assert np.std(pred, axis=0).mean() == pytest.approx(np.std(data.y_train, axis=0).mean(), rel=0.25)


def test_loo_error_matches_explicit_leave_one_out(data):
    """The closed-form LOO error equals refitting without each trial (on a small slice)."""
    x, y = data.x_train[:40], data.y_train[:40]
    _, report = fit_ridge(x, y, alphas=[50.0], rescale=False)
    errs = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        # the z-scoring statistics stay those of all trials, as in the closed form
        xm, xs = x.mean(0), x.std(0, ddof=1)
        z = (x - xm) / xs
        zk, yk = z[keep], y[keep].reshape(keep.sum(), -1)
        zc, ym = zk - zk.mean(0), yk.mean(0)
        w = zc.T @ np.linalg.solve(zc @ zc.T + 50.0 * np.eye(len(zc)), yk - ym)
        p = (z[i] - zk.mean(0)) @ w + ym
        errs.append(((y[i].reshape(-1) - p) ** 2).reshape(16, 768).mean(1))
    explicit = np.mean(errs, axis=0)
    np.testing.assert_allclose(report.loo_error, explicit, rtol=0.05)


def test_reduced_rank(data):
    full, _ = fit_ridge(data.x_train, data.y_train, alphas=[1e3])
    low, _ = fit_ridge(data.x_train, data.y_train, alphas=[1e3], rank=24)
    assert low.rank == 24 and low.weight is None
    a, b = full.predict(data.x_test), low.predict(data.x_test)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.1     # 24 latent factors: rank 24 keeps most of it
    assert two_way_identification(data.y_test, b) > 0.95


def test_fit_command(data, tmp_path):
    np.save(tmp_path / "x.npy", data.x_train.astype(np.float64))
    np.save(tmp_path / "y.npy", data.y_train)
    out = tmp_path / "dec.safetensors"
    r = run_cli("fit", "--voxels", str(tmp_path / "x.npy"), "--embeddings", str(tmp_path / "y.npy"),
                "--out", str(out), "--subject", "subj05", "--alphas", "100,1000,10000", "--rank", "16")
    assert r.returncode == 0, r.stderr
    dec = read_decoder(out)
    assert dec.subject == "subj05" and dec.rank == 16 and dec.voxels == 800
    assert set(dec.meta["alphas"]) <= {100.0, 1000.0, 10000.0}
    np.save(tmp_path / "bad.npy", data.y_train[:10])
    r = run_cli("fit", "--voxels", str(tmp_path / "x.npy"), "--embeddings", str(tmp_path / "bad.npy"),
                "--out", str(tmp_path / "d2.safetensors"))
    assert r.returncode == 2 and "expected (300, 16, 768)" in r.stderr
    assert not (tmp_path / "d2.safetensors").exists()
