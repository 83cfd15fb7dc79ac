"""Online algorithms as data: each preset is a dict of choices over ONE loop (`loop.py`).

| preset       | advantage            | policy loss          | aggregation         | KL (default beta, estimator, place) | critic |
|--------------|----------------------|----------------------|---------------------|-------------------------------------|--------|
| ppo          | gae (+whitening)     | ppo_clip             | token_mean          | 0.05, k1, reward (per token)        | yes    |
| grpo         | grpo (std-scaled)    | ppo_clip             | seq_mean_token_mean | 0.04, k3, loss                      | no     |
| dr_grpo      | grpo (no std)        | ppo_clip             | constant_norm       | 0.0 (none)                          | no     |
| dapo         | grpo (std-scaled)    | ppo_clip 0.2/0.28    | token_mean          | 0.0 (none); dynamic sampling refill | no     |
| rloo         | rloo                 | ppo_clip             | token_mean          | 0.05, k1, reward (sequence sum)     | no     |
| remax        | remax (greedy base)  | reinforce            | token_mean          | 0.05, k1, reward (per token)        | no     |
| reinforce_pp | reinforce_pp         | ppo_clip             | token_mean          | 0.01, k1, reward (return-to-go)     | no     |
| online_dpo   | - (pairs best/worst) | dpo (PAIRWISE)       | mean over pairs     | beta 0.1 is DPO's; live reference   | no     |
| raft         | - (best of 8 kept)   | sft (NLL)            | token_mean          | 0.0 (none)                          | no     |
| superhf      | - (best of 32 kept)  | sft (NLL) + KL prior | token_mean          | 0.1, full-vocabulary KL(ref||policy)| no     |
| expert_iteration | - (reward >= 1 kept) | sft (NLL)        | token_mean          | 0.0 (none)                          | no     |
| safe_ppo     | (A_R - l A_C)/(1+l)  | ppo_clip 0.1         | token_mean          | 0.1, k1, reward (-KL) and cost (+KL)| 2      |
| dpa          | - (best of 8 by v.r) | sft (NLL)            | token_mean          | 0.0 (none); direction in the prompt | no     |
| nash_md      | sequence_reward      | reinforce            | seq_mean_token_sum  | 0.1, k1, per token (REINFORCE)      | no     |
| inpo         | - (pairs best/worst) | (h - 1/(2 eta))^2    | mean over pairs     | tau/eta on ref, rest on pi_t        | no     |
| refuel       | - (2 branches/turn h)| (dl - eta dR)^2      | mean over pairs     | none (log-ratios to pi_t)           | no     |
| distill      | return_to_go, gamma 0| ppo_clip (jsd: GKD)  | token_mean          | 1.0, k1 to the --teacher, reward    | no     |
| pf_ppo       | gae (+whitening)     | ppo_clip             | token_mean          | 0.05, k1, reward; best+random of 4  | yes    |
| ma_ppo       | gae over macro spans | ppo_clip             | token_mean          | 0.05, k1, reward (per token)        | yes    |
| drpo         | gae (+whitening)     | ppo_clip, off roll-in| token_mean          | 0.05, k1, reward; dataset resets    | yes    |
| salsa        | gae (+whitening)     | ppo_clip             | token_mean          | 0.05, k1, reward; to a weight soup  | yes    |
| cgpo_crpg    | grpo (no std) on r~  | reinforce            | token_mean          | 0.05, k1, reward; judges constrain  | no     |
| cgpo_crraft  | - (best of 4 by r~)  | sft, NLL x r~        | token_mean          | 0.0 (none); judges constrain        | no     |

Dynamic sampling (dapo): groups whose rewards are all equal are dropped and further prompt
batches are generated until --batch-size groups remain (at most max_generation_rounds batches;
see `sampling.py`).

Any choice can be overridden with `--set key=value`; `OnlineSettings` (`settings.py`) lists every key.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

from alignkit.advantages import ADVANTAGE_KINDS, ADVANTAGES
from alignkit.objectives import KL, PAIRWISE
from alignkit.objectives.filters import PER_GROUP_FILTERS, SAMPLE_FILTERS
from alignkit.objectives.policy import AGGREGATIONS, POLICY_LOSSES
from alignkit.training.online.cgpo import validate_cgpo
from alignkit.training.online.macro import MACRO_TERMINATIONS, MACRO_VALUES
from alignkit.training.online.multi_reward import REWARD_AGGREGATIONS
from alignkit.training.online.reset import check_reset_settings
from alignkit.training.online.settings import (  # noqa: F401  (OnlineSettings: re-exported)
    ENSEMBLE_REDUCTIONS,
    NO_GRAD_ROWS_PER_MICRO_BATCH,
    OnlineSettings,
    inpo_tau,
)
from alignkit.training.run.values import coerce_fields

PRESETS: dict[str, dict[str, Any]] = {
    "ppo": dict(advantage="gae", policy_loss="ppo_clip", aggregation="token_mean", kl_in="reward",
                kl_estimator="k1", beta=0.05, critic="separate", whiten_advantages=True,
                epochs_per_batch=4, minibatches=1, group_size=1),
    "grpo": dict(advantage="grpo", policy_loss="ppo_clip", aggregation="seq_mean_token_mean",
                 kl_in="loss", kl_estimator="k3", beta=0.04, group_size=8),
    "dr_grpo": dict(advantage="grpo", scale_by_std=False, policy_loss="ppo_clip",
                    aggregation="constant_norm", kl_in="loss", kl_estimator="k3", beta=0.0, group_size=8),
    "dapo": dict(advantage="grpo", policy_loss="ppo_clip", eps_low=0.2, eps_high=0.28,
                 aggregation="token_mean", kl_in="loss", beta=0.0, dynamic_sampling=True, group_size=8),
    "rloo": dict(advantage="rloo", policy_loss="ppo_clip", aggregation="token_mean", kl_in="reward",
                 kl_estimator="k1", beta=0.05, group_size=4),
    "remax": dict(advantage="remax", policy_loss="reinforce", aggregation="token_mean", kl_in="reward",
                  kl_estimator="k1", beta=0.05, group_size=1),
    "reinforce_pp": dict(advantage="reinforce_pp", policy_loss="ppo_clip", aggregation="token_mean",
                         kl_in="reward", kl_estimator="k1", beta=0.01, group_size=1),
    "online_dpo": dict(objective="pairwise", pairwise_loss="dpo", beta=0.1, kl_in="none", group_size=2),
    "raft": dict(objective="sft", sample_filter="best_of_n", group_size=8, beta=0.0, kl_in="none",
                 aggregation="token_mean"),
    "superhf": dict(objective="sft", sample_filter="best_of_n", group_size=32, top_p=0.95, beta=0.1,
                    kl_in="loss", aggregation="token_mean"),
    # Expert Iteration as Echo Chamber (Zhao et al. 2025) runs it beside PPO and GRPO: sample G per
    # question, keep every correct one (0/1 reward >= 1), fine-tune on them. Online form: one SFT
    # update per sampled batch (the paper's rounds fine-tune for epochs on a round's kept set).
    "expert_iteration": dict(objective="sft", sample_filter="at_least", filter_min_reward=1.0, group_size=8,
                             beta=0.0, kl_in="none", aggregation="token_mean"),
    "dpa": dict(dpa=True, objective="sft", sample_filter="best_of_n", group_size=8, beta=0.0, kl_in="none",
                aggregation="token_mean"),
    "nash_md": dict(mixture_coef=0.5, advantage="sequence_reward", policy_loss="reinforce",
                    aggregation="seq_mean_token_sum", kl_in="reward", kl_estimator="k1", beta=0.1, group_size=1),
    "inpo": dict(objective="pairwise", pairwise_loss="inpo", kl_in="none", group_size=8),
    "refuel": dict(objective="pairwise", pairwise_loss="refuel", kl_in="none", group_size=2, temperature=0.8),
    "distill": dict(distill_loss="reverse_kl", advantage="return_to_go", gamma=0.0, policy_loss="ppo_clip",
                    aggregation="token_mean", kl_in="reward", kl_estimator="k1", beta=1.0, group_size=4),
    "safe_ppo": dict(advantage="gae", policy_loss="ppo_clip", eps_low=0.1, aggregation="token_mean",
                     kl_in="reward", kl_estimator="k1", beta=0.1, critic="separate", cliprange_value=5.0,
                     whiten_advantages=True, epochs_per_batch=4, minibatches=1, group_size=1, lagrangian=True),
    "pf_ppo": dict(advantage="gae", policy_loss="ppo_clip", aggregation="token_mean", kl_in="reward",
                   kl_estimator="k1", beta=0.05, critic="separate", whiten_advantages=True,
                   epochs_per_batch=4, minibatches=1, group_size=4, sample_filter="best_random"),
}
# MA-RLHF: ppo's choices with GAE over fixed 5-gram macro actions, so macro_n=1 is ppo exactly.
# kl 0.05, gamma 1, lam 0.95, clip 0.2 and value clip 0.2 are also the paper's Gemma-2B TL;DR
# settings; its code also uses 1 PPO epoch, no advantage whitening, temperature 0.8 and its
# reward model's clip 2.5 (--set epochs_per_batch=1, whiten_advantages=false, temperature=0.8,
# reward_clip=2.5 to match it).
PRESETS["ma_ppo"] = {**PRESETS["ppo"], "macro_termination": "fixed"}
# Cornell-RL/drpo src/tldr/drpo.py: ppo's kl 0.05, 4 epochs, clip 0.2, value clip 0.2, vf 0.1, gamma 1,
# lambda 0.95, whitened advantages; temperature 0.7, whitened rewards, every rollout reset (Args.beta 1.0)
PRESETS["drpo"] = {**PRESETS["ppo"], "temperature": 0.7, "whiten_rewards": True, "reset_prob": 1.0}
PRESETS["salsa"] = {**PRESETS["ppo"], "soup": True}  # SALSA: PPO with its KL to the soup
# CGPO's CRPG (training/online/cgpo.py): REINFORCE on psi x sigma(R - R_bar), group-mean baseline
PRESETS["cgpo_crpg"] = dict(cgpo=True, advantage="grpo", scale_by_std=False, policy_loss="reinforce",
                            aggregation="token_mean", kl_in="reward", kl_estimator="k1", beta=0.05, group_size=4,
                            epochs_per_batch=1)
# CGPO's CRRAFT: RAFT on r~ (best of 4 per prompt), its NLL weighted by r~, so a group with no feasible sample adds 0
PRESETS["cgpo_crraft"] = dict(cgpo=True, objective="sft", sample_filter="best_of_n", group_size=4, beta=0.0,
                              kl_in="none", aggregation="token_mean")

PAPERS = {
    "ppo": "PPO for LMs (Ouyang et al. 2022; Zheng et al. 2023 PPO-max)",
    "grpo": "GRPO (Shao et al. 2024)",
    "dr_grpo": "Dr. GRPO (Liu et al. 2025)",
    "dapo": "DAPO (Yu et al. 2025)",
    "rloo": "RLOO (Ahmadian et al. 2024)",
    "remax": "ReMax (Li et al. 2024)",
    "reinforce_pp": "REINFORCE++ (Hu 2025)",
    "online_dpo": "Online / iterative DPO (Dong et al. 2024, RLHF Workflow)",
    "raft": "RAFT: reward-ranked fine-tuning (Dong et al. 2023)",
    "superhf": "SuperHF (Mukobi et al. 2023)",
    "expert_iteration": "Expert Iteration (Anthony et al. 2017; Havrilla et al. 2024), as in Echo Chamber (Zhao et al. 2025)",
    "pf_ppo": "PF-PPO: policy filtration for PPO (Zhang et al. 2024)",
    "safe_ppo": "Safe RLHF: PPO-Lagrangian (Dai et al. 2024)",
    "dpa": "DPA: directional preference alignment (Wang et al. 2024)",
    "nash_md": "Nash-MD: Nash learning from human feedback (Munos et al. 2023)",
    "inpo": "INPO: iterative Nash policy optimisation (Zhang et al. 2025)",
    "refuel": "REFUEL: regressing the relative future (Gao et al. 2024)",
    "distill": "On-policy distillation (Agarwal et al. 2024 GKD; Thinking Machines 2025)",
    "ma_ppo": "MA-RLHF: PPO over macro actions (Chai et al. 2024)",
    "drpo": "DR-PO: dataset reset policy optimization (Chang et al. 2024)",
    "salsa": "SALSA: soup-based alignment learning (Chegini et al. 2024)",
    "cgpo_crpg": "CGPO / CRPG: constrained RLHF with a mixture of judges (Xu et al. 2024)",
    "cgpo_crraft": "CGPO / CRRAFT: constrained reward-ranked fine-tuning, mixture of judges (Xu et al. 2024)",
}

CHOICES = {
    "kl_in": ("reward", "loss", "none"),
    "critic": ("none", "separate", "shared"),
    "objective": ("policy_gradient", "pairwise", "sft", "distill"),
    "distill_loss": ("none", "reverse_kl", "jsd"),
    "sample_filter": SAMPLE_FILTERS,
    "reward_on_error": ("raise", "penalty"),
    "rounds_exhausted": ("raise", "train"),
    "macro_termination": MACRO_TERMINATIONS,
    "macro_value": MACRO_VALUES,
    "policy_init": ("first", "soup"),
}


def resolve_settings(config, preset: str) -> OnlineSettings:
    """Preset defaults, then `config.hparams` (--set); validated. Unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(OnlineSettings)}
    unknown = sorted(set(config.hparams) - names)
    if unknown:
        raise ValueError(
            f"{preset}: unknown hyper-parameter(s) {unknown}; accepted: {sorted(names)}"
        )
    settings = OnlineSettings(**{**PRESETS[preset], **coerce_fields(OnlineSettings, config.hparams, preset)})
    if settings.distill_loss == "jsd":  # GKD's JSD is a supervised loss on the samples, not a policy gradient
        settings.objective = "distill"
    _validate(settings, preset)
    return settings


