"""Building the online loop's roles from a config: `build_online_roles(config, settings) ->
OnlineRoles` loads the policy (+ LoRA), the reference, the reward and the critic, and makes the
rollout engine and the trainer (optimizer, LR schedule) around them.

The order is part of the result: the critic's head and the LoRA adapters draw their initial
weights from the seeded torch RNG, critic first, and the reference copies the policy before
adapters are attached.

salsa (`soup=true`): the reference is the weight soup of the comma-separated --ref-model
checkpoints (`alignkit.models.soup`); with policy_init=soup the policy takes the soup's weights
too (with LoRA, the adapter-off base is then the soup, which serves as the reference).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from alignkit.agents.reward_specs import load_reward  # rewards.load_reward + rlhs:CONFIG.yaml
from alignkit.models import apply_lora, count_parameters, is_peft, load_model, load_vlm
from alignkit.models.heads import require_trained_head
from alignkit.models.loading import resolve_model_path
from alignkit.models.soup import check_same_parameters, load_soup, parse_soup_weights
from alignkit.models.vlm import is_vlm_config, is_vlm_dir, set_vlm_trainable, vlm_train_parts
from alignkit.rollout.http_engine import HTTPEngine
from alignkit.training.online.cgpo import constrained_reward_role
from alignkit.training.online.distributed_rollout import (
    CopyRollout,
    ShardedReference,
    ShardedReward,
    ShardedRollout,
)
from alignkit.training.online.dpa import DirectionalReward, rm_multi_attributes
from alignkit.training.online.image_rewards import is_vision_model_dir, vision_model_reward
from alignkit.training.online.nash import build_opponent
from alignkit.training.online.presets import OnlineSettings, needs_reference, no_grad_rows
from alignkit.training.online.reward_specs import (
    check_http_settings,
    check_personal_options,
    load_reward_spec,
    model_dir_of_kind,
    model_placement,
    saved_kind,
    segment_reward_role,
    seq2seq_reward_role,
)
from alignkit.training.online.roles import (
    AdapterReference,
    CriticRole,
    FunctionReward,
    HFRollout,
    ModelReference,
    ModelReward,
    ReferenceRole,
    RewardRole,
    RolloutEngine,
    ValueModel,
    zero_value_head,
)
from alignkit.training.online.safe import DualCritic
from alignkit.training.online.server_rollout import ServerRollout, adapter_sync_config
from alignkit.training.online.trainer import PolicyTrainer
from alignkit.training.run import distributed
from alignkit.training.run.adapters import adapter_kind, attach_ssf, uses_adapter
from alignkit.training.run.config import TrainConfig
from alignkit.training.run.schedule import default_lr

log = logging.getLogger("alignkit")


@dataclass
class OnlineRoles:
    """Everything the driver calls: one object per role, plus the model and tokenizer that
    `final/` is written from."""

    model: nn.Module
    """The trained policy model (LoRA still attached)."""
    tokenizer: Any
    rollout: RolloutEngine
    trainer: PolicyTrainer
    """The policy role: log-probs, step 6, weights, checkpoints."""
    reference: ReferenceRole | None
    """None when the settings need no reference (beta = 0, reference-free pairwise losses)."""
    reward: RewardRole
    critic: CriticRole | None
    """The trainer itself when the settings train a critic, else None."""
    device: torch.device
    cost: RewardRole | None = None
    """safe_ppo: the cost role (--cost or --cost-model), scored like the reward; else None."""
    opponent: Any = None
    """nash_md: the NashOpponent (mixture sampler and judge), else None."""
    processor: Any = None
    """A vision-language policy's processor (it tokenises image prompts; final/ holds it), else None."""


