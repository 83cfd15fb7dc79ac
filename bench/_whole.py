"""Whole-process benchmarks: each side is a command a user would type (`alignkit train ...`
against a plain TRL script, `trl_dpo_script.py` / `trl_grpo_script.py`), timed from outside
like a stopwatch: start-up, imports, model load, tokenisation, reference pass, training and
the final save all count. Neither side is told how many threads to use (torch's default for
TRL, `--threads 0` = auto for alignkit) unless `--threads N` is given.

Per run: wall seconds (monotonic clock around the child), user + system CPU seconds and the
child's own peak RSS, read from `os.wait4` (the kernel's accounting of that one child). Runs
alternate A B B A ...; medians are reported, with the ratios of the medians.

The workload model is a random Llama with a 2,048-token byte-level BPE vocabulary trained on
made-up words (`build_vocab_llama`); the data are prompts and responses of whole words from
the same word list (`word_pairs`, `word_prompts`), so every word costs 1-3 tokens.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "tr", "pl"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["", "", "n", "r", "s", "t", "l", "m"]


def word_list(n: int = 1200, seed: int = 0) -> list[str]:
    """`n` distinct made-up words of 1-3 syllables."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                          for _ in range(rng.randint(1, 3))))
    return sorted(words)


def build_vocab_llama(path: str | Path, *, vocab_size: int = 2048, hidden_size: int = 256,
                      num_layers: int = 4, num_heads: int = 4, seed: int = 0) -> Path:
    """A random `LlamaForCausalLM` with a byte-level BPE tokenizer of `vocab_size` tokens
    (trained on `word_list()` text; eos/bos/pad and a chat template as alignkit's tiny
    tokenizer), saved with `save_pretrained`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from alignkit.testing import CHAT_TEMPLATE

    words = word_list(seed=seed)
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(2000)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                   bos_token="<|endoftext|>", pad_token="<pad>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=512, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    path = Path(path)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    return path


def bench_model(args, workdir: Path) -> str:
    """`--model` when given, else a made-up-word Llama built in `workdir` from the bench's
    --vocab-size, --hidden-size, --num-layers, --num-heads and --seed."""
    if args.model:
        return args.model
    return str(build_vocab_llama(workdir / "model", vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                                 num_layers=args.num_layers, num_heads=args.num_heads, seed=args.seed))


def _words(rng: random.Random, words: list[str], low: int, high: int) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))


def word_pairs(n: int, seed: int = 0, prompt_words: tuple[int, int] = (8, 24),
               response_words: tuple[int, int] = (16, 48)) -> list[dict]:
    """Preference pairs of made-up words: prompts of 8-24 words, chosen and rejected of 16-48
    words each (lengths drawn independently); chosen words from the first half of the list,
    rejected from the second, so the preference is learnable."""
    words = word_list()
    good, bad = words[: len(words) // 2], words[len(words) // 2:]
    rng = random.Random(seed)
    return [{"prompt": _words(rng, words, *prompt_words),
             "chosen": " " + _words(rng, good, *response_words),
             "rejected": " " + _words(rng, bad, *response_words)} for _ in range(n)]


def word_prompts(n: int, seed: int = 0, prompt_words: tuple[int, int] = (8, 24)) -> list[dict]:
    """Prompt-only rows of 8-24 made-up words."""
    rng = random.Random(seed)
    words = word_list()
    return [{"prompt": _words(rng, words, *prompt_words)} for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


REWARD_FILE = '''"""The shared rule reward of the whole-process GRPO benchmark: +1 per letter e."""


def count_e(prompts, completions, **kwargs):
    return [float(str(text).count("e")) for text in completions]
'''


def time_process(cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 1800,
                 log_path: Path | None = None) -> dict:
    """Run `cmd` to its end; wall seconds, user/system CPU seconds and the child's peak RSS
    (MiB, `os.wait4`). Its output goes to `log_path` (or is discarded); a non-zero exit raises
    RuntimeError with the log's tail."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    started = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    deadline = started + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.01)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log_path:
        out.close()
    if proc.returncode != 0:
        tail = Path(log_path).read_text()[-3000:] if log_path else ""
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{tail}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "user_s": usage.ru_utime,
            "sys_s": usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def alternating(names: Sequence[str], runs: int) -> list[str]:
    """A B B A A B ...: each name goes first as often as the other (drift cancels)."""
    order: list[str] = []
    for r in range(runs):
        order += list(names) if r % 2 == 0 else list(names)[::-1]
    return order


def run_whole(commands: dict[str, Callable[[int], tuple[list[str], dict[str, str]]]], runs: int,
              workdir: Path, timeout: float, log: Callable[[str], None] = print) -> dict[str, list[dict]]:
    """Time every command `runs` times in alternating order; `commands[name](run)` gives the
    argv and extra environment of that run. Results grouped by name."""
    results: dict[str, list[dict]] = {name: [] for name in commands}
    counts = dict.fromkeys(commands, 0)
    for name in alternating(list(commands), runs):
        run = counts[name]
        counts[name] += 1
        cmd, env = commands[name](run)
        result = time_process(cmd, env=env, timeout=timeout, log_path=workdir / f"{name}-{run}.log")
        result["load_before"] = os.getloadavg()[0]
        results[name].append(result)
        log(f"  {name} run {run + 1}/{runs}: {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s cpu, "
            f"{result['peak_rss_mib']:.0f} MiB peak (load {result['load_before']:.1f})")
    return results


def whole_report(results: dict[str, list[dict]], ours: str, theirs: str) -> dict:
    """Medians per name and ours/theirs ratios, printed as two small tables."""
    from _common import print_table

    keys = ("wall_s", "cpu_s", "peak_rss_mib")
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in keys} for name, runs in results.items()}
    spread = {name: (min(r["wall_s"] for r in runs), max(r["wall_s"] for r in runs)) for name, runs in results.items()}
    print_table(["command", "wall s (median)", "wall min", "wall max", "cpu s", "peak RSS MiB"],
                [[n, m["wall_s"], *spread[n], m["cpu_s"], m["peak_rss_mib"]] for n, m in medians.items()],
                title=f"whole process, medians of {min(len(r) for r in results.values())} runs; "
                      f"load average now {os.getloadavg()[0]:.2f}")
    a, b = medians[ours], medians[theirs]
    ratios = {"speedup": b["wall_s"] / a["wall_s"], "cpu_ratio": a["cpu_s"] / b["cpu_s"],
              "peak_rss_ratio": a["peak_rss_mib"] / b["peak_rss_mib"]}
    print_table(["pair", f"speed-up ({theirs} wall / {ours} wall)", "cpu s ratio", "peak RSS ratio"],
                [[f"{ours} / {theirs}", ratios["speedup"], ratios["cpu_ratio"], ratios["peak_rss_ratio"]]],
                title="ratios of the medians (speed-up > 1: alignkit faster; RSS < 1: alignkit smaller)")
    return {"medians": medians, "ratios": ratios}


def alignkit_command() -> list[str]:
    """The `alignkit` console script of this interpreter's environment, else `python -m alignkit`.

    The package's byte-code is compiled first, as `pip install` does for an installed package
    (an editable install leaves that to the first run, which cannot cache it where
    PYTHONDONTWRITEBYTECODE is set): the peer's packages are timed with theirs compiled."""
    import compileall

    compileall.compile_dir(str(BENCH_DIR.parent / "alignkit"), quiet=1)
    script = Path(sys.executable).with_name("alignkit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "alignkit"]
