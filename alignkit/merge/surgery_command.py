"""`alignkit surgery`: a behaviour probe, an edit of the gate-projection rows inversely aligned
with it, and a from_pretrained checkpoint out (model surgery, Wang et al. 2024; the maths and
the deviations from the reference code are in `alignkit.merge.surgery`).

    alignkit surgery --model M --positive P.jsonl --negative N.jsonl --layers 1,2 \\
        --strength 1.0 [--fraction 0.05] [--held-out H.jsonl] --output DIR

P and N are prompt files (a `prompt` column, text or messages): P holds prompts showing the
behaviour to move towards, N the behaviour to move away from. The probe reads the hidden state
after block --probe-layer (default: the last of --layers, where the edit shows first), pooled
over the prompt's tokens (--pool mean, the reference's choice, or last). --probe-holdout of
each set is kept out of the probe's training and gives its held-out accuracy. The behaviour
shift is the probe's score of the model's hidden states on --held-out prompts (default: the
probe's held-out rows), before and after the edit; when every --held-out row has a
`completion`, the mean log-prob per completion token before and after is reported too.

DIR holds safetensors weights, config and tokenizer, plus surgery.json (the recipe, the probe's
accuracy, the selected rows per layer, the shift, every prompt's probe logit), probe.safetensors
(w, b), report.html and its figures: probe.png (the probe's logit w·h + b on the positive and
negative prompts: how well the two sets separate) and shift.png (the logit on the shift's
prompts before and after the edit: how far the behaviour moved).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.merge import surgery

log = logging.getLogger("alignkit")


def _layers(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated layer indices, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"names no layer: {text!r}")
    return sorted(set(values))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit surgery", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--model", required=True, help="model directory, hub id or smollm2-135m (a gated MLP: "
                        "Llama, Qwen, Mistral, SmolLM, ...)")
    parser.add_argument("--positive", required=True, help="prompts of the behaviour to move towards (label 1)")
    parser.add_argument("--negative", required=True, help="prompts of the behaviour to move away from (label 0)")
    parser.add_argument("--layers", required=True, type=_layers, help="blocks whose mlp.gate_proj rows may be "
                        "edited, 0-based, comma-separated")
    parser.add_argument("--strength", required=True, type=float, help="alpha: W_gate[i] += strength * theta "
                        "(theta the unit probe direction); negative moves the other way")
    parser.add_argument("--fraction", type=float, default=0.05, help="fraction of the chosen layers' gate rows "
                        "edited, ranked together by -cos(row, theta) (default 0.05; the reference's ~0.047)")
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--held-out", default=None, help="prompts (optionally with `completion`) the shift is "
                        "measured on (default: the probe's held-out rows)")
    parser.add_argument("--probe-layer", type=int, default=None, help="hidden state read by the probe: the "
                        "output of this block (default: the last of --layers)")
    parser.add_argument("--pool", choices=("mean", "last"), default="mean", help="pool over prompt tokens")
    parser.add_argument("--probe-holdout", type=float, default=0.25, help="fraction of each set held out to "
                        "measure the probe's accuracy (default 0.25)")
    parser.add_argument("--l2", type=float, default=1e-2, help="probe L2 penalty (on standardised features)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512, help="prompt tokens kept (longer: left-truncated)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--overwrite", action="store_true", help="replace an --output a previous surgery wrote")
    return parser


# --------------------------------------------------------------------------- checks and data


def check_arguments(args: argparse.Namespace) -> None:
    """Every check that needs no model."""
    from alignkit.merge.command import check_data_file
    from alignkit.merge.io import check_source

    if not 0 < args.fraction <= 1:
        raise ValueError(f"--fraction {args.fraction}: must be in (0, 1]")
    if not 0 <= args.probe_holdout < 1:
        raise ValueError(f"--probe-holdout {args.probe_holdout}: must be in [0, 1)")
    if args.probe_holdout == 0 and args.held_out is None:
        raise ValueError("--probe-holdout 0 leaves no held-out rows: give --held-out prompts to measure the shift on")
    for flag, value in (("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be >= 1")
    if args.l2 <= 0:
        raise ValueError(f"--l2 {args.l2}: must be > 0 (it makes the probe's optimum unique)")
    for flag, source in (("--positive", args.positive), ("--negative", args.negative), ("--held-out", args.held_out)):
        if source is not None:
            check_data_file(flag, source)
    check_source(args.model, "--model")
    output = Path(args.output).expanduser()
    if output.resolve() == Path(args.model).expanduser().resolve():
        raise ValueError(f"--output {args.output}: is the input model; write the edited model elsewhere")
    if output.is_file():
        raise ValueError(f"--output {output}: is a file; name a directory")
    if output.is_dir() and any(output.iterdir()):
        if not args.overwrite:
            raise ValueError(f"--output {output}: exists and is not empty; pass --overwrite to replace a surgery there")
        if not (output / "surgery.json").is_file():
            raise ValueError(f"--output {output}: holds no surgery.json, so alignkit surgery did not write it; "
                             "--overwrite only replaces those")


def read_rows(source: str, flag: str) -> list[dict[str, Any]]:
    """The rows of a prompt file; every row needs a non-empty `prompt`."""
    from alignkit.data import load_rows

    try:
        table = load_rows(source)
    except ValueError as error:  # the loader names the file; say which flag read it
        raise ValueError(f"{flag}: {error}") from None
    if not table.rows:
        raise ValueError(f"{flag} {source}: no rows")
    for index, row in enumerate(table.rows):
        if not row.get("prompt"):
            raise ValueError(f"{flag} {source}: row {index + 1} has no (or an empty) 'prompt'")
    return table.rows


def gate_projections(model: nn.Module, layers: list[int], flag: str) -> list[nn.Linear]:
    """The `mlp.gate_proj` of each chosen block; a one-line error for a bad index or a model
    without a gated MLP."""
    from alignkit.models.blocks import transformer_blocks

    blocks = transformer_blocks(model)
    for layer in layers:
        if not 0 <= layer < len(blocks):
            raise ValueError(f"--layers {layer}: {flag} has {len(blocks)} blocks (valid 0-{len(blocks) - 1})")
    gates = []
    for layer in layers:
        name, block = blocks[layer]
        gate = getattr(getattr(block, "mlp", None), "gate_proj", None)
        if not isinstance(gate, nn.Linear):
            raise ValueError(f"--model {flag}: block {name} has no mlp.gate_proj linear layer ({type(model).__name__}); "
                             "model surgery edits the gate projection of a gated MLP (Llama, Qwen, Mistral, ...)")
        gates.append(gate)
    return gates


@torch.no_grad()
def pooled_hidden(model: nn.Module, tokenizer: Any, prompts: list[Any], *, layer: int, pool: str,
                  batch_size: int, max_length: int) -> Tensor:
    """(N, D) float32 features: hidden_states[layer + 1] (the output of block `layer`) pooled over
    each prompt's tokens (chat template applied when the tokenizer has one)."""
    from alignkit.lab.generation_eval import encode_prompts

    device = next(model.parameters()).device
    ids = [row[-max_length:] for row in encode_prompts(tokenizer, prompts)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    features = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(len(row) for row in chunk)
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in chunk], device=device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in chunk], device=device)
        hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        features.append(surgery.pool_hidden(hidden[layer + 1].float(), mask, pool).cpu())
    return torch.cat(features)