def build_online_roles(config: TrainConfig, s: OnlineSettings, *, total_steps: int, model=None,
                       tokenizer=None, reward: Any = None) -> OnlineRoles:
    """Load and wire every role of the online loop; sets `config.lr` when it was None."""
    model, tokenizer, processor = load_policy(config, model, tokenizer)
    soup = load_reference_soup(config, s, tokenizer)  # salsa: the --ref-model checkpoints' soup, else None
    if soup is not None and s.policy_init == "soup":
        check_same_parameters(soup.state_dict(), model.state_dict(), "the soup", "--model")
        model.load_state_dict(soup.state_dict())
    reference_copy = copy_reference(config, s, model, soup)
    critic, value_head = build_critic(config, s, model)
    if s.lagrangian:  # safe_ppo: a cost critic beside the reward critic
        critic = DualCritic(critic, build_cost_critic(config, s, model))
    model = attach_adapters(config, model)
    model.eval()  # dropout off for sampling, old, reference and training log-probs alike
    ranks = distributed.current()
    sharded = ranks.distributed and ranks.strategy == "fsdp2"
    max_batch = s.generation_batch_size or None
    # FSDP2 shards the policy: the engine samples an unsharded copy, refreshed after each update
    rollout: RolloutEngine
    if config.placement.startswith("split"):  # a pool of rollout workers on Ray, synced after each update
        from alignkit.training.cluster.ray_rollout import RayRollout, rollout_workers

        rollout = RayRollout(rollout_workers(), tokenizer.pad_token_id)
    elif config.rollout == "vllm" and config.vllm_url:  # a running server, sent the weights after each update
        engine = HTTPEngine(config.vllm_url, logprobs_mode=config.vllm_logprobs_mode, pad_id=tokenizer.pad_token_id)
        rollout = ServerRollout(engine, tokenizer, model, adapter=adapter_sync_config(config, model))
    elif config.rollout == "vllm":  # this process's own server, stopped at the end of the run
        rollout = ServerRollout.launch(config, model, tokenizer)
    elif sharded:
        rollout = CopyRollout(HFRollout(copy.deepcopy(model), tokenizer, max_batch_size=max_batch))
    else:
        rollout = HFRollout(model, tokenizer, max_batch_size=max_batch)
    # (FSDP2 + LoRA: the reference is the sharded policy with its adapter off, made with the trainer)
    adapter_reference = sharded and is_peft(model) and config.teacher is None
    reference = None if adapter_reference else make_reference(config, s, model, reference_copy)
    if ranks.distributed:  # whole prompt groups per rank, gathered; reference rows split likewise
        rollout = ShardedRollout(rollout, ranks)
        reference = ShardedReference(reference, ranks) if reference is not None else None
    scorer = load_reward_role(config, reward, tokenizer, s)
    if ranks.distributed and (isinstance(scorer, ModelReward) or getattr(scorer, "model_backed", False)):
        scorer = ShardedReward(scorer, ranks)  # a reward model splits its rows
    scorer = constrained_reward_role(scorer, s, ranks)  # cgpo: the judges' constraints on the reward
    cost = load_cost_role(config, tokenizer, s)
    if ranks.distributed and isinstance(cost, ModelReward):
        cost = ShardedReward(cost, ranks)
    opponent = None
    if s.mixture_coef is not None:  # nash_md: samples the policy/reference mixture in this process
        check_opponent_placement(config, sharded)
        opponent = build_opponent(config, s, model, reference_copy, scorer, tokenizer, next(model.parameters()).device)
    elif config.preference_model:
        raise ValueError("--preference-model judges nash_md's pairs (mixture_coef); this run has no opponent")
    if config.lr is None:
        config.lr = default_lr(config.algorithm, lora=uses_adapter(config))
    trainer = PolicyTrainer(model, s, config, total_steps=total_steps, critic=critic, value_head=value_head)
    if adapter_reference and needs_reference(s):
        reference = _TrainerReference(trainer)  # splits the rows across ranks itself, in lockstep
    trained, total = count_parameters(trainer.module)
    log.info("parameters: %s trainable of %s", f"{trained:,}", f"{total:,}")
    return OnlineRoles(model, tokenizer, rollout, trainer, reference, scorer,
                       trainer if trainer.has_critic else None, trainer.device, cost, opponent, processor)


class _TrainerReference:
    """The reference role served by the trainer's sharded module with the adapter off."""

    def __init__(self, trainer: PolicyTrainer) -> None:
        self.trainer = trainer

    def logps(self, batch):
        return self.trainer.reference_logps(batch)

    def distributions(self, batch):
        return self.trainer.reference_distributions(batch)


