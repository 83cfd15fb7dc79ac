"""Writes the calculator example's data: train.jsonl, heldout.jsonl and warmstart.jsonl.

- train.jsonl / heldout.jsonl: prompt-only rows `{"prompt", "answer", "kind"}`, arithmetic that
  SmolLM2-135M-Instruct gets wrong in its head: `mul` (a 3-digit times a 3-digit number) and
  `add` (the sum of three 3-digit numbers), half of each. The held-out questions share no
  question with the training ones (nor with the warm-start dialogues).
- warmstart.jsonl: a handful of tool-use dialogues (`messages` rows) for the optional SFT
  warm-start (`alignkit train filtered_bc`, which trains every assistant turn): the system
  prompt the episode runner writes for a template without tool support (the calculator's
  schema and the hermes call syntax), the question, the call, the tool's result, and
  "The answer is N." The dialogues come from one hand-written template filled with numbers.

    python examples/calculator_tools/make_prompts.py          # rewrites the three files

Deterministic: the same seed writes the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = ("mul", "add")


def question(kind: str, rng: random.Random) -> tuple[str, str, int]:
    """(question text, calculator expression, answer) of one question of `kind`."""
    if kind == "mul":
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        return f"What is {a} * {b}?", f"{a} * {b}", a * b
    if kind == "add":
        a, b, c = (rng.randint(100, 999) for _ in range(3))
        return f"What is {a} + {b} + {c}?", f"{a} + {b} + {c}", a + b + c
    raise ValueError(f"unknown question kind {kind!r}; expected one of {', '.join(KINDS)}")


def distinct_questions(counts: list[int], seed: int) -> list[list[dict]]:
    """Disjoint lists of rows, list i with counts[i] rows (kinds alternating), no question twice."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    for count in counts:
        rows = []
        while len(rows) < count:
            kind = KINDS[len(rows) % len(KINDS)]
            text, expression, answer = question(kind, rng)
            if text in seen:
                continue
            seen.add(text)
            rows.append({"prompt": text, "answer": str(answer), "kind": kind, "expression": expression})
        out.append(rows)
    return out


def tool_call_text(expression: str) -> str:
    """The hermes-format call the episode runner parses (`alignkit.agents.tool_calls`)."""
    return "<tool_call>\n" + json.dumps({"name": "calculator", "arguments": {"expression": expression}}) + "\n</tool_call>"


def runner_system_prompt() -> str:
    """The system prompt the episode runner writes for SmolLM2 (no tool support in its template)."""
    from alignkit.agents.example_tools import calculator
    from alignkit.agents.tools import tool_schemas, tools_system_prompt

    return tools_system_prompt(tool_schemas([calculator]), "hermes")


def warmstart_dialogue(row: dict, system: str) -> dict:
    """One `messages` row: system, question, call, the tool's result, the answer."""
    from alignkit.agents.example_tools import calculator

    result = calculator(row["expression"])
    return {"messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": tool_call_text(row["expression"])},
        {"role": "tool", "name": "calculator", "content": result},
        {"role": "assistant", "content": f"The answer is {result}."},
    ]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=64, help="training questions")
    parser.add_argument("--heldout", type=int, default=64, help="held-out questions")
    parser.add_argument("--warmstart", type=int, default=16, help="warm-start dialogues")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    train, heldout, warm = distinct_questions([args.train, args.heldout, args.warmstart], args.seed)
    strip = [{k: row[k] for k in ("prompt", "answer", "kind")} for row in train], \
        [{k: row[k] for k in ("prompt", "answer", "kind")} for row in heldout]
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", strip[0])
    write_jsonl(args.out / "heldout.jsonl", strip[1])
    system = runner_system_prompt()
    write_jsonl(args.out / "warmstart.jsonl", [warmstart_dialogue(row, system) for row in warm])
    print(f"wrote {len(train)} train, {len(heldout)} held-out questions and {len(warm)} warm-start dialogues "
          f"to {args.out}")


if __name__ == "__main__":
    main()
