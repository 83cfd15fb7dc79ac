"""CGPO's constrained, calibrated reward (Xu et al. 2024, "The Perfect Blend: Redefining RLHF
with Mixture of Judges", arXiv 2409.20370): the reward CRPG's policy gradient weighs.

A mixture of judges J_1..J_K labels each sample (s, a): psi_k(s, a) = 1 when judge k finds the
constraint satisfied, 0 when it finds it violated. CRPG ("calibrated-regularized policy
gradient") trains on

    r~(s, a) = prod_k psi_k(s, a) * sigma(R(s, a) - R(s, a_bar)),

the calibrated reward sigma(R(s, a) - R(s, a_bar)) (the reward model's Bradley-Terry
probability that a beats a baseline response a_bar of the same prompt, so rewards of different
prompts share one scale in (0, 1)) on the samples that satisfy every constraint, and 0 on any
sample a judge rejects (the bottom of that scale). Without a baseline response the baseline
reward is 0: r~ = psi sigma(R).

Checked against the CGPO port in TRL (`CGPOTrainer.crpg_optimization`, huggingface/trl PR
branch trl/trainer/cgpo_trainer.py): `judgements * sigmoid(rewards - baseline_rewards)`, with
the baseline the dataset's completion of the prompt. That port also multiplies by a KL
factor max(0, 1 - KL / kl_threshold); alignkit's `cgpo_crpg` preset regularises with the
online loop's KL penalty and takes that factor as an option (`training/online/cgpo.py`). The
paper's own text was not available to check here beyond its abstract, so the formulas follow
the port.
"""

from __future__ import annotations

import torch
from torch import Tensor


def constrained_calibrated_reward(rewards: Tensor, satisfied: Tensor, baseline_rewards: Tensor | None = None) -> Tensor:
    """r~ = prod_k psi_k * sigma(R - R_baseline).

    Shapes: rewards (N,), satisfied (N, K) bool (K >= 0 judges; K = 0 leaves every sample
    unconstrained), baseline_rewards (N,) or None (0) -> (N,) float32 in [0, 1).

    Worked example: R = (2, 0), baseline (0, 0), psi = ((1, 1), (1, 0)):
    r~ = (sigma(2), 0) = (0.8808, 0).
    """
    if rewards.dim() != 1 or satisfied.dim() != 2 or satisfied.shape[0] != rewards.shape[0]:
        raise ValueError(f"constrained_calibrated_reward: rewards (N,) and satisfied (N, K); got "
                         f"{tuple(rewards.shape)} and {tuple(satisfied.shape)}")
    baseline = torch.zeros_like(rewards) if baseline_rewards is None else baseline_rewards.to(rewards)
    if baseline.shape != rewards.shape:
        raise ValueError(f"constrained_calibrated_reward: baseline_rewards {tuple(baseline.shape)} for rewards "
                         f"{tuple(rewards.shape)}")
    feasible = satisfied.bool().all(dim=-1)  # (N,)
    return torch.where(feasible, torch.sigmoid(rewards.float() - baseline.float()), 0.0)


def violation_rates(satisfied: Tensor) -> Tensor:
    """Share of samples each judge rejects: satisfied (N, K) -> (K,) in [0, 1]."""
    if satisfied.dim() != 2:
        raise ValueError(f"violation_rates: satisfied must be (N, K), got {tuple(satisfied.shape)}")
    return 1.0 - satisfied.float().mean(dim=0)


__all__ = ["constrained_calibrated_reward", "violation_rates"]
