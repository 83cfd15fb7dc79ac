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
| safe_ppo     | (A_R - l A_C)/(1+l)  | ppo_clip 0.1         | token_mean          | 0.1, k1, reward (-KL) and cost (+KL)| 2      |
| dpa          | - (best of 8 by v.r) | sft (NLL)            | token_mean          | 0.0 (none); direction in the prompt | no     |
| nash_md      | sequence_reward      | reinforce            | seq_mean_token_sum  | 0.1, k1, per token (REINFORCE)      | no     |
| inpo         | - (pairs best/worst) | (h - 1/(2 eta))^2    | mean over pairs     | tau/eta on ref, rest on pi_t        | no     |
| distill      | return_to_go, gamma 0| ppo_clip (jsd: GKD)  | token_mean          | 1.0, k1 to the --teacher, reward    | no     |
| pf_ppo       | gae (+whitening)     | ppo_clip             | token_mean          | 0.05, k1, reward; best+random of 4  | yes    |
| ma_ppo       | gae over macro spans | ppo_clip             | token_mean          | 0.05, k1, reward (per token)        | yes    |
| drpo         | gae (+whitening)     | ppo_clip, off roll-in| token_mean          | 0.05, k1, reward; dataset resets    | yes    |
| salsa        | gae (+whitening)     | ppo_clip             | token_mean          | 0.05, k1, reward; to a weight soup  | yes    |

Dynamic sampling (dapo): groups whose rewards are all equal are dropped and further prompt
batches are generated until --batch-size groups remain (at most max_generation_rounds batches;
see `sampling.py`).

Any choice can be overridden with `--set key=value`; `OnlineSettings` lists every key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

from alignkit.advantages import ADVANTAGE_KINDS, ADVANTAGES
from alignkit.objectives import KL, PAIRWISE
from alignkit.objectives.policy import AGGREGATIONS, POLICY_LOSSES
from alignkit.objectives.reward_losses import ENSEMBLE_AGGREGATIONS
from alignkit.training.online.filters import SAMPLE_FILTERS
from alignkit.training.online.macro import MACRO_TERMINATIONS, MACRO_VALUES
from alignkit.training.online.multi_reward import REWARD_AGGREGATIONS
from alignkit.training.online.reset import check_reset_settings
from alignkit.training.run.values import coerce_fields

# A forward without gradients keeps one layer's activations at a time, not every layer's for
# the backward: it takes this many times the rows of a training micro-batch.
NO_GRAD_ROWS_PER_MICRO_BATCH = 8
# ensemble_reduce: an rm_ensemble's aggregations, or BRME's mix for an rm_bayes model
ENSEMBLE_REDUCTIONS = (*ENSEMBLE_AGGREGATIONS, "brme")


