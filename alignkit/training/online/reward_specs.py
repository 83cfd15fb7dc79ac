"""Reward specs of the online loop: which saved model a spec names, the model-backed dense
rewards (rm_segment, rm_seq2seq), the per-user options (principles, user context) and the
reward-server settings, and `load_reward_spec` that applies them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit.agents.reward_specs import load_reward  # rewards.load_reward + rlhs:CONFIG.yaml
from alignkit.models.heads import require_trained_head
from alignkit.rewards.loading import saved_model_options
from alignkit.training.online.presets import OnlineSettings
from alignkit.training.online.roles import FunctionReward
from alignkit.training.run import distributed
from alignkit.training.run.config import TrainConfig


def saved_kind(directory: str) -> str:
    """The kind of reward model saved in `directory` (`rewards.saved.reward_model_kind`), or
    "plain" for a hub id or a path that is not a directory."""
    from alignkit.rewards.saved import reward_model_kind

    return reward_model_kind(directory) if Path(directory).is_dir() else "plain"


def model_dir_of_kind(spec: str, kind: str) -> str | None:
    """The directory a reward spec (`rm:DIR` or DIR) names when it holds a model of `kind`
    (`saved_kind`: segment_rm, seq2seq_rm, ...), else None."""
    directory = spec[3:] if spec.startswith("rm:") else spec
    return directory if saved_kind(directory) == kind else None


def model_backed_reward(scorer: Any, config: TrainConfig, s: OnlineSettings) -> FunctionReward:
    """`scorer` as a reward role that, under torchrun, splits its rows like a reward model."""
    role = FunctionReward(scorer, on_error=s.reward_on_error, timeout=config.reward_timeout,
                          workers=config.reward_workers)
    role.model_backed = True
    return role


def segment_reward_role(config: TrainConfig, directory: str, tokenizer, s: OnlineSettings, *,
                        flag: str) -> FunctionReward:
    """An `rm_segment` model (Fine-Grained RLHF's segment reward models) as a dense reward: each
    segment's score (at the model's saved granularity) on its last sampled token
    (`SegmentRewardScorer` with the policy's tokenizer). Under torchrun it splits its rows
    (`model_backed`), like a reward model."""
    from alignkit.rewards import SegmentRewardScorer

    scorer = SegmentRewardScorer(directory, device=_device(config), policy_tokenizer=tokenizer)
    require_trained_head(directory, scorer.model, flag, fix="Pass a directory written by `alignkit train rm_segment`")
    return model_backed_reward(scorer, config, s)


def check_http_settings(spec: Any, s: OnlineSettings) -> None:
    """--set reward_http_* without any --reward http://... is a mistake worth saying."""
    given = [name for name in ("reward_http_batch_size", "reward_http_timeout", "reward_http_retries")
             if getattr(s, name) is not None]
    specs = spec if isinstance(spec, list | tuple) else [spec]
    if given and not any(isinstance(one, str) and one.strip().startswith(("http://", "https://")) for one in specs):
        raise ValueError(f"--set {given[0]} applies to --reward http://HOST:PORT/PATH; this run's reward is not "
                         "a server")


PERSONAL_KINDS = {"principles": "principles_rm", "user_context": "vpl_rm"}
"""`--set principles=FILE` / `--set user_context=FILE` and the saved kind each is given to."""


def spec_kind(spec: str) -> str:
    """`saved_kind` of the directory a reward spec names (`rm:DIR[,key=FILE]` or DIR; "plain" for
    any other spec, such as a regex with commas)."""
    from alignkit.rewards.loading import saved_model_options

    if not spec.startswith("rm:"):
        return saved_kind(spec)
    return saved_kind(saved_model_options(spec[3:], spec)[0])


def personal_reward_options(spec: str, s: OnlineSettings) -> dict[str, str]:
    """{"principles": FILE} for an rm_principles model, {"user_context": FILE} for an rm_vpl one,
    from the settings; {} for any other reward."""
    kind = spec_kind(spec)
    return {key: getattr(s, key) for key, wanted in PERSONAL_KINDS.items()
            if getattr(s, key) is not None and kind == wanted}


def check_personal_options(specs: list[Any], s: OnlineSettings) -> None:
    """`--set principles=` / `user_context=` must reach a reward of the matching kind."""
    for key, wanted in PERSONAL_KINDS.items():
        if getattr(s, key) is None:
            continue
        kinds = [spec_kind(x) for x in specs if isinstance(x, str)]
        if wanted not in kinds:
            model = "an rm_principles" if key == "principles" else "an rm_vpl"
            raise ValueError(f"--set {key}={getattr(s, key)} is for {model} reward model (--reward rm:DIR); "
                             f"this run's rewards are {kinds or 'Python callables'}")


def seq2seq_reward_role(config: TrainConfig, directory: str, tokenizer, s: OnlineSettings) -> FunctionReward:
    """An `rm_seq2seq` model (Zhou et al. 2024) as a dense reward: a score on every sampled token
    (`Seq2SeqRewardScorer` with the policy's tokenizer), split over ranks like a reward model."""
    from alignkit.rewards import Seq2SeqRewardScorer

    return model_backed_reward(Seq2SeqRewardScorer(directory, device=_device(config), policy_tokenizer=tokenizer),
                               config, s)


def model_placement(spec: str, config: TrainConfig | None) -> dict[str, Any]:
    """`device` (and `dtype`) for a spec that loads a model in this process: an `rm:DIR` (or a
    bare directory) on the policy's device and dtype, each torchrun rank on its own GPU; a
    `judge:MODEL` on that device. {} for other specs, an embedding RM (MiniLM on the CPU) and
    without a config (alignkit.train's callables)."""
    spec = spec.strip()
    if config is None or spec.startswith(("http://", "https://")):
        return {}
    if spec.startswith("judge:"):
        return {"device": _device(config)}
    directory = saved_model_options(spec[3:], spec)[0] if spec.startswith("rm:") else spec
    if not spec.startswith("rm:") and not Path(directory).is_dir():
        return {}
    if Path(directory).is_dir() and saved_kind(directory) == "embedding_rm":
        return {}
    dtype = None if config.dtype == "auto" else config.dtype
    return {"device": _device(config), **({"dtype": dtype} if dtype is not None else {})}


def load_reward_spec(spec: str, s: OnlineSettings, config: TrainConfig | None = None):
    """`load_reward(spec)`, with `ensemble_reduce` (and its lambdas) for an `rm:DIR` of an
    rm_ensemble or rm_bayes model; a reduction the model cannot take is an error naming both.
    A model it loads goes to the run's device and dtype (`model_placement`)."""
    http_options = {key: value for key, value in (("batch_size", s.reward_http_batch_size),
                                                   ("timeout", s.reward_http_timeout),
                                                   ("retries", s.reward_http_retries)) if value is not None}
    if spec.strip().startswith(("http://", "https://")):
        if s.ensemble_reduce is not None:
            raise ValueError(f"ensemble_reduce={s.ensemble_reduce} reduces an rm:DIR ensemble; --reward {spec} is a "
                             "server (reduce on the server's side)")
        return load_reward(spec, **http_options)
    placement = model_placement(spec, config)
    if s.ensemble_reduce is None:
        return load_reward(spec, **personal_reward_options(spec, s), **placement)
    directory = spec[3:] if spec.startswith("rm:") else spec
    kind = saved_kind(directory) if Path(directory).is_dir() else "not a reward-model directory"
    if s.ensemble_reduce == "brme" and kind == "brme":
        return load_reward(spec, lambda_=s.brme_lambda, **placement)
    if s.ensemble_reduce != "brme" and kind == "ensemble":
        return load_reward(spec, aggregation=s.ensemble_reduce, uwo_lambda=s.uwo_lambda, **placement)
    wanted = "an rm_bayes model" if s.ensemble_reduce == "brme" else "an rm_ensemble model"
    raise ValueError(f"ensemble_reduce={s.ensemble_reduce} needs {wanted}; --reward {spec} is {kind}")


def _device(config: TrainConfig):
    return distributed.default_device(distributed.current(), config.device)