def _validate(s: OnlineSettings, preset: str) -> None:
    for key, allowed in CHOICES.items():
        if getattr(s, key) not in allowed:
            raise ValueError(f"{preset}: {key} must be one of {allowed}, got {getattr(s, key)!r}")
    registries = {"advantage": ADVANTAGES, "policy_loss": POLICY_LOSSES, "aggregation": AGGREGATIONS,
                  "kl_estimator": KL, "pairwise_loss": {**PAIRWISE, "inpo": None, "refuel": None}}
    for key, registry in registries.items():
        if getattr(s, key) not in registry:
            raise ValueError(f"{preset}: unknown {key} {getattr(s, key)!r}; known: {sorted(registry)}")
    if s.group_size < 1 or s.epochs_per_batch < 1 or s.minibatches < 1:
        raise ValueError(f"{preset}: group_size, epochs_per_batch and minibatches must be >= 1")
    if s.lagrangian:
        _validate_lagrangian(s, preset)
    if s.objective == "distill" and s.distill_loss != "jsd":
        raise ValueError(f"{preset}: objective=distill is GKD's supervised JSD: set distill_loss=jsd")
    if s.distill_loss == "reverse_kl" and (s.kl_in != "reward" or s.kl_estimator != "k1" or not s.beta > 0):
        raise ValueError(f"{preset}: distill_loss=reverse_kl takes beta x the k1 KL to the teacher as the "
                         "per-token reward: kl_in=reward, kl_estimator=k1 and beta > 0")
    if s.pairwise_loss == "refuel" and (s.group_size != 2 or s.dynamic_sampling or s.sample_filter != "none"):
        raise ValueError(f"{preset}: refuel regresses the two continuations of each reset point: group_size=2, "
                         "without dynamic_sampling or sample_filter")
    if s.pairwise_loss == "inpo" and not (s.inpo_eta > 0 and 0 <= inpo_tau(s) < s.inpo_eta):
        raise ValueError(f"{preset}: inpo needs eta > 0 and 0 <= tau < eta (got eta={s.inpo_eta}, "
                         f"tau={s.inpo_tau})")
    if s.mixture_coef is not None and not (0 <= s.mixture_coef <= 1 and s.objective == "policy_gradient"):
        raise ValueError(f"{preset}: mixture_coef must be in [0, 1] with objective=policy_gradient, got "
                         f"{s.mixture_coef}")
    if s.dpa and (len(s.dpa_attributes.split(",")) != 2 or not 0 < s.dpa_max_angle <= 180):
        raise ValueError(f"{preset}: dpa needs two dpa_attributes (got {s.dpa_attributes!r}) and dpa_max_angle in "
                         f"(0, 180] (got {s.dpa_max_angle})")
    if not 0 <= s.jsd_beta <= 1:
        raise ValueError(f"{preset}: jsd_beta must be in [0, 1], got {s.jsd_beta}")
    if s.macro_termination != "none":
        _validate_macro(s, preset)
    check_reset_settings(s, preset)
    validate_cgpo(s, preset)
    if not s.soup and (s.soup_weights is not None or s.policy_init != "first"):
        raise ValueError(f"{preset}: soup_weights and policy_init=soup weigh a soup of --ref-model checkpoints: "
                         "--set soup=true (or train salsa)")
    if not 0 < s.filter_fraction <= 1:
        raise ValueError(f"{preset}: filter_fraction must be in (0, 1], got {s.filter_fraction}")
    if s.sample_filter in PER_GROUP_FILTERS and s.group_size < 2:
        raise ValueError(f"{preset}: sample_filter={s.sample_filter} chooses among each prompt's samples: "
                         "--set group_size=4 (or more)")
    if s.objective == "pairwise" and s.group_size < 2:
        raise ValueError(f"{preset}: pairwise online training needs group_size >= 2")
    if s.objective == "policy_gradient":
        if ADVANTAGE_KINDS[s.advantage] == "critic" and s.critic == "none":
            raise ValueError(f"{preset}: advantage {s.advantage!r} needs a critic (--set critic=separate)")
        if s.advantage == "rloo" and s.group_size < 2:
            raise ValueError(f"{preset}: rloo needs group_size >= 2")
    if s.beta < 0:
        raise ValueError(f"{preset}: beta must be >= 0")
    if s.async_rollout and s.temperature != 1.0:
        raise ValueError(f"{preset}: async_rollout takes the engine's log-probs as the old ones, which are "
                         "temperature-1 log-probs: sample at temperature 1")
    if s.async_rollout and s.tis_cap > 0:
        raise ValueError(f"{preset}: tis_cap compares the engine with the trainer on the same weights; with "
                         "async_rollout the old log-probs are the engine's own (set one of them)")
    if s.max_generation_rounds < 0:
        raise ValueError(f"{preset}: max_generation_rounds must be >= 0 (0 = no limit)")
    if s.ensemble_reduce not in (None, *ENSEMBLE_REDUCTIONS):
        raise ValueError(f"{preset}: ensemble_reduce must be mean, wco, uwo or brme, got {s.ensemble_reduce!r}")
    if s.reward_aggregation not in REWARD_AGGREGATIONS:
        raise ValueError(f"{preset}: reward_aggregation must be sum or normalize_then_sum, got "
                         f"{s.reward_aggregation!r}")
    if s.reward_aggregation == "normalize_then_sum" and s.advantage != "batch_norm":
        raise ValueError(f"{preset}: reward_aggregation=normalize_then_sum (GDPO) normalises the summed reward over "
                         f"the batch: add --set advantage=batch_norm (advantage is {s.advantage!r})")
    for key in ("gspo_eps_low", "gspo_eps_high", "cispo_max", "sapo_tau_pos", "sapo_tau_neg", "cov_ratio"):
        if not getattr(s, key) > 0:
            raise ValueError(f"{preset}: {key} must be > 0, got {getattr(s, key)}")
    if s.kl_cap is not None and not s.kl_cap > 0:
        raise ValueError(f"{preset}: kl_cap must be > 0 (or unset), got {s.kl_cap}")
    if s.entropy_coef < 0 or s.overlong_buffer < 0 or s.overlong_buffer >= s.max_new_tokens > 0:
        raise ValueError(f"{preset}: entropy_coef must be >= 0 and overlong_buffer in [0, max_new_tokens)")
    if s.entropy_coef > 0 and not s.log_entropy:
        raise ValueError(f"{preset}: entropy_coef needs the entropies (log_entropy=true)")