@dataclass
class OnlineSettings:
    """Hyper-parameters of the online loop (`--set key=value`); presets change the defaults."""

    # sampling
    group_size: int = 1
    """Samples per prompt (G); --batch-size is prompts per step, so a step has B x G samples."""
    max_new_tokens: int = 64
    """Most tokens generated per sample."""
    temperature: float = 1.0
    """Sampling temperature (log-probs for training are always at temperature 1)."""
    top_p: float = 1.0
    top_k: int = 0
    # reward
    missing_eos_penalty: float | None = None
    """Subtracted from the reward of samples that hit max_new_tokens without EOS (TRL)."""
    reward_norm: bool = False
    """PPO-max: normalise rewards by a running mean/std of all rewards so far."""
    reward_clip: float | None = None
    """PPO-max: clip (normalised) rewards to [-c, c] (MOSS-RLHF default 10)."""
    reward_aggregation: str = "sum"
    """Several --reward: sum (sum_k w_k r_k) or normalize_then_sum (GDPO: each reward normalised
    in its group first; with advantage=batch_norm). See training/online/multi_reward.py."""
    ensemble_reduce: str | None = None
    """A reward `rm:DIR` of an rm_ensemble model: mean, wco (worst member) or uwo (mean - uwo_lambda
    x variance), Coste et al. 2023; of an rm_bayes model: brme (BRME's brme_lambda x the most
    confident head + (1 - brme_lambda) x the lowest head). None: what the model's file says."""
    uwo_lambda: float | None = None
    """uwo's variance penalty (None: the ensemble's saved value; Coste et al. use 0.1 for PPO)."""
    brme_lambda: float | None = None
    """brme's nominal/worst mix (None: the value the model was trained with)."""
    reward_on_error: str = "raise"
    """A reward function that raises on a row: raise, or penalty (-1, counted in the log)."""
    # KL to the reference
    beta: float = 0.0
    """KL coefficient (0 loads no reference model); for online_dpo, DPO's beta."""
    kl_estimator: str = "k1"
    """k1, k2 or k3 (alignkit.objectives.KL)."""
    kl_in: str = "reward"
    """Where the KL goes: reward (shaping, before advantages) or loss (GRPO); none."""
    kl_target: float | None = None
    """Adaptive KL controller target (Ziegler et al.): None keeps beta fixed."""
    kl_horizon: float = 10000.0
    # advantages
    advantage: str = "grpo"
    """alignkit.advantages.ADVANTAGES name."""
    scale_by_std: bool = True
    """grpo: divide by the group's reward std (False = Dr. GRPO)."""
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = False
    """Whiten advantages over the batch's valid tokens (PPO; PPO-max)."""
    advantage_clip: float | None = None
    """PPO-max: clip advantages to [-c, c] after whitening (MOSS-RLHF 0.5)."""
    remax_clip: float | None = None
    """remax: clip R - R_greedy to [-c, c]."""
    macro_termination: str = "none"
    """MA-RLHF (ma_ppo): GAE over macro actions, spans of tokens cut by fixed (n-grams of
    macro_n), random (lengths from {1,2,3,5,10}, each macro_repeat times, seeded by (seed, step))
    or perplexity (a span starts where the reference's perplexity rises; needs beta > 0);
    none: token-level GAE. See training/online/macro.py."""
    macro_n: int = 5
    """fixed macro actions: tokens per span (1 is token-level PPO exactly)."""
    macro_repeat: int = 3
    """random macro actions: times each length of {1,2,3,5,10} is drawn (the code's repeat_times)."""
    macro_value: str = "equal"
    """Macro value and reward from a span's tokens: equal (mean), unit (last token) or position
    (weights proportional to 1/position in the span)."""
    dynamic_sampling: bool = False
    """DAPO: train only on prompt groups whose rewards are not all equal (the others have zero
    advantage), generating further batches of prompts until --batch-size such groups are kept."""
    max_generation_rounds: int = 10
    """Dynamic sampling: most prompt batches generated per step (verl's max_num_gen_batches;
    0 = no limit). verl defaults to 0, but its data loader ends with the epoch, while our prompt
    stream cycles, so a reward that never varies would generate forever: we bound it at 10, the
    value of verl's DAPO example scripts."""
    rounds_exhausted: str = "raise"
    """Dynamic sampling, max_generation_rounds reached with too few groups: raise (verl), or
    train (on the groups kept so far; with none the step skips its update)."""
    # policy loss
    policy_loss: str = "ppo_clip"
    eps_low: float = 0.2
    eps_high: float | None = None
    clip_ratio_c: float | None = None
    gspo_eps_low: float = 3e-4
    """gspo: clip range of the sequence ratio, below 1 (the paper's 3e-4)."""
    gspo_eps_high: float = 4e-4
    cispo_max: float = 5.0
    """cispo: upper bound of the detached importance weight (ScaleRL's eps_max)."""
    cispo_min: float | None = None
    sapo_tau_pos: float = 1.0
    """sapo: gate temperature for A > 0 (sapo_tau_neg for A <= 0; TRL's 1.0 / 1.05)."""
    sapo_tau_neg: float = 1.05
    cov_ratio: float = 2e-4
    """clip_cov / kl_cov: share of valid tokens dropped / KL-penalised (verl's 2e-4)."""
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_coef: float = 1.0
    entropy_coef: float = 0.0
    """Entropy bonus: the loss minus entropy_coef x the mean per-token entropy (TRL's meaning:
    the same for every aggregation)."""
    kl_cap: float | None = None
    """Clamp each token's KL estimate to [-kl_cap, kl_cap] (k3 reaches 142 at u = -5; verl's
    low_var_kl caps at 10). None: uncapped."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: the last `overlong_buffer` tokens before max_new_tokens
    cost up to `overlong_penalty` reward, linearly. 0: off."""
    overlong_penalty: float = 1.0
    aggregation: str = "token_mean"
    epochs_per_batch: int = 1
    """Passes (K) over each batch of samples; 1 with minibatches=1 is exactly on-policy."""
    minibatches: int = 1
    """Optimizer steps per pass over the batch."""
    micro_batch_size: int = 0
    """Rows per forward/backward inside a minibatch (0: the whole minibatch)."""
    async_rollout: bool = False
    """One-step-off asynchronous rollout (needs --rollout vllm): step t+1 is generated from the
    weights before step t's update while that update runs; ratios are against the engine's own
    log-probs; staleness 1 (0 after a checkpoint step). See training/online/async_rollout.py."""
    tis_cap: float = 0.0
    """Truncated importance sampling against an engine whose log-probs are not the trainer's
    (--rollout vllm): each token's policy loss is weighted by min(pi_old / pi_rollout, tis_cap),
    detached (Yao et al. 2025; verl's tis_imp_ratio_cap, 2 in its examples). 0: off."""
    logprob_micro_batch_size: int = 0
    """Rows per forward without gradients (reference and old log-probs, values before an
    update), which stores no activations: 0 = NO_GRAD_ROWS_PER_MICRO_BATCH x micro_batch_size
    (the whole batch when micro_batch_size is 0)."""
    # critic
    critic: str = "none"
    """none, separate (own model; see critic_init) or shared (value head on the policy)."""
    critic_init: str | None = None
    """Directory of a reward model to initialise the separate critic (default: the policy)."""
    critic_lr: float | None = None
    """Critic learning rate (default: --lr)."""
    vf_coef: float = 0.1
    cliprange_value: float = 0.2
    critic_warmup_steps: int = 0
    """PPO-max: steps that train only the critic before the policy moves."""
    # filtering and the objective
    sample_filter: str = "none"
    """Which scored samples the update trains on: none, best_of_n, best_random, best_worst (per
    prompt group) or top_fraction (of the batch); see training/online/filters.py."""
    filter_fraction: float = 0.125
    """top_fraction: share of the batch's samples kept (RAFT's 1/K)."""
    objective: str = "policy_gradient"
    """policy_gradient; pairwise (best vs worst sample of each prompt, a PAIRWISE loss); or sft
    (negative log-likelihood of the kept samples + beta x KL(ref || policy), RAFT / SuperHF)."""
    pairwise_loss: str = "dpo"
    """A PAIRWISE loss (alignkit.objectives), or inpo (objectives/nash.py)."""
    inpo_eta: float = 0.005
    """inpo: eta, the coefficient of KL(pi || pi_t) in the mirror-descent step; the regression
    target is 1 / (2 eta) (the paper's final 0.005: target 100)."""
    inpo_tau: float | None = None
    """inpo: tau, the KL-to-reference coefficient of the game, 0 <= tau < eta (None: eta / 3,
    the paper's choice; 0: its "w/o KL" ablation)."""
    label_smoothing: float = 0.0
    # DPA (dpa): a direction per prompt in its system prompt, R_v = v . r (training/online/dpa.py)
    dpa: bool = False
    """Condition each prompt on a drawn direction v and score R_v = v . (r_1, r_2) (the reward gives two
    attribute scores per sample: an rm_multi model as rm:DIR, or a function returning (N, 2))."""
    dpa_attributes: str = "helpfulness,verbosity"
    """dpa: the two attribute names, as written into the system prompt (and picked from an rm_multi model)."""
    dpa_max_angle: float = 45.0
    """dpa: directions theta ~ U[-max, max] degrees (the model card's w_1 >= 71 is |theta| <= 45)."""
    # Nash-MD (nash_md): an opponent from the policy/reference mixture, a judge (training/online/nash.py)
    mixture_coef: float | None = None
    """nash_md: alpha of the opponent's geometric mixture pi_theta^(1 - alpha) pi_ref^alpha (TRL's 0.5);
    None: no opponent. The reward of a sample becomes p = P(y > y'), minus 0.5 in the advantage."""
    # on-policy distillation (distill): --teacher DIR stands where the reference does
    distill_loss: str = "none"
    """none; reverse_kl (the student's samples, beta x (log pi_T - log pi) per token as the reward,
    a policy-gradient update); or jsd (GKD's generalised JSD to the teacher's whole next-token
    distribution as a supervised loss on the student's samples: objective becomes distill)."""
    jsd_beta: float = 0.5
    """jsd: the mixture weight beta of GKD / TRL's generalized_jsd_loss (0: KL(teacher || student),
    1: KL(student || teacher))."""
    # Safe RLHF (safe_ppo): a cost, its critic and a Lagrange multiplier (training/online/safe.py)
    lagrangian: bool = False
    """Constrain the mean cost (--cost or --cost-model) to cost_limit with a Lagrange multiplier."""
    cost_limit: float = 0.0
    """The constraint's threshold d on the mean episode cost (safe-rlhf's example: 0)."""
    lambda_init: float = 1.0
    """Initial Lagrange multiplier."""
    lambda_lr: float = 0.01
    """Step size of log lambda's gradient step, once per training step."""
    lambda_max: float | None = None
    """Upper bound on lambda (None: unbounded)."""
    cost_window: int = 128
    """Episodes whose mean cost drives lambda's update."""
    cost_critic_init: str | None = None
    """Directory of a cost model to initialise the cost critic (default: the policy + zero head)."""
    # DR-PO's dataset resets (drpo; training/online/reset.py) and SALSA's soup (salsa; models/soup.py)
    reset_prob: float = 0.0
    """Share of samples that roll in a prefix of their row's offline response (drpo: 1.0; 0: off)."""
    reset_column: str | None = None
    """The offline response's column (default: chosen, else response, else completion)."""
    whiten_rewards: bool = False
    """Whiten GAE's per-token rewards over the batch, mean kept (DR-PO's whiten_rewards)."""
    soup: bool = False
    """The reference is the weight soup of the comma-separated --ref-model checkpoints."""
    soup_weights: str | None = None
    """The soup's weights, comma-separated, one per checkpoint, >= 0, summing to 1 (default uniform)."""
    policy_init: str = "first"
    """first (the policy is --model) or soup (the soup's weights); not pinned by the SALSA paper."""
    # engine and logging
    generation_batch_size: int = 0
    """Most samples decoded together (0: all at once)."""
    log_entropy: bool = True


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
    "dpa": dict(dpa=True, objective="sft", sample_filter="best_of_n", group_size=8, beta=0.0, kl_in="none",
                aggregation="token_mean"),
    "nash_md": dict(mixture_coef=0.5, advantage="sequence_reward", policy_loss="reinforce",
                    aggregation="seq_mean_token_sum", kl_in="reward", kl_estimator="k1", beta=0.1, group_size=1),
    "inpo": dict(objective="pairwise", pairwise_loss="inpo", kl_in="none", group_size=8),
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
    "pf_ppo": "PF-PPO: policy filtration for PPO (Zhang et al. 2024)",
    "safe_ppo": "Safe RLHF: PPO-Lagrangian (Dai et al. 2024)",
    "dpa": "DPA: directional preference alignment (Wang et al. 2024)",
    "nash_md": "Nash-MD: Nash learning from human feedback (Munos et al. 2023)",
    "inpo": "INPO: iterative Nash policy optimisation (Zhang et al. 2025)",
    "distill": "On-policy distillation (Agarwal et al. 2024 GKD; Thinking Machines 2025)",
    "ma_ppo": "MA-RLHF: PPO over macro actions (Chai et al. 2024)",
    "drpo": "DR-PO: dataset reset policy optimization (Chang et al. 2024)",
    "salsa": "SALSA: soup-based alignment learning (Chegini et al. 2024)",
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
                  "kl_estimator": KL, "pairwise_loss": {**PAIRWISE, "inpo": None}}
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
    if s.pairwise_loss == "inpo" and not (s.inpo_eta > 0 and 0 <= (s.inpo_eta / 3 if s.inpo_tau is None
                                                                    else s.inpo_tau) < s.inpo_eta):
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
    if not s.soup and (s.soup_weights is not None or s.policy_init != "first"):
        raise ValueError(f"{preset}: soup_weights and policy_init=soup weigh a soup of --ref-model checkpoints: "
                         "--set soup=true (or train salsa)")
    if not 0 < s.filter_fraction <= 1:
        raise ValueError(f"{preset}: filter_fraction must be in (0, 1], got {s.filter_fraction}")
    if s.sample_filter in ("best_of_n", "best_random", "best_worst") and s.group_size < 2:
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
        return s.pairwise_loss not in _reference_free()
    if s.distill_loss != "none" or s.mixture_coef is not None:  # the teacher; nash_md's mixture
        return True
    if s.objective == "sft":  # beta: the KL prior's coefficient (SuperHF)
        return s.beta > 0
    return s.beta > 0 and s.kl_in != "none"


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
