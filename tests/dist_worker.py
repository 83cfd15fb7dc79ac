"""Run by `torchrun` from tests/test_distributed_*.py: several training cases in one launch
(a launch costs 10-15 s here, the cases a second or two each).

    torchrun --nproc-per-node=2 tests/dist_worker.py SPEC.json

SPEC: {"cases": [{"name", "algorithm", "model", "data", "overrides", "interrupt_at"?, "expect_error"?}],
       "out": DIR, "guard": bool, "die_at": {"rank": r, "step": k}?}
Each case trains into OUT/NAME/run and every rank saves its final parameters to
OUT/NAME/params-rank{r}.safetensors; with `interrupt_at` the run is cut at that step (after its
checkpoint) and resumed in the same directory; with `expect_error` the ValueError's message is
written to OUT/NAME/error-rank{r}.txt. `guard` checks the wrapper-bypass guard;
`die_at` kills one rank (SIGKILL) at a step of the first case; `audit_writes` records in
OUT/NAME/writes-rank{r}.json what each rank wrote into the run directory (config.yaml,
metrics.jsonl, checkpoints, a diffusion final/), through the functions that write them.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import alignkit
from alignkit.training.run import distributed

torch.set_num_threads(1)


class Interrupt(Exception):
    pass


def run_case(case: dict, out: Path, rank: int, die_at: dict | None) -> None:
    case_dir = out / case["name"]
    run_dir = case_dir / "run"
    overrides = dict(case.get("overrides", {}))

    def callback(step, metrics):
        if die_at and rank == die_at["rank"] and step == die_at["step"]:
            os.kill(os.getpid(), signal.SIGKILL)
        if case.get("interrupt_at") == step:
            raise Interrupt

    train = dict(model=case["model"], data=case["data"], output_dir=run_dir, progress=False, **overrides)
    if case.get("serve_rollout") and rank == 0:  # the reference rollout server, for every rank
        from alignkit.models import load_model
        from alignkit.rollout.reference_server import ReferenceServer

        served, tokenizer = load_model(case["model"], device="cpu")
        server = ReferenceServer(served, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,),
                                 port=case["serve_rollout"], max_lora_rank=16).start()
        try:
            return run_case({**case, "serve_rollout": None}, out, rank, die_at)
        finally:
            server.close()
    if case.get("expect_error"):  # a refusal: record the message instead of training
        try:
            alignkit.train(case["algorithm"], **train)
            message = "no error"
        except ValueError as error:
            message = str(error)
        (case_dir / f"error-rank{rank}.txt").write_text(message)
        return
    try:
        result = alignkit.train(case["algorithm"], callbacks=(callback,), **train)
    except Interrupt:
        distributed.barrier()
        result = alignkit.train(case["algorithm"], **{**train, "resume": str(run_dir)})
    (case_dir / f"final-rank{rank}.txt").write_text(str(result.final_dir))
    if result.model is not None:  # (runners of several models, such as rm_ensemble, return none)
        params = {n: p.detach().float().contiguous().clone() for n, p in result.model.named_parameters()}
        save_file(params, str(case_dir / f"params-rank{rank}.safetensors"))


def audit_writes(log: list[str]) -> None:
    """Append to `log` the path of every config.yaml, metrics.jsonl, checkpoint and diffusion
    final/ this process writes (the writers wrapped in place)."""
    from alignkit.diffusion import trainer
    from alignkit.training.run import checkpoint, metrics
    from alignkit.training.run.config import TrainConfig

    def recording(fn, describe):
        def wrapper(*args, **kwargs):
            log.append(describe(*args, **kwargs))
            return fn(*args, **kwargs)
        return wrapper

    TrainConfig.save = recording(TrainConfig.save, lambda self, path, *a, **k: str(path))
    metrics.MetricsWriter.__init__ = recording(metrics.MetricsWriter.__init__,
                                               lambda self, run_dir, *a, **k: f"{run_dir}/metrics.jsonl")
    checkpoint.write_checkpoint = recording(checkpoint.write_checkpoint,
                                            lambda run_dir, step, *a, **k: f"{run_dir}/checkpoints/{step}")
    trainer.write_final_pipeline = recording(trainer.write_final_pipeline, lambda pipeline, unet, final: str(final))


def check_guard(spec: dict, out: Path, rank: int) -> None:
    """A gradient-enabled forward on the model inside the DDP wrapper must raise."""
    from alignkit.models import load_model
    from alignkit.training.offline.tasks import make_task
    from alignkit.training.run.config import TrainConfig
    from alignkit.training.run.wrapping import TaskForward, WrapperBypassed, wrap

    config = TrainConfig(algorithm="sft", strategy="ddp")
    ranks = distributed.init_ranks("ddp")
    model, tokenizer = load_model(spec["cases"][0]["model"])
    task = make_task(config)
    forward = TaskForward(model, task.loss)
    engine = wrap(forward, ranks, torch.device("cpu"))
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": torch.ones_like(ids)}
    outcome = {"through_wrapper": None, "bypass": None}
    loss, _ = engine(batch)
    loss.backward()
    outcome["through_wrapper"] = "ok"
    try:
        task.loss(model, batch)
        outcome["bypass"] = "no error"
    except WrapperBypassed as error:
        outcome["bypass"] = str(error)
    (out / f"guard-rank{rank}.json").write_text(json.dumps(outcome))


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    rank = int(os.environ.get("RANK", 0))
    writes: list[str] = []
    if spec.get("audit_writes"):
        audit_writes(writes)
    for case in spec["cases"]:
        (out / case["name"]).mkdir(parents=True, exist_ok=True)
        writes.clear()
        run_case(case, out, rank, spec.get("die_at"))
        if spec.get("audit_writes"):
            (out / case["name"] / f"writes-rank{rank}.json").write_text(json.dumps(writes))
    if spec.get("guard"):
        check_guard(spec, out, rank)
    distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