def load_policy(config: TrainConfig, model, tokenizer):
    """(model, tokenizer, processor or None): the ones passed in (a VLM's processor may stand
    for its tokenizer), or `config.model` loaded (a vision-language checkpoint with its
    processor)."""
    if model is None and is_vlm_dir(resolve_model_path(config.model)):
        model, processor = load_vlm(config.model, dtype=_dtype(config), device=_device(config))
        return model, processor.tokenizer, processor
    if model is None:
        return (*load_model(config.model, dtype=_dtype(config), device=_device(config),
                            trust_remote_code=config.trust_remote_code), None)
    if tokenizer is None:
        raise ValueError("pass the tokenizer together with a loaded model")
    if hasattr(tokenizer, "image_processor") and hasattr(tokenizer, "tokenizer"):  # a VLM's processor
        return model, tokenizer.tokenizer, tokenizer
    return model, tokenizer, None


def soup_directories(ref_model: str | None) -> list[str]:
    """The checkpoints of a comma-separated --ref-model (empty without one); a `merge:` spec is one
    reference (alignkit.merge.spec), whatever commas it holds."""
    if ref_model and ref_model.startswith("merge:"):
        return [ref_model]
    return [part.strip() for part in (ref_model or "").split(",") if part.strip()]


def load_reference_soup(config: TrainConfig, s: OnlineSettings, tokenizer) -> nn.Module | None:
    """salsa: sum_k w_k theta_k of the --ref-model checkpoints (soup_weights, default uniform);
    None without `soup`. Settings that would leave the soup unused are refused in one line."""
    directories = soup_directories(config.ref_model)
    if not s.soup:
        if len(directories) > 1:
            raise ValueError(f"--ref-model {config.ref_model} names {len(directories)} checkpoints: a reference "
                             f"soup is salsa's (or --set soup=true); {config.algorithm} takes one reference")
        return None
    spec = config.ref_model if config.ref_model and config.ref_model.startswith("merge:") else None
    if spec is None and len(directories) < 2:
        raise ValueError(f"{config.algorithm}: --ref-model takes two or more SFT checkpoints, comma-separated "
                         f"(A,B), or a merge spec (merge:soup:A,B), for the reference soup; got {config.ref_model!r}")
    if spec is not None and s.soup_weights is not None:
        raise ValueError(f"{config.algorithm}: soup_weights weigh a comma-separated --ref-model; the merge spec "
                         f"{spec} carries its own weights")
    weights = parse_soup_weights(s.soup_weights, len(directories)) if spec is None else None
    if s.policy_init == "first" and not needs_reference(s):
        raise ValueError(f"{config.algorithm}: with beta={s.beta} and kl_in={s.kl_in!r} no reference is used, so "
                         "the soup would be unused: set beta > 0, or policy_init=soup to start from it")
    if s.policy_init == "first" and config.lora_r > 0:
        raise ValueError(f"{config.algorithm}: with --lora-r the reference is the base weights with the adapter off, "
                         "so the soup must be the base: --set policy_init=soup")
    if spec is not None:  # the soup as a merge spec (alignkit.merge.spec): any merge method's result
        from alignkit.merge.spec import resolve_model_spec

        log.info("reference soup: %s", spec)
        return resolve_model_spec(spec, dtype=_dtype(config), device=_device(config),
                                  trust_remote_code=config.trust_remote_code)
    log.info("reference soup of %s with weights %s", ", ".join(directories), weights)
    return load_soup(directories, weights, dtype=_dtype(config), device=_device(config), tokenizer=tokenizer)


def copy_reference(config: TrainConfig, s: OnlineSettings, model: nn.Module,
                   soup: nn.Module | None = None) -> nn.Module | None:
    """A frozen reference model (the soup, --ref-model, or a copy of the initial policy), when
    one is needed and no LoRA adapter can stand in for it (without LoRA)."""
    if s.distill_loss != "none" or config.teacher is not None:
        return load_teacher(config, s, model)
    if not needs_reference(s) or config.lora_r != 0:
        return None
    if soup is not None:
        return soup
    if config.ref_model and config.ref_model.startswith("merge:"):  # built in memory (alignkit.merge.spec)
        from alignkit.merge.spec import resolve_model_spec

        return resolve_model_spec(config.ref_model, dtype=_dtype(config), device=_device(config),
                                  trust_remote_code=config.trust_remote_code)
    if config.ref_model:
        return load_model(config.ref_model, dtype=_dtype(config), device=_device(config))[0]
    return copy.deepcopy(model)


