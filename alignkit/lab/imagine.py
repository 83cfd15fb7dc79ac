"""`alignkit imagine`: a model writes synthetic multi-turn dialogues from a task description
(the "imagination engine" of Hong, Levine & Dragan 2023, "Zero-Shot Goal-Directed Dialogue via
RL on Imagined Conversations"), for offline training of the agent over turns (`filtered_bc`).

1. personas (the paper's "reasoning" step): the task file's, or `n_personas` written by the
   model, a `suboptimal_fraction` of them asked to be vague, unsure, uncooperative,
   contradictory or off-topic (`imagine_task.persona_behaviours`);
2. dialogues ("imagination"): dialogue d plays persona d mod P; the user speaks first and each
   of `max_turns` turns is one user message and the agent's reply. Every message is sampled
   from the same model prompted as that role: the user simulator sees its persona in the
   system prompt and the conversation with roles swapped (its own messages as assistant), the
   agent sees the task as its system prompt and never the persona. All dialogues advance one
   message at a time in one batch on `HFEngine`;
3. labels ("critique"): a reward spec applied to each whole transcript, or the model's own
   judgement, P(yes) from the logits of one forward pass over a yes/no question.

Deviations from the paper: one model plays every part (the paper used GPT-3.5 for imagination
and a smaller agent), there is no rewrite of dialogues in the critique step, and every
dialogue runs all its turns (no early end).

Reproducible: the noise of message k of dialogue d is keyed on (seed, k, d) (`turn_seed`;
the engine's counter-based noise), so one seed gives the same file.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.data import pad_left
from alignkit.lab.generation_eval import encode_prompts, progress_bar, stop_token_ids
from alignkit.lab.imagine_task import (
    ImagineTask,
    Persona,
    judge_request,
    load_task,
    persona_behaviours,
    persona_request,
    persona_text,
    user_opening,
    user_system_prompt,
)
from alignkit.lab.policy_loading import load_policy
from alignkit.models import position_ids_from_mask
from alignkit.rewards import load_reward, score_safely
from alignkit.rollout import HFEngine, SamplingParams

log = logging.getLogger("alignkit")

Message = dict[str, str]
YES_WORDS, NO_WORDS = ("Yes", "yes", " Yes", " yes"), ("No", "no", " No", " no")
RETRIES = 3
"""Times an empty message is sampled again (with the next seed) before it is kept empty."""


@dataclass
class ImagineOptions:
    """`alignkit imagine` options."""

    task: str
    """Task file (YAML): task, agent_role, user_role, scenario, personas or n_personas +
    suboptimal_fraction, reward (see `alignkit.lab.imagine_task`)."""
    model: str = "smollm2-135m"
    """The model that writes personas and plays both roles (and judges): a model directory,
    a LoRA adapter, a training checkpoint, a hub id or `smollm2-135m`."""
    out: str = "dialogues.jsonl"
    """Output JSONL; manifest.json is written beside it."""
    n: int = 64
    """Number of dialogues."""
    max_turns: int = 6
    """Turns per dialogue; a turn is one user message and the agent's reply."""
    seed: int = 0
    """Seed of every sample (same seed, model and task: the same file)."""
    max_new_tokens: int = 64
    """Length limit of each message (and persona description)."""
    temperature: float = 0.8
    """Sampling temperature of every message."""
    top_p: float = 0.95
    """Nucleus sampling of every message."""
    batch_size: int = 16
    """Most sequences decoded (or judged) together."""
    device: str | None = None
    """cpu, cuda, cuda:1, ... (default: cuda when available)."""
    no_progress: bool = False
    """Hide the progress bar (it is shown only when stderr is a terminal)."""


def turn_seed(seed: int, message: int, attempt: int = 0) -> int:
    """Seed of message `message` of every dialogue (attempt > 0: resampling an empty one);
    the engine's noise is further keyed on the dialogue's row. Persona k uses message -1-k."""
    return (seed * 1_000_003 + (message + 1_000) * 101 + attempt) % (2**63)