def _mean_completion_logp(model: nn.Module, tokenizer: Any, source: str, args: argparse.Namespace) -> float:
    from alignkit.merge.scoring import completion_batches, mean_logp

    batches = completion_batches(source, tokenizer, flag="--held-out", max_length=args.max_length,
                                 batch_size=args.batch_size)
    return mean_logp(model, [{k: v.to(next(model.parameters()).device) for k, v in b.items()} for b in batches])


def _scores(logits: Tensor) -> dict[str, float]:
    return {"mean_logit": float(logits.mean()), "mean_probability": float(torch.sigmoid(logits).mean()),
            "fraction_positive": float((logits > 0).double().mean())}


# --------------------------------------------------------------------------- the run


def run_surgery(args: argparse.Namespace) -> dict[str, Any]:
    from alignkit.models import load_model, save_pretrained_merged
    from alignkit.models.loading import default_device

    check_arguments(args)
    positive, negative = read_rows(args.positive, "--positive"), read_rows(args.negative, "--negative")
    if args.probe_holdout > 0 and min(len(positive), len(negative)) < 2:
        raise ValueError(f"--probe-holdout {args.probe_holdout}: needs at least 2 prompts in each of --positive "
                         f"({len(positive)}) and --negative ({len(negative)}) to hold some out")
    held_rows = read_rows(args.held_out, "--held-out") if args.held_out is not None else None
    model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    model.to(args.device or default_device()).eval()
    gates = gate_projections(model, args.layers, args.model)
    probe_layer = args.layers[-1] if args.probe_layer is None else args.probe_layer
    blocks = model.config.get_text_config().num_hidden_layers
    if not 0 <= probe_layer < blocks:
        raise ValueError(f"--probe-layer {probe_layer}: {args.model} has {blocks} blocks (valid 0-{blocks - 1})")
    if probe_layer < args.layers[0]:
        raise ValueError(f"--probe-layer {probe_layer}: comes before every edited layer ({args.layers}); the edit "
                         "cannot move the hidden state it reads")

    def features(prompts: list[Any]) -> Tensor:
        return pooled_hidden(model, tokenizer, prompts, layer=probe_layer, pool=args.pool,
                             batch_size=args.batch_size, max_length=args.max_length)

    # 1. behaviour probe on the original model
    pos_train, pos_held = surgery.split_heldout(len(positive), args.probe_holdout, args.seed)
    neg_train, neg_held = surgery.split_heldout(len(negative), args.probe_holdout, args.seed + 1)
    pos_x = features([row["prompt"] for row in positive])
    neg_x = features([row["prompt"] for row in negative])
    train_x = torch.cat([pos_x[pos_train], neg_x[neg_train]])
    train_y = torch.cat([torch.ones(len(pos_train)), torch.zeros(len(neg_train))])
    weight, bias = surgery.fit_probe(train_x, train_y, l2=args.l2)
    direction = surgery.unit_direction(weight)
    probe_logits = {"positive": surgery.probe_logits(pos_x, weight, bias).tolist(),
                    "negative": surgery.probe_logits(neg_x, weight, bias).tolist()}
    probe = {"layer": probe_layer, "pool": args.pool, "l2": args.l2, "train_rows": len(train_y),
             "train_accuracy": surgery.probe_accuracy(surgery.probe_logits(train_x, weight, bias), train_y)}
    if pos_held or neg_held:
        held_x = torch.cat([pos_x[pos_held], neg_x[neg_held]])
        held_y = torch.cat([torch.ones(len(pos_held)), torch.zeros(len(neg_held))])
        probe.update(heldout_rows=len(held_y),
                     heldout_accuracy=surgery.probe_accuracy(surgery.probe_logits(held_x, weight, bias), held_y))
    if held_rows is not None:
        shift_prompts, shift_source = [row["prompt"] for row in held_rows], args.held_out
    else:
        shift_prompts = [positive[i]["prompt"] for i in pos_held] + [negative[i]["prompt"] for i in neg_held]
        shift_source = "the probe's held-out rows"
    before = surgery.probe_logits(features(shift_prompts), weight, bias)
    with_completions = held_rows is not None and all("completion" in row for row in held_rows)
    logp_before = _mean_completion_logp(model, tokenizer, args.held_out, args) if with_completions else None

    # 2-3. behaviour region and the edit
    rows = surgery.select_rows([gate.weight.detach() for gate in gates], direction.to(gates[0].weight.device),
                               args.fraction)
    with torch.no_grad():
        for gate, chosen in zip(gates, rows, strict=True):
            gate.weight.copy_(surgery.edit_rows(gate.weight, chosen.to(gate.weight.device),
                                                direction.to(gate.weight.device), args.strength))
    after = surgery.probe_logits(features(shift_prompts), weight, bias)
    shift: dict[str, Any] = {"prompts": shift_source, "rows": len(shift_prompts), "before": _scores(before),
                             "after": _scores(after)}
    shift["delta_mean_logit"] = shift["after"]["mean_logit"] - shift["before"]["mean_logit"]
    shift["logits"] = {"before": before.tolist(), "after": after.tolist()}  # per prompt, in order
    if with_completions:
        logp_after = _mean_completion_logp(model, tokenizer, args.held_out, args)
        shift["completion_logp"] = {"before": logp_before, "after": logp_after, "delta": logp_after - logp_before}

    record = {"method": "model_surgery", "paper": "Wang et al. 2024, arXiv 2407.08770", "model": args.model,
              "positive": args.positive, "negative": args.negative, "layers": args.layers, "strength": args.strength,
              "fraction": args.fraction, "probe": probe, "probe_norm": float(weight.norm()),
              "edited_rows": {str(layer): chosen.tolist() for layer, chosen in zip(args.layers, rows, strict=True)},
              "edited_row_count": sum(len(chosen) for chosen in rows),
              "gate_rows_total": sum(gate.weight.shape[0] for gate in gates), "shift": shift,
              "probe_logits": probe_logits, "held_out_probe_rows": {"positive": pos_held, "negative": neg_held}}
    output = Path(args.output)
    if output.is_dir() and args.overwrite:
        shutil.rmtree(output)
    model.to("cpu")
    save_pretrained_merged(model, tokenizer, output)
    from safetensors.torch import save_file

    save_file({"weight": weight.contiguous(), "bias": bias.reshape(1)}, str(output / "probe.safetensors"),
              metadata={"layer": str(probe_layer), "pool": args.pool})
    (output / "surgery.json").write_text(json.dumps(record, indent=2) + "\n")
    (output / "report.html").write_text(report_html(record, write_plots(record, output)))
    print(f"probe accuracy: train {probe['train_accuracy']:.3f}"
          + (f", held-out {probe['heldout_accuracy']:.3f}" if "heldout_accuracy" in probe else ""))
    print(f"probe logit on {shift_source}: {shift['before']['mean_logit']:.4f} -> {shift['after']['mean_logit']:.4f}")
    print(f"edited model: {output}")
    return record