def check_opponent_placement(config: TrainConfig, sharded: bool) -> None:
    """nash_md samples its opponent from the policy module and the reference in this process:
    not with a rollout server, Ray placement or an FSDP2-sharded policy."""
    where = ("--rollout vllm" if config.rollout == "vllm" else f"--placement {config.placement}"
             if config.placement != "local" else "--strategy fsdp2" if sharded else None)
    if where:
        raise ValueError(f"nash_md samples its mixture opponent from the policy in this process; {where} is not "
                         "supported with it (run in one process or with --strategy ddp)")


def load_teacher(config: TrainConfig, s: OnlineSettings, policy: nn.Module) -> nn.Module:
    """distill: the --teacher model, frozen, in the reference's place; it must share the
    policy's vocabulary (the per-token KL compares the same token ids)."""
    if s.distill_loss == "none":
        raise ValueError("--teacher is the teacher of on-policy distillation: use `alignkit train distill` "
                         "(or --set distill_loss=reverse_kl|jsd)")
    if config.teacher is None:
        raise ValueError(f"{config.algorithm}: on-policy distillation needs --teacher DIR (a causal LM with the "
                         "policy's vocabulary)")
    teacher, teacher_tokenizer = load_model(config.teacher, dtype=_dtype(config), device=_device(config),
                                            trust_remote_code=config.trust_remote_code)
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    policy_vocab = policy.get_output_embeddings().weight.shape[0]
    if teacher_vocab != policy_vocab:
        raise ValueError(f"--teacher {config.teacher}: its vocabulary has {teacher_vocab} tokens, the policy's "
                         f"{policy_vocab}; distillation compares the same token ids, so both need one tokenizer")
    return teacher


def build_critic(config: TrainConfig, s: OnlineSettings, model: nn.Module):
    """(separate ValueModel or None, shared value head or None) for `s.critic`."""
    if s.critic == "separate":
        if s.critic_init:  # a trained reward model (PPO-max); unset: the policy + a zero value head
            rm, _ = load_model(s.critic_init, kind="reward", dtype=_dtype(config), device=_device(config))
            require_trained_head(s.critic_init, rm, "--set critic_init", fix=(
                "Pass a directory written by `alignkit train rm`, or leave critic_init unset to start "
                "the critic from the policy with a zero value head"))
            return ValueModel.from_reward_model(rm), None
        return ValueModel.from_policy(model), None
    if s.critic == "shared":
        return None, zero_value_head(model.config.get_text_config().hidden_size).to(next(model.parameters()).device)
    return None, None


def build_cost_critic(config: TrainConfig, s: OnlineSettings, model: nn.Module) -> ValueModel:
    """safe_ppo's cost critic: from a cost model (`cost_critic_init`, safe-rlhf's choice) or the
    policy with a zero value head."""
    if s.cost_critic_init:
        cost_model, _ = load_model(s.cost_critic_init, kind="reward", dtype=_dtype(config), device=_device(config))
        require_trained_head(s.cost_critic_init, cost_model, "--set cost_critic_init",
                             fix="Pass a directory written by `alignkit train cost`")
        return ValueModel.from_reward_model(cost_model)
    return ValueModel.from_policy(model)


