#!/usr/bin/env python3
"""Scale-out checks for one CUDA GPU that CPU CI cannot make; `--smoke` runs them on CPU.

Run from the repo root:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python bench/gpu_check.py [--smoke]

Needs only torch and transformers, plus alignkit from the tree. Prints one JSON line per check;
when the environment variable OUT names a directory it also writes them to OUT/scale_check.jsonl.
Models use random weights from real configs (no hub access). Expected run time on one GPU:
2-4 minutes, under 8. `--smoke` uses tiny shapes on CPU with gloo (about 20 s).

1. fsdp2_equal   FSDP2 (world 1, nccl/gloo) with alignkit's fused log-prob head inside its
                 `TaskForward` root module, sharded per decoder block as `--strategy fsdp2` does
                 (`alignkit.training.run.distributed`), == the unwrapped module (fp32, 3 AdamW steps);
                 accept at max_abs_diff <= 1e-5
2. fsdp2_speed   bf16 MixedPrecisionPolicy train steps on a SmolLM2-135M-shaped model: tokens/s,
                 MFU against the dense bf16 peak (989 TFLOP/s for H100/H200 SXM), peak memory
3. ipc_sync      trainer process -> engine process weight hand-off on the same device through
                 torch.multiprocessing (CUDA IPC on GPU): 512 MB buckets, seconds per full sync for
                 the 135M shape and a 1.5B shape (bf16); the engine's greedy output must equal
                 the trainer's
4. hf_rollout    alignkit HFEngine tokens/s on the 135M shape (the bar a vLLM engine must beat)
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.multiprocessing as mp

SMOKE = "--smoke" in sys.argv
DEV = "cuda" if torch.cuda.is_available() and not SMOKE else "cpu"
LOG = []


def emit(name, **values):
    row = {"check": name, "device": DEV, **values}
    LOG.append(row)
    print(json.dumps(row), flush=True)


def llama(shape: str, dtype=torch.float32, device=DEV):
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = {  # smollm2-135m and qwen2.5-1.5b-like widths; "tiny" for --smoke
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512),
        "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152),
        "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, vocab_size=151936),
    }
    cfg = LlamaConfig(**shapes[shape], max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def response_logps(model, ids, mask):
    from alignkit.models.logprobs import token_logps

    return token_logps(model, ids, mask, mask, chunk_size=1024)


def Logps(model):
    """alignkit's seam: the whole log-prob computation inside one module forward (the
    `TaskForward` that `--strategy ddp|fsdp2` wraps), so FSDP/DDP hooks fire."""
    from alignkit.training.run.wrapping import TaskForward

    return TaskForward(model, response_logps)


def shard(root, mesh, **options):
    """`fully_shard` per decoder block, then the root: what alignkit's FSDP2 strategy does."""
    from torch.distributed.fsdp import fully_shard

    from alignkit.training.run.wrapping import decoder_blocks

    for block in decoder_blocks(root.model):
        fully_shard(block, mesh=mesh, **options)
    fully_shard(root, mesh=mesh, **options)


