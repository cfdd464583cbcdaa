import numpy as np

from nsdedge.evaluate import two_way_identification


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
