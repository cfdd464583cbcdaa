import numpy as np

from nsdedge.eval.metrics import two_way_identification


def test_two_way_equals_direct_loop():
    rng = np.random.default_rng(0)
    real, pred = rng.standard_normal((12, 30)), rng.standard_normal((12, 30))
    n = len(real)
    corr = lambda a, b: np.corrcoef(a, b)[0, 1]  # noqa: E731
    expected = np.mean([sum(corr(real[i], pred[j]) < corr(real[j], pred[j]) for i in range(n)) / (n - 1)
                        for j in range(n)])
    assert two_way_identification(real, pred) == expected


def test_known_answers():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 50))
    assert two_way_identification(x, x) == 1.0
    shuffled = two_way_identification(x, x[rng.permutation(200)])
    assert 0.4 < shuffled < 0.6


def test_ssim_and_psnr_match_scikit_image():
    import pytest
    metrics = pytest.importorskip("skimage.metrics")
    from nsdedge.eval.metrics import psnr, ssim

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (48, 48, 3)).astype(np.float64)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255)
    ref = metrics.structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=255)
    assert abs(ssim(a, b) - ref) < 1e-9
    assert abs(psnr(a, b) - metrics.peak_signal_noise_ratio(a, b, data_range=255)) < 1e-9
    assert ssim(a, a) == pytest.approx(1.0) and psnr(a, a) == float("inf")