def _validate_lagrangian(s: OnlineSettings, preset: str) -> None:
    """safe_ppo's settings: a critic of its own per signal, one generation round, no filter."""
    if s.objective != "policy_gradient" or s.advantage != "gae" or s.critic != "separate":
        raise ValueError(f"{preset}: lagrangian=true needs objective=policy_gradient, advantage=gae and "
                         "critic=separate (a reward critic and a cost critic)")
    if s.dynamic_sampling or s.sample_filter != "none":
        raise ValueError(f"{preset}: lagrangian=true trains on every sample generated: dynamic_sampling and "
                         "sample_filter are not supported with it")
    if not s.lambda_init > 0 or not s.lambda_lr > 0 or s.cost_window < 1:
        raise ValueError(f"{preset}: lambda_init and lambda_lr must be > 0 and cost_window >= 1")
    if s.lambda_max is not None and not s.lambda_max >= s.lambda_init:
        raise ValueError(f"{preset}: lambda_max must be >= lambda_init ({s.lambda_init}), got {s.lambda_max}")


def _validate_macro(s: OnlineSettings, preset: str) -> None:
    """ma_ppo's settings: macro actions replace token-level GAE, so they need it."""
    if s.objective != "policy_gradient" or ADVANTAGE_KINDS[s.advantage] != "critic" or s.lagrangian:
        raise ValueError(f"{preset}: macro_termination={s.macro_termination} runs GAE over macro actions: it needs "
                         "objective=policy_gradient, advantage=gae and a critic (not lagrangian)")
    if s.macro_n < 1 or s.macro_repeat < 1:
        raise ValueError(f"{preset}: macro_n and macro_repeat must be >= 1, got {s.macro_n} and {s.macro_repeat}")
    if s.macro_termination == "perplexity" and not needs_reference(s):
        raise ValueError(f"{preset}: macro_termination=perplexity reads the reference model's log-probs: it needs "
                         "beta > 0 and kl_in=reward or loss")
