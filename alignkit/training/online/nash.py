"""Nash-MD's opponent and judge (Munos et al. 2023, "Nash Learning from Human Feedback"; the
practical form of TRL's NashMDTrainer, ALGORITHMS.md 2.13): the `nash_md` preset.

Each prompt gets a policy sample y ~ pi_theta (trained on) and an opponent sample y' from the
geometric mixture pi_mix ∝ pi_theta^(1 - alpha) pi_ref^alpha (`alignkit.rollout.mixture`,
alpha = mixture_coef). A judge gives p = P(y > y' | x): a pairwise preference model
(`--preference-model DIR`, trained with `alignkit train preference_model`, symmetrised over
both orders) or, from the run's reward r, the Bradley-Terry probability sigmoid(r(y) - r(y')).
The update is REINFORCE with 0.5 as the control variate and the KL by REINFORCE:

    L = -sum_t [(p - 0.5) - beta sg(log pi_theta(y_t) - log pi_ref(y_t))] log pi_theta(y_t),

i.e. the `sequence_reward` advantage A_t = (p - 0.5) - beta u_t with policy_loss=reinforce,
summed over tokens and averaged over samples (TRL: loss = beta kl_div_loss - score).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from alignkit.rollout import SamplingParams
from alignkit.training.online.roles import SequenceBatch, decode_completions

OPPONENT_ROUND = 7_000
"""The engine seed of the opponent's samples is step_seed(seed, step, OPPONENT_ROUND + round):
noise independent of the policy samples' (a shared seed would draw the same uniforms)."""


def bradley_terry(scores: Tensor, opponent_scores: Tensor) -> Tensor:
    """P(y > y') = sigmoid(r(y) - r(y')): (N,), (N,) -> (N,)."""
    return torch.sigmoid(scores.float() - opponent_scores.float())


class NashOpponent:
    """Samples the opponents of a step's policy samples and judges each pair: p = P(y > y')."""

    def __init__(self, engine, scorer, tokenizer, *, judge=None, device=None) -> None:
        self.engine, self.scorer, self.tokenizer, self.judge, self.device = engine, scorer, tokenizer, judge, device

    def preferences(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams, policy_batch: SequenceBatch,
                    prompts: list[str], completions: list[str], columns: dict[str, list],
                    policy_scores: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        """(p (N,), metrics): the opponents of the n samples of each prompt, sampled with
        `sampling` (its seed the opponent's), judged against the policy samples (rows aligned:
        sample j of prompt i against opponent j of prompt i)."""
        rollout = self.engine.generate(prompt_ids, n, sampling)
        opponents = decode_completions(self.tokenizer, rollout)
        metrics = {"nash/opponent_length": rollout.lengths.float().mean().item()}
        if self.judge is not None:
            p = self.judge.prob(prompts, completions, opponents).to(self.device)
        else:
            batch = SequenceBatch.from_rollout(rollout, self.tokenizer.pad_token_id).to(self.device)
            opponent_scores = self.scorer.score(batch, prompts, opponents, columns)[0].to(self.device)
            p = bradley_terry(policy_scores.to(self.device), opponent_scores)
            metrics.update({"nash/policy_reward": policy_scores.float().mean().item(),
                            "nash/opponent_reward": opponent_scores.mean().item()})
        metrics["nash/win_rate"] = (p > 0.5).float().mean().item()
        return p, metrics


def build_opponent(config: Any, s: Any, model, reference_model, scorer, tokenizer, device) -> NashOpponent:
    """nash_md's opponent: a MixtureEngine of the policy and the reference (the policy with its
    adapter off under LoRA) and the judge (--preference-model, else Bradley-Terry on the reward)."""
    from alignkit.rewards.preference import PreferenceJudge
    from alignkit.rollout.mixture import MixtureEngine
    from alignkit.training.online.roles import eos_ids

    engine = MixtureEngine(model, reference_model, s.mixture_coef, pad_id=tokenizer.pad_token_id,
                           eos_ids=eos_ids(tokenizer, model), max_batch_size=s.generation_batch_size or None)
    judge = PreferenceJudge(config.preference_model, device=str(device)) if config.preference_model else None
    return NashOpponent(engine, scorer, tokenizer, judge=judge, device=device)