def clean_message(text: str, speaker: str, other: str) -> str:
    """One message out of raw model text: a leading "Speaker:" label dropped, and anything
    from a line that starts with either role's label on cut (the model writing on as the
    other side). Labels match case-insensitively."""
    labels = "|".join(re.escape(name) for name in (speaker, other))
    text = re.sub(rf"^\s*(?:{re.escape(speaker)})\s*:\s*", "", text.strip(), flags=re.IGNORECASE)
    cut = re.search(rf"\n\s*(?:{labels})\s*:", text, flags=re.IGNORECASE)
    return (text[: cut.start()] if cut else text).strip()


def agent_view(task: ImagineTask, dialogue: list[Message]) -> list[Message]:
    """The conversation the agent continues: the task as system prompt, then the dialogue."""
    return [{"role": "system", "content": task.task}, *dialogue]


def user_view(task: ImagineTask, persona: Persona, dialogue: list[Message]) -> list[Message]:
    """The conversation the user simulator continues: its persona as system prompt, then the
    dialogue with roles swapped (its own messages as assistant), or an opening cue."""
    swapped = [{"role": "user" if m["role"] == "assistant" else "assistant", "content": m["content"]}
               for m in dialogue]
    return [{"role": "system", "content": user_system_prompt(task, persona)},
            *(swapped or [{"role": "user", "content": user_opening(task)}])]


def transcript(task: ImagineTask, dialogue: list[Message]) -> str:
    """"customer: ...\nsupport agent: ..." lines (what rewards and the judge read)."""
    names = {"user": task.user_role, "assistant": task.agent_role}
    return "\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in dialogue)


class Writer:
    """Samples one message for each of a batch of conversations with `HFEngine`."""

    def __init__(self, model: Any, tokenizer: Any, options: ImagineOptions) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--model {options.model}: its tokenizer has no chat template; imagine "
                             "prompts the model as each role of a chat")
        self.tokenizer, self.options = tokenizer, options
        self.stops = stop_token_ids(tokenizer)
        self.engine = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_ids=self.stops,
                               max_batch_size=options.batch_size)
        self.empty = 0  # messages still empty after RETRIES resamples

    def sample(self, conversations: list[list[Message]], seed: int) -> list[str]:
        """One reply per conversation (raw text), n=1 each; row d's noise is keyed on d."""
        params = SamplingParams(max_new_tokens=self.options.max_new_tokens, temperature=self.options.temperature,
                                top_p=self.options.top_p, seed=seed, stop_token_ids=self.stops)
        rollout = self.engine.generate(encode_prompts(self.tokenizer, conversations), 1, params)
        return [self.tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
                for ids, mask in zip(rollout.response_ids.cpu(), rollout.response_mask.cpu().bool(), strict=True)]

    def write(self, conversations: list[list[Message]], message: int, speaker: str, other: str) -> list[str]:
        """Cleaned messages (`clean_message`); empty ones are resampled up to RETRIES times."""
        texts = [clean_message(t, speaker, other) for t in self.sample(conversations, turn_seed(self.options.seed, message))]
        for attempt in range(1, RETRIES + 1):
            empty = [i for i, t in enumerate(texts) if not t]
            if not empty:
                break
            again = self.sample([conversations[i] for i in empty], turn_seed(self.options.seed, message, attempt))
            for i, text in zip(empty, again, strict=True):
                texts[i] = clean_message(text, speaker, other)
        self.empty += sum(not t for t in texts)
        return texts


def write_personas(writer: Writer, task: ImagineTask) -> list[Persona]:
    """The task's personas, or `n_personas` written by the model (module docstring, step 1)."""
    if task.personas is not None:
        return list(task.personas)
    behaviours = persona_behaviours(task.n_personas, task.suboptimal_fraction)
    requests = [persona_request(task, behaviour) for behaviour, _ in behaviours]
    descriptions = writer.write(requests, -1, task.user_role, task.agent_role)
    return [Persona(persona_text(text or f"A {task.user_role}.", behaviour), bad)
            for text, (behaviour, bad) in zip(descriptions, behaviours, strict=True)]


