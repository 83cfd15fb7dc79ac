"""Reward over-optimisation maths (Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model
Overoptimization"): unbiased best-of-n curves, the analytic best-of-n KL, and the two
functional forms fitted to gold reward against the distance d = sqrt(KL(pi || pi_init)).

Pure numpy; the driver that samples models and writes plots is `alignkit.lab.overopt_lab`.

Best-of-n from a fixed pool (Gao et al. §3.1, appendix): draw N >= n samples per prompt once,
score them with the proxy and the gold reward, sort them ascending by proxy score
(rank i = 1..N). The proxy-argmax of a uniformly random n-subset (without replacement) is the
item of rank i exactly when the other n - 1 members come from the i - 1 items below it, so

    P(best = i) = C(i - 1, n - 1) / C(N, n),     E[g(best of n)] = sum_i P(best = i) g_(i)

for any per-sample value g (gold or proxy score). This is the exact average over all C(N, n)
subsets, hence unbiased for the best-of-n of the sampling policy, with far less variance than
drawing subsets at random. Ties in the proxy are broken uniformly at random, which in
expectation is the same as giving every member of a tied group the group's mean value of g
(the members are exchangeable, so each is the argmax equally often).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


def bon_kl(n: int | np.ndarray) -> np.ndarray:
    """Analytic KL(pi_bon || pi) of best-of-n sampling: log n - (n - 1) / n (Gao et al. 2022;
    Stiennon et al. 2020). Exact for continuous, tie-free proxy scores; an upper bound
    otherwise (Beirami et al. 2024).

    >>> [round(float(v), 4) for v in bon_kl(np.array([1, 2, 4]))]
    [0.0, 0.1931, 0.6363]
    """
    n = np.asarray(n, dtype=np.float64)
    if np.any(n < 1):
        raise ValueError("n must be >= 1")
    return np.log(n) - (n - 1.0) / n


def _log_comb(a: np.ndarray, b: int) -> np.ndarray:
    """log C(a, b) elementwise for integer arrays a >= b >= 0 (lgamma, no overflow)."""
    lgamma = np.vectorize(math.lgamma, otypes=[np.float64])
    return lgamma(a + 1.0) - lgamma(b + 1.0) - lgamma(a - b + 1.0)


def bon_weights(pool_size: int, n: int) -> np.ndarray:
    """P(rank i is the best of a random n-subset) = C(i-1, n-1) / C(N, n), i = 1..N: (N,).

    Sums to 1; zero for i < n.

    >>> bon_weights(4, 2).tolist()  # C(i-1, 1) / C(4, 2) = (0, 1, 2, 3) / 6
    [0.0, 0.16666666666666666, 0.3333333333333333, 0.5]
    """
    if not 1 <= n <= pool_size:
        raise ValueError(f"need 1 <= n <= pool size; got n={n}, N={pool_size}")
    ranks = np.arange(1, pool_size + 1, dtype=np.float64)
    weights = np.zeros(pool_size)
    eligible = ranks >= n
    weights[eligible] = np.exp(
        _log_comb(ranks[eligible] - 1.0, n - 1) - _log_comb(np.float64(pool_size), n)
    )
    return weights


def _tie_averaged(sorted_proxy: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    """Replace each value by its mean over the run of equal proxy scores it belongs to: (N,)."""
    out = sorted_values.astype(np.float64).copy()
    start = 0
    size = len(sorted_proxy)
    while start < size:
        end = start + 1
        while end < size and sorted_proxy[end] == sorted_proxy[start]:
            end += 1
        if end - start > 1:
            out[start:end] = out[start:end].mean()
        start = end
    return out


def best_of_n_values(
    proxy: np.ndarray, values: np.ndarray, ns: list[int] | np.ndarray
) -> np.ndarray:
    """E[value of the proxy-argmax among n of the N pooled samples], per prompt and per n.

    Shapes: proxy, values (P, N) (or (N,) for one prompt); returns (len(ns), P).
    See the module docstring for the estimator.
    """
    proxy = np.atleast_2d(np.asarray(proxy, dtype=np.float64))
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    if proxy.shape != values.shape:
        raise ValueError(f"proxy {proxy.shape} and values {values.shape} differ in shape")
    pool_size = proxy.shape[1]
    weights = np.stack([bon_weights(pool_size, int(n)) for n in ns])  # (len(ns), N)
    sorted_values = np.empty_like(values)
    for row in range(proxy.shape[0]):
        order = np.argsort(proxy[row], kind="stable")
        sorted_values[row] = _tie_averaged(proxy[row][order], values[row][order])
    return weights @ sorted_values.T  # (len(ns), P)


def bon_curve(
    proxy: np.ndarray, gold: np.ndarray, ns: list[int] | None = None
) -> dict[str, list[float]]:
    """Best-of-n curve averaged over prompts: n, KL, d = sqrt(KL), mean proxy and gold reward.

    Shapes: proxy, gold (P, N). `ns` defaults to 1..N.
    """
    proxy = np.atleast_2d(np.asarray(proxy, dtype=np.float64))
    ns = list(range(1, proxy.shape[1] + 1)) if ns is None else [int(n) for n in ns]
    kl = bon_kl(np.array(ns))
    return {
        "n": ns,
        "kl": kl.tolist(),
        "d": np.sqrt(kl).tolist(),
        "proxy": best_of_n_values(proxy, proxy, ns).mean(axis=1).tolist(),
        "gold": best_of_n_values(proxy, gold, ns).mean(axis=1).tolist(),
    }


@dataclass
class CurveFit:
    """Least-squares fit of one of Gao et al.'s forms: R(d) = d (alpha - beta f(d)).

    form "bon": f(d) = d;  form "rl": f(d) = log d (with d log d -> 0 at d = 0).
    `rmse` is the root-mean-square residual, `r2` the coefficient of determination
    (against the mean of the fitted rewards).
    """

    form: str
    alpha: float
    beta: float
    rmse: float
    r2: float

    def predict(self, d: np.ndarray) -> np.ndarray:
        return _design(np.asarray(d, dtype=np.float64), self.form) @ np.array(
            [self.alpha, self.beta]
        )

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


def _design(d: np.ndarray, form: str) -> np.ndarray:
    """Columns [d, -d f(d)] so that R = [alpha, beta] . columns: (K, 2)."""
    if form == "bon":
        shape = d * d
    elif form == "rl":
        safe = np.where(d > 0, d, 1.0)
        shape = np.where(d > 0, d * np.log(safe), 0.0)
    else:
        raise ValueError(f"form must be 'bon' or 'rl'; got {form!r}")
    return np.stack([d, -shape], axis=1)


def fit_overoptimization(d: np.ndarray, reward: np.ndarray, form: str) -> CurveFit:
    """Fit R(d) = d (alpha - beta d) ("bon") or d (alpha - beta log d) ("rl") by least squares.

    Both forms are linear in (alpha, beta), so the fit is one `lstsq` solve of
    [d, -d f(d)] [alpha, beta]^T = R. `reward` must be measured relative to the initial
    policy (Gao et al. plot gold(d) - gold(0)), since both forms pass through R(0) = 0.
    Shapes: d, reward (K,) with K >= 2.
    """
    d = np.asarray(d, dtype=np.float64).reshape(-1)
    reward = np.asarray(reward, dtype=np.float64).reshape(-1)
    if d.shape != reward.shape or d.size < 2:
        raise ValueError(
            f"need matching d and reward with >= 2 points; got {d.shape}, {reward.shape}"
        )
    if np.any(d < 0) or not np.all(np.isfinite(d)) or not np.all(np.isfinite(reward)):
        raise ValueError("d must be finite and >= 0, reward finite")
    design = _design(d, form)
    (alpha, beta), *_ = np.linalg.lstsq(design, reward, rcond=None)
    residual = reward - design @ np.array([alpha, beta])
    total = float(((reward - reward.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else float("nan")
    return CurveFit(form, float(alpha), float(beta), float(np.sqrt((residual**2).mean())), r2)
