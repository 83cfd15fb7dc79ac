"""Online runs on vision-language models: prompt rows with an `images` column.

A VLM checkpoint (`alignkit.models.vlm.is_vlm_dir`) loads with its processor; image prompts
tokenise through it (`tokenize_image_prompts`: image tokens expanded, never truncated) and each
prompt keeps its pixel inputs, which ride with the prompt ids into the rollout engine (prefill
once per group) and, per row, into every teacher-forced forward (policy, reference, critic:
`SequenceBatch.prompt_inputs`). Rewards see the row's other columns (`boxes`, `answer`, ...)
as for text. LoRA adapts the language model only; `--vlm-train` picks what else trains in full
(`alignkit.models.vlm.vlm_train_parts`).

What is wired for images: grpo, rloo, ppo, dapo, safe_ppo and the presets that share their code path
(one generation round per step or DAPO's dynamic sampling, a reward function, the in-process
engine, a frozen or adapter-off reference, a separate or shared critic), in one process or under
torchrun (DDP or FSDP2: each rank samples its block of prompt groups with their pixel inputs,
`distributed_rollout.generate_sharded`). What is not, each a
one-line error before anything trains: multi-turn environments, dataset resets (drpo), dpa's
directions, nash_md's opponent, ReMax's greedy baseline, a text reward or cost model (it would
score the text without the images), critics initialised from a reward model (critic_init,
cost_critic_init), a vLLM or Ray rollout engine, --eval-data.

Rewards get each row's images opened (`image_reward_columns`); a vision-language reward or cost
model (`--reward-model`, `--cost-model`, `--reward rm:DIR`) scores each sample with them
(`online/image_rewards.py`), so safe_ppo runs on a VLM with a VLM cost model (Safe RLHF-V).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor

from alignkit.data.image_tokenize import tokenize_image_prompts
from alignkit.data.images import uses_images
from alignkit.data.table import RowTable
from alignkit.models.loading import resolve_model_path
from alignkit.models.vlm import is_vlm_config, is_vlm_dir
from alignkit.training.online.image_rewards import text_reward_models
from alignkit.training.online.settings import OnlineSettings
from alignkit.training.run.config import TrainConfig

log = logging.getLogger("alignkit")


def image_run_conflicts(config: TrainConfig, s: OnlineSettings) -> list[str]:
    """The settings of this run that images do not work with (empty when none)."""
    found = []
    if config.env is not None:
        found.append("--env (multi-turn environments)")
    if s.advantage == "remax":
        found.append("ReMax's greedy baseline")
    if s.mixture_coef is not None:
        found.append("nash_md's mixture opponent")
    if s.dpa:
        found.append("dpa's directional prompts")
    if s.reset_prob > 0.0:
        found.append("drpo's dataset resets")
    found += [f"{named} (a text reward model scores the text without the images; train one on image rows: "
              "`alignkit train rm|cost` on a VLM)" for named in text_reward_models(config)]
    if s.critic_init or s.cost_critic_init:
        found.append("critic_init / cost_critic_init (a critic from a reward model reads no pixels; leave them "
                     "unset to start the critics from the VLM policy)")
    if config.rollout != "hf" or config.placement != "local":
        found.append(f"--rollout {config.rollout} / --placement {config.placement} (the in-process engine only)")
    if config.eval_data is not None:
        found.append("--eval-data")
    return found


def check_image_run(config: TrainConfig, s: OnlineSettings, table: RowTable, model: Any = None) -> bool:
    """Whether the prompts have images; if they do, that the policy (`model`, or --model's
    checkpoint before it loads) is a VLM and nothing in the run ignores the images (one error
    naming what does)."""
    if not uses_images(table):
        return False
    vlm = (is_vlm_config(getattr(model, "config", None)) if model is not None
           else is_vlm_dir(resolve_model_path(config.model)))
    if not vlm:
        raise ValueError(f"the prompts have images but --model {config.model!r} is not a vision-language model "
                         "(its config has no vision_config)")
    conflicts = image_run_conflicts(config, s)
    if conflicts:
        raise ValueError(f"--algorithm {config.algorithm} with image prompts: not supported with "
                         f"{'; '.join(conflicts)}")
    return True


PLACEHOLDER_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
                      "vision_end_token_id")
"""Config fields naming a VLM's image/video placeholder tokens (Qwen2-VL, LLaVA)."""


def placeholder_token_ids(model_config: Any) -> tuple[int, ...]:
    """The image/video placeholder ids of a VLM config: the sampler never draws them, since a
    generated placeholder would claim image features the teacher-forced forward does not have
    (transformers then fails: "Image features and image tokens do not match")."""
    found = {getattr(model_config, name, None) for name in PLACEHOLDER_FIELDS}
    return tuple(sorted(token for token in found if isinstance(token, int) and token >= 0))


def image_prompt_rows(table: RowTable, processor: Any, config: TrainConfig, device) -> tuple[
        list[list[int]], list[dict[str, Tensor] | None], list[str], Any]:
    """(prompt ids, pixel inputs on `device` (None for a row without images), prompt texts for
    the reward, counts) of every prompt row, through the VLM's processor."""
    if processor is None:
        raise ValueError(f"the prompts have images: load --model {config.model!r} from its directory (with its "
                         "processor), or pass the processor as the tokenizer")
    prompt_ids, inputs, stats = tokenize_image_prompts(table, processor, max_prompt_length=config.max_prompt_length)
    inputs = [None if one is None else {key: value.to(device) for key, value in one.items()} for one in inputs]
    tokenizer = processor.tokenizer
    texts = [row["prompt"] if isinstance(row.get("prompt"), str) else tokenizer.decode(ids)
             for row, ids in zip(table.rows, prompt_ids, strict=True)]
    images = sum(len(row.get("images") or []) for row in table.rows)
    log.info("prompts: %d rows, %d images (image tokens expanded, never truncated)", len(prompt_ids), images)
    return prompt_ids, inputs, texts, stats