def imagine_dialogues(writer: Writer, task: ImagineTask, personas: list[Persona], n: int, max_turns: int,
                      progress: Any = None) -> list[list[Message]]:
    """`n` dialogues of `max_turns` (user, agent) turns, all advanced together (step 2)."""
    dialogues: list[list[Message]] = [[] for _ in range(n)]
    cast = [personas[d % len(personas)] for d in range(n)]
    for message in range(2 * max_turns):
        if message % 2 == 0:
            views = [user_view(task, p, d) for p, d in zip(cast, dialogues, strict=True)]
            texts = writer.write(views, message, task.user_role, task.agent_role)
        else:
            views = [agent_view(task, d) for d in dialogues]
            texts = writer.write(views, message, task.agent_role, task.user_role)
        role = "user" if message % 2 == 0 else "assistant"
        for dialogue, text in zip(dialogues, texts, strict=True):
            dialogue.append({"role": role, "content": text})
        if progress is not None:
            progress.update(n)
    return dialogues


def answer_token_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The first token of each spelling of yes and of no, minus tokens that start both (a bare
    space where " yes" is not one token); ValueError when nothing is left on a side."""
    def first_ids(words: tuple[str, ...]) -> set[int]:
        return {tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words}

    yes, no = first_ids(YES_WORDS), first_ids(NO_WORDS)
    shared = yes & no
    if not yes - shared or not no - shared:
        raise ValueError("every spelling of 'yes' starts with a token that also starts 'no' in this "
                         "tokenizer; the judge cannot tell them apart")
    return sorted(yes - shared), sorted(no - shared)


@torch.no_grad()
def judge_yes_probability(model: Any, tokenizer: Any, requests: list[list[Message]], batch_size: int) -> list[float]:
    """P(yes) = sum_yes p / (sum_yes p + sum_no p) of the next token after each request's
    generation prompt, p = softmax(logits at the last position), one forward pass per batch."""
    yes, no = answer_token_ids(tokenizer)
    device = next(model.parameters()).device
    prompts = encode_prompts(tokenizer, requests)
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        input_ids, mask = pad_left(prompts[start : start + batch_size], tokenizer.pad_token_id)
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                       use_cache=False).logits[:, -1].float()  # (B, V): left padding, last = real
        log_probs = torch.log_softmax(logits, dim=-1)
        log_yes, log_no = log_probs[:, yes].logsumexp(-1), log_probs[:, no].logsumexp(-1)  # (B,)
        out += torch.sigmoid(log_yes - log_no).tolist()
    return out


def label_dialogues(model: Any, tokenizer: Any, task: ImagineTask, dialogues: list[list[Message]],
                    personas: list[Persona], batch_size: int) -> list[float]:
    """One reward per dialogue (step 3): the judge's P(yes) or the reward spec's score of the
    transcript (prompt = the task; columns `messages`, `persona`, `suboptimal` passed too)."""
    texts = [transcript(task, d) for d in dialogues]
    choice = task.reward
    if choice.judge:
        requests = [judge_request(task, text, choice.question) for text in texts]
        return judge_yes_probability(model, tokenizer, requests, batch_size)
    fn = load_reward(choice.spec, **choice.kwargs)
    scores, _ = score_safely(fn, [task.task] * len(texts), texts, messages=dialogues,
                             persona=[p.text for p in personas], suboptimal=[p.suboptimal for p in personas])
    if scores.dim() != 1:
        raise ValueError(f"{task.source}: reward {choice.spec!r} returned {tuple(scores.shape)} scores; "
                         "imagine needs one number per dialogue")
    return scores.double().tolist()


def reward_stats(rewards: list[float], suboptimal: list[bool]) -> dict[str, Any]:
    """Mean, std, min, quartiles, max over all dialogues, and the mean per persona kind."""
    values = np.asarray(rewards, dtype=np.float64)
    stats = {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
             "q25": float(np.quantile(values, 0.25)), "median": float(np.median(values)),
             "q75": float(np.quantile(values, 0.75)), "max": float(values.max())}
    flags = np.asarray(suboptimal, dtype=bool)
    for name, rows in (("mean_suboptimal", flags), ("mean_cooperative", ~flags)):
        stats[name] = float(values[rows].mean()) if rows.any() else None
    return stats


def check_options(options: ImagineOptions) -> None:
    for flag, value, least in (("--n", options.n, 1), ("--max-turns", options.max_turns, 1),
                               ("--max-new-tokens", options.max_new_tokens, 1), ("--batch-size", options.batch_size, 1),
                               ("--seed", options.seed, 0)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if not (math.isfinite(options.temperature) and options.temperature >= 0):
        raise ValueError(f"--temperature must be >= 0, got {options.temperature}")
    if not 0.0 < options.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {options.top_p}")
    out = Path(options.out)
    if out.is_dir():
        raise ValueError(f"--out {out}: is a directory; name the JSONL file to write")


def run_imagine(options: ImagineOptions) -> dict[str, Any]:
    """Write `options.out` (one dialogue per line) and manifest.json beside it; return the manifest."""
    check_options(options)
    task = load_task(options.task)  # a bad task file fails before the model loads
    started = time.perf_counter()
    model, tokenizer = load_policy(options.model, device=options.device)
    model.eval()
    writer = Writer(model, tokenizer, options)
    show = not options.no_progress and sys.stderr.isatty()
    persona_steps = 0 if task.personas is not None else task.n_personas
    total = persona_steps + options.n * 2 * options.max_turns + options.n
    with progress_bar(show, "imagine", total, "message") as bar:
        personas = write_personas(writer, task)
        bar.update(persona_steps)
        dialogues = imagine_dialogues(writer, task, personas, options.n, options.max_turns, progress=bar)
        cast = [personas[d % len(personas)] for d in range(options.n)]
        rewards = label_dialogues(model, tokenizer, task, dialogues, cast, options.batch_size)
        bar.update(options.n)
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as handle:
        for d, (dialogue, persona, reward) in enumerate(zip(dialogues, cast, rewards, strict=True)):
            row = {"messages": agent_view(task, dialogue), "reward": float(reward), "persona": persona.text,
                   "suboptimal": persona.suboptimal, "seed": options.seed, "id": d}
            handle.write(json.dumps(row) + "\n")
    manifest = {
        "task": task.task, "task_file": str(options.task), "agent_role": task.agent_role,
        "user_role": task.user_role, "model": options.model, "reward": task.reward.describe(),
        "counts": {"dialogues": options.n, "turns": options.max_turns, "messages_per_dialogue": 2 * options.max_turns,
                   "personas": len(personas), "suboptimal_dialogues": sum(p.suboptimal for p in cast),
                   "empty_messages": writer.empty},
        "reward_stats": reward_stats(rewards, [p.suboptimal for p in cast]),
        "personas": [asdict(p) for p in personas],
        "settings": asdict(options),
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out.parent / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if writer.empty:
        log.warning("%d messages were still empty after %d resamples each (kept empty)", writer.empty, RETRIES)
    stats = manifest["reward_stats"]
    print(f"{options.n} dialogues x {options.max_turns} turns -> {out} ({manifest['seconds']:.1f} s); reward "
          f"mean {stats['mean']:.3f} (std {stats['std']:.3f}, min {stats['min']:.3f}, max {stats['max']:.3f})")
    return manifest


def main(argv: list[str]) -> int:
    import tyro

    run_imagine(tyro.cli(ImagineOptions, args=argv, prog="alignkit imagine",
                         description=__doc__.split("\n\n")[0]))
    return 0