def no_grad_rows(s: OnlineSettings) -> int:
    """Rows per forward without gradients (0: all at once); see `logprob_micro_batch_size`."""
    if s.logprob_micro_batch_size:
        return s.logprob_micro_batch_size
    return NO_GRAD_ROWS_PER_MICRO_BATCH * s.micro_batch_size


def needs_reference(s: OnlineSettings) -> bool:
    """beta = 0 (or kl_in = none) loads no reference model; pairwise losses always need one."""
    if s.objective == "pairwise":
        return s.pairwise_loss not in _reference_free() | {"refuel"}  # refuel: ratios to pi_t only
    if s.distill_loss != "none" or s.mixture_coef is not None:  # the teacher; nash_md's mixture
        return True
    if s.objective == "sft":  # beta: the KL prior's coefficient (SuperHF)
        return s.beta > 0
    return s.beta > 0 and s.kl_in != "none" or s.cgpo_kl_threshold is not None  # CRPG's KL factor


def _reference_free() -> set[str]:
    from alignkit.objectives import REFERENCE_FREE

    return REFERENCE_FREE


def register_online_family() -> None:
    from alignkit.training.run.registry import AlgorithmSpec, register_algorithm

    for name, preset in PRESETS.items():
        models = ["policy"]
        if preset.get("distill_loss", "none") != "none":
            models.append("teacher")
        elif needs_reference(OnlineSettings(**preset)):
            models.append("reference")
        if preset.get("distill_loss", "none") == "none":  # distill: a task reward is optional
            models.append("reward")
        if preset.get("lagrangian"):
            models.append("cost")
        if preset.get("soup"):
            models[models.index("reference")] = "reference soup"
        if preset.get("critic", "none") != "none":
            models.append("critic")
        if preset.get("lagrangian"):
            models.append("cost critic")
        register_algorithm(AlgorithmSpec(
            name, "online", "prompt", " + ".join(models), PAPERS[name],
            partial(resolve_settings, preset=name), runner="online"))


register_online_family()
