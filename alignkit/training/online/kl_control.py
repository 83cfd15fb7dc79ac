"""KL coefficient controllers and running reward statistics: small state that the online loop
updates once per step and stores in its checkpoints (plain floats, JSON-safe)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class FixedKL:
    """beta stays where it was set."""

    value: float

    def update(self, observed_kl: float, n_samples: int) -> None:
        pass

    def state(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class AdaptiveKL:
    """Adaptive KL controller (Ziegler et al. 2019, "Fine-tuning LMs from human preferences").

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n / horizon),
    with KL the observed per-sequence KL of the batch and n its number of samples
    (lm-human-preferences `AdaptiveKLController`; TRL <= 0.11 the same).
    """

    value: float
    target: float
    horizon: float = 10000.0

    def update(self, observed_kl: float, n_samples: int) -> None:
        error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon

    def state(self) -> dict[str, float]:
        return asdict(self)


def make_kl_controller(beta: float, target: float | None, horizon: float) -> FixedKL | AdaptiveKL:
    """Adaptive when a target KL is given, else fixed."""
    if target is None or target <= 0:
        return FixedKL(float(beta))
    if beta <= 0:
        raise ValueError("an adaptive KL controller (kl_target) needs beta > 0 to start from")
    return AdaptiveKL(float(beta), float(target), float(horizon))


@dataclass
class RunningMeanStd:
    """Running mean and variance over every value seen (Chan et al. parallel update).

    PPO-max's reward normalisation: r <- clip((r - mean) / std, -c, c) with the statistics of
    all rewards so far (the current batch included), as MOSS-RLHF `RunningMoments`.
    """

    mean: float = 0.0
    var: float = 1.0
    count: float = 0.0

    def update(self, values: list[float]) -> None:
        if not values:
            return
        n = float(len(values))
        batch_mean = sum(values) / n
        batch_var = sum((v - batch_mean) ** 2 for v in values) / n
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-12))

    def state(self) -> dict[str, float]:
        return asdict(self)

    def load_state(self, state: dict[str, float]) -> None:
        """Restore what `state()` returned, in place (the sampler shares this object)."""
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