def batch(rows, length, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(rows):
        mask[i, length - (i * 7) % (length // 2):] = 0
    return ids.to(DEV), mask.to(DEV)


def check_fsdp2():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("GPU_CHECK_PORT", "29533"), RANK="0",
                      WORLD_SIZE="1")
    dist.init_process_group("nccl" if DEV == "cuda" else "gloo")
    shape = "tiny" if SMOKE else "135m"
    ids, mask = batch(8, 64 if SMOKE else 256, 512 if SMOKE else 49152)

    def run(sharded):
        root = Logps(llama(shape))
        if sharded:
            shard(root, init_device_mesh(DEV, (1,)))
        opt = torch.optim.AdamW(root.parameters(), lr=1e-4)
        losses = []
        for _ in range(3):
            loss = -(root(ids, mask).sum() / mask[:, 1:].sum())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        return losses

    plain, sharded = run(False), run(True)
    emit("fsdp2_equal", plain=plain, fsdp2=sharded, max_abs_diff=max(abs(a - b) for a, b in zip(plain, sharded, strict=True)))

    # bf16 mixed precision speed (the GPU number CPU cannot give)
    root = Logps(llama(shape))
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    shard(root, init_device_mesh(DEV, (1,)), mp_policy=mp_policy)
    opt = torch.optim.AdamW(root.parameters(), lr=1e-4, fused=DEV == "cuda")
    ids, mask = batch(4 if SMOKE else 32, 64 if SMOKE else 512, 512 if SMOKE else 49152)
    params = sum(p.numel() for p in root.parameters())
    steps = 2 if SMOKE else 10
    for i in range(steps + 2):
        if i == 2:
            sync()
            t = time.perf_counter()
        loss = -(root(ids, mask).sum() / mask[:, 1:].sum())
        loss.backward()
        opt.step()
        opt.zero_grad()
    sync()
    dt = (time.perf_counter() - t) / steps
    tokens = int(mask.sum())
    emit("fsdp2_speed", shape=shape, params=params, tokens_per_step=tokens, step_s=dt, tokens_per_s=tokens / dt,
         mfu_vs_989tflops=6 * params * tokens / dt / 989e12,
         peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else None)
    dist.destroy_process_group()


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def engine_proc(shape, dtype, inbox, outbox):
    """The rollout side: its own copy of the model, refreshed from buckets sent by the trainer."""
    model = llama(shape, dtype).eval()
    params = dict(model.named_parameters())
    outbox.put("ready")
    while True:
        msg = inbox.get()
        if msg is None:
            break
        if msg == "generate":
            outbox.put(greedy(model))
            continue
        bucket, metas = msg  # a uint8 tensor shared by handle (CUDA IPC on GPU) + (name, offset, shape)
        with torch.no_grad():
            for name, offset, shp in metas:
                n = torch.Size(shp).numel() * params[name].element_size()
                params[name].copy_(bucket[offset:offset + n].view(params[name].dtype).view(shp))
        sync()
        del bucket
        outbox.put("loaded")


def greedy(model):
    from alignkit.rollout import HFEngine, SamplingParams

    engine = HFEngine(model, pad_id=0, eos_ids=[])
    out = engine.generate([[1, 2, 3, 4]], 1, SamplingParams(max_new_tokens=8, greedy=True))
    return out.response_ids.tolist()


def check_ipc(shape, dtype=torch.bfloat16, bucket_mb=512):
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=engine_proc, args=(shape, dtype, inbox, outbox))
    proc.start()
    trainer = llama(shape, dtype)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # "after an update": the engine's copy is stale
    assert outbox.get(timeout=600) == "ready"
    bucket = torch.empty(bucket_mb << 20, dtype=torch.uint8, device=DEV)
    times = []
    for _ in range(2):  # the first sync pays for opening the IPC handle
        t = time.perf_counter()
        offset, metas = 0, []
        for name, p in trainer.named_parameters():
            n = p.numel() * p.element_size()
            if offset + n > bucket.numel():
                sync()
                inbox.put((bucket, metas))
                assert outbox.get(timeout=600) == "loaded"
                offset, metas = 0, []
            bucket[offset:offset + n].copy_(p.detach().reshape(-1).view(torch.uint8))
            metas.append((name, offset, tuple(p.shape)))
            offset += n
        sync()
        inbox.put((bucket, metas))
        assert outbox.get(timeout=600) == "loaded"
        times.append(time.perf_counter() - t)
    inbox.put("generate")
    engine_tokens = outbox.get(timeout=600)
    inbox.put(None)
    proc.join(timeout=60)
    gbytes = sum(p.numel() * p.element_size() for p in trainer.parameters()) / 1e9
    emit("ipc_sync", shape=shape, gbytes=gbytes, first_s=times[0], warm_s=times[1], gb_per_s=gbytes / times[1],
         greedy_equal=engine_tokens == greedy(trainer.eval()))


def check_rollout():
    from alignkit.rollout import HFEngine, SamplingParams

    model = llama("tiny" if SMOKE else "135m", torch.bfloat16 if DEV == "cuda" else torch.float32).eval()
    engine = HFEngine(model, pad_id=0, eos_ids=[])
    prompts = [[1] + list(range(10 + i, 74 + i)) for i in range(4 if SMOKE else 32)]
    sampling = SamplingParams(max_new_tokens=16 if SMOKE else 256, temperature=1.0, seed=0, ignore_eos=True)
    engine.generate(prompts[:2], 2, SamplingParams(max_new_tokens=4, seed=0))  # warm-up
    sync()
    t = time.perf_counter()
    out = engine.generate(prompts, 8, sampling)
    sync()
    dt = time.perf_counter() - t
    emit("hf_rollout", samples=len(out), new_tokens=int(out.lengths.sum()), seconds=dt,
         tokens_per_s=int(out.lengths.sum()) / dt)


if __name__ == "__main__":
    started = time.perf_counter()
    emit("env", torch=torch.__version__, cuda=torch.version.cuda,
         gpu=torch.cuda.get_device_name() if DEV == "cuda" else None)
    check_fsdp2()
    check_ipc("tiny" if SMOKE else "135m")
    if not SMOKE:
        check_ipc("1.5b")
    check_rollout()
    emit("done", total_s=time.perf_counter() - started)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "scale_check.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in LOG)