def load_cost_role(config: TrainConfig, tokenizer, s: OnlineSettings) -> RewardRole | None:
    """safe_ppo's cost: --cost SPEC (a function, as --reward) or --cost-model DIR; exactly one,
    and only with lagrangian=true."""
    given = [flag for flag, value in (("--cost", config.cost), ("--cost-model", config.cost_model)) if value]
    if not s.lagrangian:
        if given:
            raise ValueError(f"{given[0]} is the cost of safe_ppo (lagrangian=true); {config.algorithm} has no "
                             "cost constraint")
        return None
    if len(given) != 1:
        raise ValueError(f"{config.algorithm}: give the cost as exactly one of --cost module:function or "
                         f"--cost-model DIR (got {' and '.join(given) or 'neither'})")
    if config.cost:
        cost = load_reward(config.cost, **model_placement(config.cost, config))  # rm:DIR on the run's device
        return FunctionReward(cost, on_error=s.reward_on_error, timeout=config.reward_timeout,
                              workers=config.reward_workers)
    if is_vision_model_dir(config.cost_model):  # Safe RLHF-V: a cost model that reads each row's images
        return vision_model_reward(config.cost_model, "--cost-model", tokenizer, config, s,
                                   device=_device(config), dtype=_dtype(config))
    cost_model, cost_tokenizer = load_model(config.cost_model, kind="reward", dtype=_dtype(config),
                                            device=_device(config), trust_remote_code=config.trust_remote_code)
    require_trained_head(config.cost_model, cost_model, "--cost-model",
                         fix="Pass a directory written by `alignkit train cost`")
    return ModelReward(cost_model, cost_tokenizer, tokenizer)


def attach_adapters(config: TrainConfig, model: nn.Module) -> nn.Module:
    """The policy with LoRA adapters (when --lora-r > 0) or SSF (--adapter ssf), and gradient
    checkpointing (if asked). A VLM: LoRA on the language model, the vision tower frozen, and
    `--vlm-train` naming what else trains in full (`vlm_train_parts`)."""
    vlm = is_vlm_config(getattr(model, "config", None))
    if not vlm and config.vlm_train != "auto":
        raise ValueError(f"--vlm-train {config.vlm_train!r} applies to vision-language models only")
    vlm_parts = vlm_train_parts(config.vlm_train, lora=config.lora_r > 0) if vlm else ()
    if config.lora_r > 0:
        targets = config.lora_target_modules
        model = apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                           target_modules=targets if targets == "all-linear" else targets.split(","),
                           train_vlm_parts=vlm_parts)
    elif adapter_kind(config) == "ssf":
        model = attach_ssf(model, config)
    elif vlm:
        set_vlm_trainable(model, ("language", *vlm_parts))
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if uses_adapter(config):
            model.enable_input_require_grads()
    return model


def make_reference(config: TrainConfig, s: OnlineSettings, model: nn.Module,
                   reference_copy: nn.Module | None) -> ReferenceRole | None:
    """The reference role: the policy with its adapter off (LoRA), else the frozen copy."""
    if not needs_reference(s):
        return None
    if is_peft(model) and reference_copy is None:
        return AdapterReference(model, config.logp_chunk_size, no_grad_rows(s))
    return ModelReference(reference_copy, config.logp_chunk_size, no_grad_rows(s))