def write_plots(record: dict[str, Any], output: Path) -> list[Path]:
    """probe.png and shift.png (module docstring) from surgery.json's per-prompt logits; the
    shift is drawn per prompt, after − before (the edit moves logits by much less than the two
    sets lie apart), split into the probe's positive and negative held-out rows by default."""
    from alignkit.eval.measure_plots import plot_histograms

    probe, shift = record["probe"], record["shift"]
    accuracy = f"train accuracy {probe['train_accuracy']:.3f}" + (
        f", held-out {probe['heldout_accuracy']:.3f}" if "heldout_accuracy" in probe else "")
    figures = [plot_histograms(record["probe_logits"], output / "probe.png",
                               xlabel=f"probe logit w·h + b (block {probe['layer']} output, {probe['pool']}-pooled)",
                               title=f"Behaviour probe on the original model\n{accuracy}",
                               marks={"decision boundary (logit 0)": 0.0})]
    changes = [a - b for b, a in zip(shift["logits"]["before"], shift["logits"]["after"], strict=True)]
    held = record["held_out_probe_rows"]
    if shift["prompts"] == "the probe's held-out rows":  # positive rows first, then negative
        groups = {"positive prompts": changes[:len(held["positive"])], "negative prompts": changes[len(held["positive"]):]}
        where = "probe's held-out rows"
    else:
        groups, where = {"held-out prompts": changes}, Path(shift["prompts"]).name
    figures.append(plot_histograms(
        groups, output / "shift.png", xlabel="change of the probe logit, after − before the edit (> 0: towards --positive)",
        title=f"Behaviour shift at strength {record['strength']:g}, {shift['rows']} prompts ({where})\n"
              f"mean logit {shift['before']['mean_logit']:.4f} -> {shift['after']['mean_logit']:.4f}",
        marks={"no change": 0.0}))
    return figures


