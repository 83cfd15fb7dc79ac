"""Reward and cost models that read the images of online image prompts (Safe RLHF-V's setting).

A prompt row's `images` reach every reward of an online run opened (RGB PIL images, relative
paths resolved against the data file as the offline loaders resolve them: `image_reward_columns`),
so a vision-language reward or cost model (a score head on a VLM, `alignkit train rm|cost` on
image rows; `alignkit.models.vlm_reward`) scores each sample with its own row's pixels.
`--reward-model DIR` / `--cost-model DIR` of such a model becomes a `RewardModelScorer` behind a
`FunctionReward` (`vision_model_reward`): the runner hands it the row's prompt messages, the
completion as an assistant message and the row's images, and the scorer tokenises them through
the reward model's processor exactly as `alignkit train rm` did, so its online score of a sample
is its offline score of the same row. A text reward or cost model cannot read the images: on
image prompts it is refused in one line (`text_reward_models`).
"""

from __future__ import annotations

from typing import Any

from alignkit.data.context import saved_context_columns
from alignkit.data.images import image_base_dir, open_image
from alignkit.data.table import RowTable
from alignkit.models.heads import require_trained_head
from alignkit.models.loading import resolve_model_path
from alignkit.models.vlm import is_vlm_dir
from alignkit.rewards.runner import reward_columns
from alignkit.rewards.scorer import RewardModelScorer
from alignkit.training.online.roles import FunctionReward
from alignkit.training.online.settings import OnlineSettings
from alignkit.training.run.config import TrainConfig


def image_reward_columns(table: RowTable) -> list[dict[str, Any]]:
    """`reward_columns` of every prompt row with its `images` opened (RGB PIL images); a missing
    or unreadable image is an error naming the file, row and image."""
    columns = []
    for i, row in enumerate(table.rows):
        one = reward_columns(row)
        if row.get("images") is not None:
            base_dir = image_base_dir(table.origin(i)[0])
            opened = []
            for k, item in enumerate(row["images"]):
                try:
                    opened.append(open_image(item, base_dir))
                except ValueError as err:
                    raise table.error(i, f"images[{k}]: {err}") from None
            one["images"] = opened
        columns.append(one)
    return columns


def reward_model_directory(spec: Any) -> str | None:
    """The directory of an `rm:DIR[,options]` reward spec, else None."""
    if isinstance(spec, str) and spec.strip().startswith("rm:"):
        return spec.strip()[3:].split(",")[0]
    return None


def text_reward_models(config: TrainConfig) -> list[str]:
    """The reward and cost models of this run that are not vision-language models (each as
    'FLAG DIR'): they would score the prompts' text without their images."""
    specs = config.reward if isinstance(config.reward, list | tuple) else [config.reward]
    named = [("--reward-model", config.reward_model), ("--cost-model", config.cost_model)]
    named += [("--reward", reward_model_directory(spec)) for spec in specs]
    return [f"{flag} {directory}" for flag, directory in named
            if directory is not None and not is_vlm_dir(resolve_model_path(directory))]


def is_vision_model_dir(directory: str | None) -> bool:
    """True for a saved vision-language model (a VLM reward or cost model has one's config)."""
    return directory is not None and is_vlm_dir(resolve_model_path(directory))


def vision_model_reward(directory: str, flag: str, policy_tokenizer: Any, config: TrainConfig, s: OnlineSettings,
                        *, device: Any, dtype: Any) -> FunctionReward:
    """A VLM reward or cost model (`flag` names where it came from) as a reward role that scores
    each sample with its row's images; a VLM without a trained score head is refused."""
    from alignkit.models.vlm_reward import load_vlm_reward

    model, processor = load_vlm_reward(directory, device=device, dtype=dtype)
    trainer = "alignkit train cost" if flag == "--cost-model" else "alignkit train rm"
    require_trained_head(directory, model, flag,
                         fix=f"Pass a directory written by `{trainer}` on image rows (its final/)")
    scorer = RewardModelScorer(model, processor, policy_tokenizer=policy_tokenizer,
                               context_columns=saved_context_columns(resolve_model_path(directory)))
    scorer.__name__ = f"{flag} {directory}"
    role = FunctionReward(scorer, on_error=s.reward_on_error, timeout=config.reward_timeout,
                          workers=config.reward_workers)
    role.model_backed = True
    return role