def load_reward_role(config: TrainConfig, reward: Any, tokenizer, s: OnlineSettings) -> RewardRole:
    """The reward role: a callable or spec given in Python, --reward, or --reward-model DIR."""
    spec = reward if reward is not None else config.reward

    if s.dpa:  # R_v = v . (r_1, r_2), each row's direction in its columns
        return FunctionReward(directional_reward(config, spec, s), on_error=s.reward_on_error,
                              timeout=config.reward_timeout, workers=config.reward_workers)

    named = list(spec) if isinstance(spec, list | tuple) else [spec if spec is not None else config.reward_model]
    check_personal_options(named, s)

    def function_role(one: Any) -> FunctionReward:  # a spec (ensemble_reduce applied) or a callable
        if isinstance(one, str) and s.ensemble_reduce is None and model_dir_of_kind(one, "segment_rm") is not None:
            return segment_reward_role(config, model_dir_of_kind(one, "segment_rm"), tokenizer, s, flag="--reward")
        if isinstance(one, str) and s.ensemble_reduce is None and model_dir_of_kind(one, "seq2seq_rm") is not None:
            return seq2seq_reward_role(config, model_dir_of_kind(one, "seq2seq_rm"), tokenizer, s)
        fn = load_reward_spec(one, s, config) if isinstance(one, str) else one
        return FunctionReward(fn, on_error=s.reward_on_error, timeout=config.reward_timeout,
                              workers=config.reward_workers)

    if isinstance(spec, list | tuple) and len(spec) == 1:
        spec = spec[0]
    check_http_settings(spec, s)
    if isinstance(spec, list | tuple):
        from alignkit.training.online.multi_reward import MultiReward, parse_weights, reward_names

        if config.reward_model is not None:
            raise ValueError("several --reward and --reward-model together: give the reward model as one of "
                             "the rewards' functions, or use one kind")
        return MultiReward([function_role(one) for one in spec], reward_names(list(spec)),
                           parse_weights(config.reward_weights, len(spec)), s.reward_aggregation, s.group_size)
    if config.reward_weights is not None:
        raise ValueError("--reward-weights weighs several --reward; this run has one reward")
    if spec is None and config.reward_model is not None and saved_kind(config.reward_model) in SCORER_KINDS:
        spec = f"rm:{config.reward_model}"  # an ensemble, BRME, ArmoRM-style, embedding, SALMON or VPL RM: its scorer
    if s.ensemble_reduce is not None and not isinstance(spec, str):
        raise ValueError(f"ensemble_reduce={s.ensemble_reduce}: it reduces an ensemble's members; give the "
                         "ensemble as --reward rm:DIR")
    if spec is not None:
        return function_role(spec)
    if config.reward_model is None and (s.distill_loss != "none" or config.env is not None):
        return FunctionReward(no_task_reward)  # the teacher's KL, or the environment's rewards, is the signal
    if config.reward_model is None:
        raise ValueError(f"{config.algorithm} needs a reward: --reward module:function or --reward-model DIR")
    if model_dir_of_kind(config.reward_model, "segment_rm") is not None:
        return segment_reward_role(config, config.reward_model, tokenizer, s, flag="--reward-model")
    if model_dir_of_kind(config.reward_model, "seq2seq_rm") is not None:
        return seq2seq_reward_role(config, config.reward_model, tokenizer, s)
    if saved_kind(config.reward_model) == "preference_model":
        raise ValueError(f"--reward-model {config.reward_model} is a pairwise preference model: it judges pairs, "
                         "not samples; pass it to nash_md as --preference-model DIR")
    if is_vision_model_dir(config.reward_model):  # a VLM reward model: it reads each row's images
        return vision_model_reward(config.reward_model, "--reward-model", tokenizer, config, s,
                                   device=_device(config), dtype=_dtype(config))
    model, rm_tokenizer = load_model(config.reward_model, kind="reward", dtype=_dtype(config),
                                     device=_device(config), trust_remote_code=config.trust_remote_code)
    require_trained_head(config.reward_model, model, "--reward-model")
    return ModelReward(model, rm_tokenizer, tokenizer)


SCORER_KINDS = ("ensemble", "embedding_rm", "multi_objective", "brme", "principles_rm", "vpl_rm")
"""Saved reward models that score through their own scorer (`load_reward`), not as one classifier."""


def directional_reward(config: TrainConfig, spec: Any, s: OnlineSettings) -> DirectionalReward:
    """dpa's reward: the two `dpa_attributes` of an rm_multi model (rm:DIR or --reward-model DIR),
    or a function (a spec or a callable) returning two attribute scores per sample."""
    names = tuple(name.strip() for name in s.dpa_attributes.split(","))
    if isinstance(spec, list | tuple):
        raise ValueError("dpa scalarises one two-attribute reward; give one --reward (or --reward-model)")
    directory = spec[3:] if isinstance(spec, str) and spec.startswith("rm:") else None
    if spec is None:
        directory = config.reward_model
    if directory is not None:
        return DirectionalReward(rm_multi_attributes(directory, names))
    if spec is None:
        raise ValueError(f"{config.algorithm} needs a two-attribute reward: --reward rm:DIR of an rm_multi model "
                         "or --reward module:function returning (N, 2) scores")
    return DirectionalReward(load_reward(spec) if isinstance(spec, str) else spec)


def no_task_reward(prompts, completions, **columns) -> list[float]:
    """distill or --env without --reward: no task reward (0 for every sample); the KL to the
    teacher, or the environment's rewards, is the whole signal."""
    return [0.0] * len(completions)


def _dtype(config: TrainConfig):
    return None if config.dtype == "auto" else config.dtype


def _device(config: TrainConfig):
    return distributed.default_device(distributed.current(), config.device)
