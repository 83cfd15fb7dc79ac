"""Preference-training throughput and memory: alignkit against TRL, side by side, per method.

Same model, data, batch size, max length, steps, learning rate (linear decay, no warm-up, as
TRL's default), hyper-parameters, float32 on CPU. Each (method, framework) trains in a fresh
child process (this script with `--worker NAME`), in alternating A/B order over `--rounds`;
medians are reported, and one alignkit/TRL ratio row per method.

    python bench/dpo_vs_trl.py                          # DPO; random Llama, hidden 256, 4 layers
    python bench/dpo_vs_trl.py --steps 6 --rounds 1     # quick smoke run
    python bench/dpo_vs_trl.py --methods all --steps 4 --rounds 1 --json /tmp/methods.json
    python bench/dpo_vs_trl.py --methods ipo,simpo,orpo,kto
    python bench/dpo_vs_trl.py --model ~/.cache/alignkit/smollm2-135m-instruct --batch-size 4
    python bench/dpo_vs_trl.py --model smollm2-shaped --steps 8 --batch-size 4   # 49k vocabulary

Methods (`--methods`, alignkit name -> TRL): the DPOTrainer losses dpo (sigmoid), cdpo
(sigmoid + label_smoothing 0.1), ipo, hinge, rdpo (robust, label_smoothing 0.1), exo (exo_pair,
1e-3), nca (nca_pair), bco (bco_pair), sppo_hard, aot, apo_zero, apo_down, discopop (tau 0.05),
sigmoid_norm; the DPO options wpo (use_weighting), ld_dpo (ld_alpha 0.5), tr_dpo (soft reference
sync every steps/4, alpha 0.6); simpo = CPOTrainer(loss_type="simpo", beta 2, gamma 0.5,
cpo_alpha 0), cpo = CPOTrainer(loss_type="sigmoid", cpo_alpha 1), orpo = ORPOTrainer (lambda =
TRL beta), kto = KTOTrainer (trl.KTOTrainer in 1.16; CPO/ORPO live in trl.experimental). `beta`
is `--beta` for all but simpo. KTO trains on unpaired rows built from the same pairs (chosen ->
label True, rejected -> False, interleaved) with batch 2 x `--batch-size` rows, i.e. the same 2B
sequences per step as the pairwise methods.

Frameworks: `alignkit`; `alignkit-gc` = with gradient checkpointing; `trl` = the TRL trainer with
its defaults (reference log-probs on the fly each step, gradient checkpointing on); `trl-pre` =
the same with precompute_ref_log_probs=True (DPOTrainer/KTOTrainer methods with a fixed reference
only). Default: all four for `--methods dpo`, else alignkit,trl. Measured per child: `steps/s`
over the training loop only (end of step 1 to end of step N, so the first warm-up step is
excluded), `tokens/s` = real (non-pad) prompt+response tokens of every trained sequence per second
of that loop (counted once here from the data, the same for both: mean real tokens per example x
batch x steps), `e2e` = load model + tokenise + reference pass + train + save, `peak RSS` of the
child (ru_maxrss) and `RSS base` = after importing torch + transformers, before either framework.
Children run with `--threads` torch threads (default 1: stable on a shared machine). TRL 1.x has
no max_prompt_length; the synthetic prompts stay under 128 tokens, so neither side cuts them.
A method whose child fails is reported with its error; the others still run.

`--whole-process` times what a user's stopwatch sees instead: `alignkit train dpo ...` as a
subprocess against `bench/trl_dpo_script.py` (the equivalent TRL script) as a subprocess, each
at its default thread count (alignkit auto, torch's default for TRL; `--threads N` pins both),
`--rounds` alternating runs each, median wall seconds, CPU seconds and peak RSS (`os.wait4`),
and the ratios. Default workload: a random tiny Llama (hidden 256 x 4 layers) with a
2,048-token vocabulary, prompts of 8-24 words, responses of 16-48 words, batch 8, 60 steps
(`bench/_whole.py`):

    python bench/dpo_vs_trl.py --whole-process --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    WORKER_ENV,
    build_smollm2_shaped,
    child_env,
    count_tokens,
    current_rss_mib,
    emit_result,
    first_error,
    long_pairs,
    loop_stats,
    median_of,
    peak_rss_mib,
    print_table,
    ratio,
    run_rounds,
    run_worker,
    train_alignkit,
    unpaired_from_pairs,
)

FRAMEWORKS = ("alignkit", "alignkit-gc", "trl", "trl-pre")
# alignkit-gc: with gradient checkpointing, the memory-saving setting TRL uses by default.

DPO_LOSSES = {  # alignkit name -> (TRL DPOTrainer loss_type, extra hyper-parameters (alignkit, TRL))
    "dpo": ("sigmoid", {}, {}),
    "cdpo": ("sigmoid", {"label_smoothing": 0.1}, {"label_smoothing": 0.1}),
    "ipo": ("ipo", {}, {}),
    "hinge": ("hinge", {}, {}),
    "rdpo": ("robust", {"label_smoothing": 0.1}, {"label_smoothing": 0.1}),
    "exo": ("exo_pair", {"label_smoothing": 1e-3}, {"label_smoothing": 1e-3}),
    "nca": ("nca_pair", {}, {}),
    "bco": ("bco_pair", {}, {}),
    "sppo_hard": ("sppo_hard", {}, {}),
    "aot": ("aot", {"label_smoothing": 0.0}, {"label_smoothing": 0.0}),
    "apo_zero": ("apo_zero", {}, {}),
    "apo_down": ("apo_down", {}, {}),
    "discopop": ("discopop", {"tau": 0.05}, {"discopop_tau": 0.05}),
    "sigmoid_norm": ("sigmoid_norm", {}, {}),
}
DPO_OPTIONS = ("wpo", "ld_dpo", "tr_dpo")
OTHER_METHODS = ("simpo", "cpo", "orpo", "kto")
METHODS = (*DPO_LOSSES, *DPO_OPTIONS, *OTHER_METHODS)


def method_spec(name: str, beta: float, steps: int) -> dict:
    """How both frameworks train `name`: alignkit algorithm + hyper-parameters, TRL trainer +
    config keywords, whether a fixed reference exists (trl-pre), the data shape."""
    if name in DPO_LOSSES:
        loss, ours, theirs = DPO_LOSSES[name]
        return {"algorithm": name, "alignkit": {"beta": beta, **ours}, "trainer": "dpo",
                "trl": {"loss_type": [loss], "beta": beta, **theirs}, "precompute": True, "data": "pairs"}
    if name in DPO_OPTIONS:
        ours, theirs, precompute = {
            "wpo": ({"use_weighting": True}, {"use_weighting": True}, True),
            "ld_dpo": ({"ld_alpha": 0.5}, {"ld_alpha": 0.5}, True),
            "tr_dpo": ({"ref_sync": "soft", "ref_sync_alpha": 0.6, "ref_sync_steps": max(1, steps // 4)},
                       {"sync_ref_model": True, "ref_model_mixup_alpha": 0.6,
                        "ref_model_sync_steps": max(1, steps // 4)}, False),
        }[name]
        return {"algorithm": "dpo", "alignkit": {"beta": beta, **ours}, "trainer": "dpo",
                "trl": {"loss_type": ["sigmoid"], "beta": beta, **theirs}, "precompute": precompute,
                "data": "pairs"}
    if name == "simpo":
        return {"algorithm": "simpo", "alignkit": {"beta": 2.0, "gamma": 0.5}, "trainer": "cpo",
                "trl": {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 0.0},
                "precompute": False, "data": "pairs"}
    if name == "cpo":
        return {"algorithm": "cpo", "alignkit": {"beta": beta, "alpha": 1.0}, "trainer": "cpo",
                "trl": {"loss_type": "sigmoid", "beta": beta, "cpo_alpha": 1.0}, "precompute": False,
                "data": "pairs"}
    if name == "orpo":
        return {"algorithm": "orpo", "alignkit": {"lambda_": beta}, "trainer": "orpo",
                "trl": {"beta": beta}, "precompute": False, "data": "pairs"}
    if name == "kto":
        weights = {"desirable_weight": 1.0, "undesirable_weight": 1.0}
        return {"algorithm": "kto", "alignkit": {"beta": beta, **weights}, "trainer": "kto",
                "trl": {"loss_type": "kto", "beta": beta, **weights}, "precompute": True, "data": "unpaired"}
    raise ValueError(f"unknown method {name!r}; choose from {list(METHODS)}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local model dir, or smollm2-shaped (a random Llama with SmolLM2's "
                        "49k vocabulary, hidden/layers as given); default: a random tiny Llama (320-token vocabulary)")
    parser.add_argument("--hidden-size", type=int, default=256, help="random model width")
    parser.add_argument("--num-layers", type=int, default=4, help="random model depth")
    parser.add_argument("--num-heads", type=int, default=4, help="random model attention heads")
    parser.add_argument("--methods", default="dpo",
                        help=f"comma-separated, or 'all' ({','.join(METHODS)})")
    parser.add_argument("--pairs", type=int, default=0, help="preference pairs (0 = batch x steps)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="pairs per step, both frameworks (kto: 2x as many unpaired rows)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (>= 2; default 20, 60 with --whole-process)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1, help="beta of every method but simpo (2.0)")
    parser.add_argument("--max-length", type=int, default=256, help="prompt + response tokens")
    parser.add_argument("--max-prompt-length", type=int, default=128,
                        help="alignkit only (TRL 1.x has no such option; the data keeps prompts shorter)")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank for both (0 = full)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating A/B rounds")
    parser.add_argument("--frameworks", default=None,
                        help=f"comma-separated subset of {','.join(FRAMEWORKS)} (default: all for "
                        "--methods dpo, else alignkit,trl); trl-pre is skipped where it does not apply")
    parser.add_argument("--trl-no-gc", action="store_true",
                        help="turn off TRL's default gradient checkpointing")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per child, same for both (default 1: on a shared box, multi-"
                        "threaded kernels stall whenever another process holds a core; 0 = torch default); "
                        "--whole-process default: each side's own default (alignkit auto, TRL torch's)")
    parser.add_argument("--whole-process", action="store_true",
                        help="time `alignkit train dpo` against the TRL script end to end, as subprocesses")
    parser.add_argument("--vocab-size", type=int, default=2048, help="--whole-process model vocabulary")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--verbose", action="store_true", help="show the children's stderr")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 60 if args.whole_process else 20
    if args.threads is None:
        args.threads = 0 if args.whole_process else 1
    if args.whole_process and args.lora_r:
        parser.error("--whole-process trains all weights on both sides (the TRL script has no LoRA option)")
    if args.steps < 2 and not args.worker:
        parser.error("--steps must be at least 2 (step 1 is the excluded warm-up)")
    return args


# --------------------------------------------------------------------------- workers


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def worker_alignkit(spec: dict, gradient_checkpointing: bool = False) -> dict:
    method = spec["method_spec"]
    return train_alignkit(spec, method["algorithm"], read_rows(spec["data"]), method["alignkit"],
                          gradient_checkpointing=gradient_checkpointing)


def trl_classes(trainer: str):
    """(Config, Trainer) of TRL 1.16: DPO and KTO are stable, CPO and ORPO experimental."""
    if trainer == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    if trainer == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer
    if trainer == "cpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOConfig, CPOTrainer
    if trainer == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer
    raise ValueError(f"unknown TRL trainer {trainer!r}")


def worker_trl(spec: dict, precompute: bool) -> dict:
    method = spec["method_spec"]
    started = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    Config, Trainer = trl_classes(method["trainer"])  # noqa: N806
    import_s = time.perf_counter() - started
    rows = read_rows(spec["data"])
    stamps, losses, peaks = [], [], []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            peaks.append(peak_rss_mib())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    begin = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    peft_config = None
    if spec["lora_r"] > 0:
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    extra = {} if spec["trl_gc"] else {"gradient_checkpointing": False}
    if precompute:
        extra["precompute_ref_log_probs"] = True
    config = Config(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
        learning_rate=spec["lr"], max_length=spec["max_length"],
        lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False,
        dataloader_num_workers=0, seed=spec["seed"], disable_tqdm=True, remove_unused_columns=False,
        **method["trl"], **extra,
    )
    trainer = Trainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer, peft_config=peft_config, callbacks=[Timer()])
    trainer.train()
    trainer.save_model(str(Path(spec["out"]) / "final"))
    end_to_end = time.perf_counter() - begin
    if len(stamps) < 2:
        raise RuntimeError(f"TRL ran only {len(stamps)} step(s); need >= 2 to time the loop")
    return {"import_s": import_s, "end_to_end_s": end_to_end,
            "gradient_checkpointing": bool(config.gradient_checkpointing), **loop_stats(stamps, losses, spec),
            "peak_rss_step1_mib": peaks[0], "peak_rss_loop_mib": peaks[-1]}


def run_as_worker(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.spec).read_text())
    # The common base of both frameworks, imported first: RSS above it is the framework's own.
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    rss_base = current_rss_mib()
    if args.worker.startswith("alignkit"):
        result = worker_alignkit(spec, gradient_checkpointing=args.worker == "alignkit-gc")
    else:
        result = worker_trl(spec, precompute=args.worker == "trl-pre")
    result["peak_rss_mib"] = peak_rss_mib()
    result["rss_base_mib"] = rss_base
    result["torch_threads"] = torch.get_num_threads()
    result["framework"] = args.worker
    result["method"] = spec["method"]
    emit_result(result)


# --------------------------------------------------------------------------- parent


def prepare(args: argparse.Namespace, workdir: Path, methods: list[str]) -> dict:
    from transformers import AutoTokenizer

    model_dir = args.model
    if model_dir is None:
        from alignkit.testing import build_tiny_model

        model_dir = build_tiny_model(workdir / "model", hidden_size=args.hidden_size,
                                     num_layers=args.num_layers, num_heads=args.num_heads, seed=args.seed)
    elif model_dir == "smollm2-shaped":
        model_dir = build_smollm2_shaped(workdir / "model", hidden_size=args.hidden_size,
                                         num_layers=args.num_layers, seed=args.seed)
    model_dir = str(Path(model_dir).expanduser())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = long_pairs(args.pairs or args.batch_size * args.steps, seed=args.seed)
    datasets = {"pairs": (pairs, args.batch_size)}
    if any(method_spec(m, args.beta, args.steps)["data"] == "unpaired" for m in methods):
        datasets["unpaired"] = (unpaired_from_pairs(pairs), 2 * args.batch_size)
    data = {}
    for kind, (rows, batch_size) in datasets.items():
        path = workdir / f"{kind}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        data[kind] = {"data": str(path), "examples": len(rows), "batch_size": batch_size,
                      **count_tokens(rows, tokenizer, args.max_length, args.max_prompt_length)}
    return {
        "model": model_dir, "pairs": len(pairs), "batch_size": args.batch_size,
        "steps": args.steps, "lr": args.lr, "beta": args.beta, "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length, "lora_r": args.lora_r, "seed": args.seed,
        "threads": args.threads, "trl_gc": not args.trl_no_gc, "datasets": data,
        **{k: v for k, v in data["pairs"].items() if k not in ("data", "examples")},
    }


def applicable(method: str, framework: str, beta: float, steps: int) -> bool:
    return framework != "trl-pre" or method_spec(method, beta, steps)["precompute"]


MEDIAN_KEYS = ("steps_per_s", "tokens_per_s", "loop_s", "end_to_end_s", "peak_rss_mib", "rss_base_mib",
               "peak_rss_step1_mib", "peak_rss_loop_mib", "import_s", "first_loss", "final_loss", "mean_loss")


def report(results: dict[str, list[dict]], names: list[str], rounds: int) -> dict:
    medians = {name: {k: median_of(results[name], k) for k in MEDIAN_KEYS} for name in names}
    failures = {name: first_error(results[name]) for name in names if first_error(results[name])}
    print_table(
        ["method/framework", "steps/s", "tokens/s", "loop s", "e2e s", "peak RSS MiB", "peak@step1",
         "RSS base MiB", "loss 1st", "loss last", "loss mean"],
        [[n, m["steps_per_s"], m["tokens_per_s"], m["loop_s"], m["end_to_end_s"], m["peak_rss_mib"],
          m["peak_rss_step1_mib"], m["rss_base_mib"], m["first_loss"], m["final_loss"], m["mean_loss"]]
         if n not in failures else [n, "FAILED", *["-"] * 9] for n, m in medians.items()],
        title=f"medians over {rounds} round(s)",
    )
    ratios = {}
    for ours_name in [n for n in names if n.split("/")[1].startswith("alignkit")]:
        method = ours_name.split("/")[0]
        ours = medians[ours_name]
        for name in [n for n in names if n.startswith(method + "/trl")]:
            theirs = medians[name]
            ratios[f"{ours_name} vs {name.split('/')[1]}"] = {
                "method": method,
                "steps_per_s": ratio(ours["steps_per_s"], theirs["steps_per_s"]),
                "tokens_per_s": ratio(ours["tokens_per_s"], theirs["tokens_per_s"]),
                "end_to_end_speedup": ratio(theirs["end_to_end_s"], ours["end_to_end_s"]),
                "peak_rss": ratio(ours["peak_rss_mib"], theirs["peak_rss_mib"]),
                "peak_rss_above_base": None if None in (ours["peak_rss_mib"], theirs["peak_rss_mib"]) else ratio(
                    ours["peak_rss_mib"] - ours["rss_base_mib"], theirs["peak_rss_mib"] - theirs["rss_base_mib"]),
                "failed": [n for n in (ours_name, name) if n in failures],
            }
    if ratios:
        print_table(
            ["pair", "steps/s", "tokens/s", "e2e speed-up", "peak RSS", "RSS above base", "note"],
            [[n, r["steps_per_s"], r["tokens_per_s"], r["end_to_end_speedup"], r["peak_rss"],
              r["peak_rss_above_base"], ("FAILED: " + ",".join(r["failed"])) if r["failed"] else ""]
             for n, r in ratios.items()],
            title="ratios alignkit / TRL per method (speed: >1 = alignkit faster; memory: <1 = alignkit smaller)",
        )
    if failures:
        print("\nfailures:")
        for name, error in failures.items():
            print(f"  {name}: {error}")
    return {"medians": medians, "ratios": ratios, "failures": failures}


def selected(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    methods = list(METHODS) if args.methods.strip() == "all" else [
        m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"unknown method(s) {unknown}; choose from {list(METHODS)} or 'all'")
    default = ",".join(FRAMEWORKS) if methods == ["dpo"] else "alignkit,trl"
    frameworks = [n.strip() for n in (args.frameworks or default).split(",") if n.strip()]
    unknown = sorted(set(frameworks) - set(FRAMEWORKS))
    if unknown:
        sys.exit(f"unknown framework(s) {unknown}; choose from {list(FRAMEWORKS)}")
    return methods, frameworks


def main() -> None:
    args = parse_args()
    if args.worker:
        run_as_worker(args)
        return
    if args.whole_process:
        whole_process(args)
        return
    methods, frameworks = selected(args)
    os.environ.update(WORKER_ENV)
    workdir = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    spec = prepare(args, workdir, methods)
    print(f"model {spec['model']}; {spec['pairs']} pairs, batch {spec['batch_size']}, {spec['steps']} steps, "
          f"lr {spec['lr']}, beta {spec['beta']}, max_length {spec['max_length']}, lora_r {spec['lora_r']}")
    print(f"sequence tokens min/median/max {spec['seq_len_min']}/{spec['seq_len_median']}/"
          f"{spec['seq_len_max']} ({spec['truncated_sequences']} truncated); "
          f"{spec['tokens_per_pair']:.1f} real tokens per pair; TRL gradient checkpointing "
          f"{'on (its default)' if spec['trl_gc'] else 'off'}; torch threads {args.threads or 'default'}")
    if "unpaired" in spec["datasets"]:
        print(f"kto: {spec['datasets']['unpaired']['examples']} unpaired rows from the pairs, batch "
              f"{spec['datasets']['unpaired']['batch_size']} rows (same sequences per step as the pairs)")
    names = [f"{m}/{f}" for m in methods for f in frameworks if applicable(m, f, args.beta, args.steps)]

    def run_one(name: str, round_index: int) -> dict:
        method, framework = name.split("/")
        mspec = method_spec(method, args.beta, args.steps)
        out = workdir / f"{method}-{framework}-{round_index}"
        spec_path = workdir / f"spec-{method}-{framework}-{round_index}.json"
        data = spec["datasets"][mspec["data"]]
        spec_path.write_text(json.dumps({**spec, **data, "method": method, "method_spec": mspec,
                                         "out": str(out)}))
        return run_worker(__file__, framework, spec_path, timeout=args.timeout,
                          env=child_env(args.threads, out), verbose=args.verbose)

    results = run_rounds(names, args.rounds, run_one, log=lambda s: print(s, flush=True),
                         keep_going=len(names) > 1)
    summary = report(results, names, args.rounds)
    if args.json:
        specs = {m: method_spec(m, args.beta, args.steps) for m in methods}
        Path(args.json).write_text(json.dumps({"spec": spec, "methods": specs, "runs": results, **summary},
                                              indent=2))
        print(f"\nresults written to {args.json}")


def whole_process(args: argparse.Namespace) -> None:
    """`alignkit train dpo` against `trl_dpo_script.py`, both timed end to end as subprocesses."""
    from _whole import (
        BENCH_DIR,
        alignkit_command,
        bench_model,
        run_whole,
        whole_report,
        word_pairs,
        write_jsonl,
    )

    os.environ.update(WORKER_ENV)
    workdir = Path(tempfile.mkdtemp(prefix="bench-dpo-whole-"))
    model = bench_model(args, workdir)
    pairs = args.pairs or args.batch_size * args.steps
    data = write_jsonl(workdir / "pairs.jsonl", word_pairs(pairs, seed=args.seed))
    threads = [] if args.threads == 0 else ["--threads", str(args.threads)]
    print(f"whole process: model {model}; {pairs} pairs (prompts 8-24 words, responses 16-48), batch "
          f"{args.batch_size}, {args.steps} steps, beta {args.beta}, max_length {args.max_length}; threads "
          f"{args.threads or 'each side its default'}; TRL gradient checkpointing {'off' if args.trl_no_gc else 'on (its default)'}; "
          f"load average {os.getloadavg()[0]:.2f}; logs in {workdir}", flush=True)

    def alignkit_run(run: int):
        cmd = [*alignkit_command(), "train", "dpo", "--model", model, "--data", str(data),
               "--output", str(workdir / f"alignkit-{run}"), "--batch-size", str(args.batch_size),
               "--max-steps", str(args.steps), "--lr", str(args.lr), "--max-length", str(args.max_length),
               "--max-prompt-length", str(args.max_prompt_length), "--warmup-ratio", "0",
               "--scheduler", "linear", "--seed", str(args.seed), "--dtype", "float32", "--device", "cpu",
               "--lora-r", str(args.lora_r), "--no-progress", "--set", f"beta={args.beta}", *threads]
        return cmd, {}

    def trl_run(run: int):
        out = workdir / f"trl-{run}"
        cmd = [sys.executable, str(BENCH_DIR / "trl_dpo_script.py"), "--model", model, "--data", str(data),
               "--output", str(out), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--lr", str(args.lr), "--beta", str(args.beta), "--max-length", str(args.max_length),
               "--seed", str(args.seed), *(["--no-gc"] if args.trl_no_gc else []), *threads]
        return cmd, {"HF_DATASETS_CACHE": str(out / "hf-datasets")}

    results = run_whole({"alignkit": alignkit_run, "trl": trl_run}, args.rounds, workdir, args.timeout,
                        log=lambda line: print(line, flush=True))
    summary = whole_report(results, "alignkit", "trl")
    if args.json:
        Path(args.json).write_text(json.dumps({"workload": {"model": model, "pairs": pairs, "steps": args.steps,
                                                            "batch_size": args.batch_size}, "runs": results,
                                               **summary}, indent=2))


if __name__ == "__main__":
    main()