def report_html(record: dict[str, Any], figures: list[Path] | None = None) -> str:
    """One self-contained page: the recipe, the probe's accuracy, the shift before vs after, and
    `figures` (PNG paths) inline."""
    from alignkit.eval.report import _image

    def cell(value: Any) -> str:
        return html.escape(f"{value:.4f}" if isinstance(value, float) else str(value))

    shift, probe = record["shift"], record["probe"]
    recipe = [("model", record["model"]), ("positive", record["positive"]), ("negative", record["negative"]),
              ("layers", record["layers"]), ("strength", record["strength"]), ("fraction", record["fraction"]),
              ("rows edited", f"{record['edited_row_count']} of {record['gate_rows_total']}")]
    probe_rows = [(key, probe[key]) for key in ("layer", "pool", "train_rows", "train_accuracy", "heldout_rows",
                                                "heldout_accuracy") if key in probe]
    measures = [(key, shift["before"][key], shift["after"][key]) for key in shift["before"]]
    if "completion_logp" in shift:
        measures.append(("completion log-prob / token", shift["completion_logp"]["before"],
                         shift["completion_logp"]["after"]))
    table = "".join(f"<tr><th>{cell(k)}</th><td>{cell(v)}</td></tr>" for k, v in recipe + probe_rows)
    shifts = "".join(f"<tr><th>{cell(k)}</th><td>{cell(b)}</td><td>{cell(a)}</td><td>{cell(a - b)}</td></tr>"
                     for k, b, a in measures)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>model surgery</title><style>"
            "body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;text-align:left;border-bottom:1px solid #ddd}"
            "</style></head><body><h1>Model surgery</h1><p>Wang et al. 2024: gate-projection rows inversely aligned "
            "with the behaviour probe, shifted along it.</p><h2>Recipe and probe</h2><table>" + table + "</table>"
            f"<h2>Behaviour shift on {cell(shift['prompts'])} ({shift['rows']} prompts)</h2>"
            "<table><tr><th></th><th>before</th><th>after</th><th>change</th></tr>" + shifts + "</table>"
            + "".join(_image(path, path.stem) for path in figures or []) + "</body></html>\n")


def main(argv: list[str]) -> int:
    run_surgery(build_parser().parse_args(list(argv)))
    return 0
