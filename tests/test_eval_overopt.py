"""Best-of-n estimator, analytic best-of-n KL and the Gao et al. curve fits."""

import itertools
import math

import numpy as np
import pytest

from alignkit.eval.overopt import (
    best_of_n_values,
    bon_curve,
    bon_kl,
    bon_weights,
    fit_overoptimization,
)


def _brute_force(proxy: np.ndarray, gold: np.ndarray, n: int) -> float:
    """Average over all C(N, n) subsets of the gold of the proxy-argmax, ties split evenly."""
    total, count = 0.0, 0
    for subset in itertools.combinations(range(len(proxy)), n):
        best = max(proxy[list(subset)])
        tied = [i for i in subset if proxy[i] == best]
        total += float(np.mean(gold[tied]))
        count += 1
    assert count == math.comb(len(proxy), n)
    return total / count


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bon_estimator_matches_enumeration_of_all_subsets(seed):
    rng = np.random.default_rng(seed)
    pool = 7
    proxy = rng.normal(size=(2, pool))
    gold = proxy + rng.normal(size=(2, pool))
    ns = list(range(1, pool + 1))
    estimate = best_of_n_values(proxy, gold, ns)  # (N, P)
    for row in range(2):
        for n in ns:
            assert estimate[n - 1, row] == pytest.approx(
                _brute_force(proxy[row], gold[row], n), abs=1e-12
            )


def test_bon_estimator_with_tied_proxy_scores_matches_random_tie_breaking():
    rng = np.random.default_rng(3)
    proxy = rng.integers(0, 3, size=8).astype(float)  # many ties
    gold = rng.normal(size=8)
    for n in range(1, 9):
        assert best_of_n_values(proxy, gold, [n])[0, 0] == pytest.approx(
            _brute_force(proxy, gold, n), abs=1e-12
        )


def test_bon_weights_worked_example_and_normalisation():
    """N = 4, n = 2: C(i-1, 1) / C(4, 2) = (0, 1, 2, 3) / 6; n = 1 is uniform; n = N picks the top."""
    np.testing.assert_allclose(bon_weights(4, 2), np.array([0, 1, 2, 3]) / 6, atol=1e-15)
    np.testing.assert_allclose(bon_weights(5, 1), np.full(5, 0.2), atol=1e-15)
    np.testing.assert_allclose(bon_weights(5, 5), [0, 0, 0, 0, 1], atol=1e-15)
    for n in (1, 7, 300):  # large N stays finite through lgamma
        assert bon_weights(512, n).sum() == pytest.approx(1.0, abs=1e-9)


def test_bon_curve_endpoints():
    """n = 1 is the pool mean; n = N is the proxy-argmax of the pool; the proxy curve rises."""
    proxy = np.array([[0.1, 0.5, 0.3], [1.0, -1.0, 0.0]])
    gold = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    curve = bon_curve(proxy, gold)
    assert curve["n"] == [1, 2, 3]
    assert curve["gold"][0] == pytest.approx(gold.mean())
    assert curve["gold"][-1] == pytest.approx((2.0 + 4.0) / 2)
    assert np.all(np.diff(curve["proxy"]) > 0)


def test_bon_kl_analytic_values():
    """KL_bon = log n - (n-1)/n: n=1 -> 0, n=2 -> log 2 - 1/2, n=64 -> log 64 - 63/64."""
    np.testing.assert_allclose(
        bon_kl(np.array([1, 2, 4, 64])),
        [0.0, math.log(2) - 0.5, math.log(4) - 0.75, math.log(64) - 63 / 64],
        rtol=0,
        atol=1e-12,
    )
    with pytest.raises(ValueError):
        bon_kl(0)


@pytest.mark.parametrize("form, alpha, beta", [("bon", 1.3, 0.45), ("rl", 0.8, 0.6)])
def test_curve_fit_recovers_planted_coefficients(form, alpha, beta):
    rng = np.random.default_rng(0)
    d = np.linspace(0.0, 4.0, 60)
    shape = d * d if form == "bon" else np.where(d > 0, d * np.log(np.where(d > 0, d, 1)), 0.0)
    reward = alpha * d - beta * shape
    exact = fit_overoptimization(d, reward, form)
    assert (exact.alpha, exact.beta) == (
        pytest.approx(alpha, abs=1e-10),
        pytest.approx(beta, abs=1e-10),
    )
    assert exact.r2 == pytest.approx(1.0)
    noisy = fit_overoptimization(d, reward + rng.normal(scale=0.02, size=d.size), form)
    assert noisy.alpha == pytest.approx(alpha, abs=0.03)
    assert noisy.beta == pytest.approx(beta, abs=0.03)
    np.testing.assert_allclose(exact.predict(d), reward, atol=1e-9)
