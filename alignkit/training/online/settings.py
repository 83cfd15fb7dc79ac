"""The online loop's settings: `OnlineSettings`, one field per `--set key=value`, each field's
docstring its help. The presets (`presets.py`) change the defaults; `presets.resolve_settings`
validates a run's."""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.objectives.reward_losses import ENSEMBLE_AGGREGATIONS

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
    # multi-turn rollouts (--env, --tools; alignkit.agents.episodes)
    max_turns: int = 4
    """--env/--tools: most policy turns per conversation (max_new_tokens bounds each turn)."""
    max_episode_tokens: int = 512
    """--env/--tools: most tokens after the prompt, the policy's and the environment's together."""
    env_timeout_s: float = 30.0
    """--env: seconds an environment step may take; past it the episode ends (reward 0 for the turn)."""
    tool_timeout_s: float = 10.0
    """--tools: seconds a tool call may take; past it the policy gets an error message (tools/errors)."""
    env_workers: int = 8
    """--env/--tools: threads running environment steps and tool calls."""
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
    principles: str | None = None
    """A reward rm:DIR (or --reward-model DIR) of an rm_principles model: the principles file it
    scores under (SALMON; swap it without retraining), as rm:DIR,principles=FILE."""
    user_context: str | None = None
    """A reward rm:DIR (or --reward-model DIR) of an rm_vpl model: a JSONL of the user's labelled
    pairs (prompt, chosen, rejected) that sets the user's latent z, as rm:DIR,user_context=FILE."""
    reward_on_error: str = "raise"
    """A reward function that raises on a row: raise, or penalty (-1, counted in the log)."""
    reward_http_batch_size: int | None = None
    """--reward http://...: rows per request (None: the URL's #batch_size=, else 64)."""
    reward_http_timeout: float | None = None
    """--reward http://...: seconds to wait for one request (None: the URL's #timeout=, else 60)."""
    reward_http_retries: int | None = None
    """--reward http://...: further attempts after a failed request, with exponential backoff
    (None: the URL's #retries=, else 3)."""
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
    prompt group), top_fraction (of the batch) or at_least (reward >= filter_min_reward); see
    objectives/filters.py."""
    filter_fraction: float = 0.125
    """top_fraction: share of the batch's samples kept (RAFT's 1/K)."""
    filter_min_reward: float = 1.0
    """at_least: the reward a sample needs to be kept (Expert Iteration: 1 = correct)."""
    objective: str = "policy_gradient"
    """policy_gradient; pairwise (best vs worst sample of each prompt, a PAIRWISE loss); or sft
    (negative log-likelihood of the kept samples + beta x KL(ref || policy), RAFT / SuperHF)."""
    pairwise_loss: str = "dpo"
    """A PAIRWISE loss (alignkit.objectives), inpo (objectives/nash.py) or refuel (objectives/rebel.py)."""
    inpo_eta: float = 0.005
    """inpo: eta, the coefficient of KL(pi || pi_t) in the mirror-descent step; the regression
    target is 1 / (2 eta) (the paper's final 0.005: target 100)."""
    inpo_tau: float | None = None
    """inpo: tau, the KL-to-reference coefficient of the game, 0 <= tau < eta (None: eta / 3,
    the paper's choice; 0: its "w/o KL" ablation)."""
    refuel_eta: float = 1.0
    """refuel: eta, the coefficient of the reward difference in the regression (the official code's
    default 1.0; objectives/rebel.py)."""
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
    # CGPO's mixture of judges (cgpo_crpg; training/online/cgpo.py, rewards/constraints.py)
    cgpo: bool = False
    """Train on CGPO's constrained calibrated reward psi x sigma(R - R(baseline)) (needs judges)."""
    judges: str | None = None
    """Constraint judges, bar-separated: regex:PATTERN|json_valid|max_words:N|max_chars:N|judge:MODEL|module:fn."""
    calibration_column: str | None = None
    """The column holding each prompt's baseline response for sigma(R - R(baseline)) (None: baseline reward 0)."""
    cgpo_kl_threshold: float | None = None
    """CRPG's KL factor max(0, 1 - KL/threshold) on the reward, KL in nats per sample (None: off)."""
    # engine and logging
    generation_batch_size: int = 0
    """Most samples decoded together (0: all at once)."""
    log_entropy: bool = True


def inpo_tau(s: OnlineSettings) -> float:
    """INPO's KL-to-reference coefficient: inpo_tau, or the paper's eta / 3."""
    return s.inpo_eta / 3 if s.inpo_tau is None else s.inpo_tau
