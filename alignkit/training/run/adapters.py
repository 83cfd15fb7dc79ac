"""Which weights a run trains: every weight, LoRA (`--lora-r`), SSF (`--adapter ssf`), and HFT's
halves of the full weights (`--set hft=true`); the checks that the options fit together."""

from __future__ import annotations

from typing import Any

ADAPTERS = ("auto", "none", "lora", "ssf")


def adapter_kind(config: Any) -> str:
    """none, lora or ssf: `--adapter`, where auto means lora when --lora-r > 0, else none."""
    if config.adapter == "auto":
        return "lora" if config.lora_r > 0 else "none"
    return config.adapter


def uses_adapter(config: Any) -> bool:
    """Whether the base weights stay frozen under an adapter (LoRA or SSF): adapter learning rates."""
    return adapter_kind(config) != "none"


def check_training_methods(config: Any, task: Any) -> None:
    """--adapter, --lora-r, --ssf-target-modules, hft and hft_round_steps fit together; a
    ValueError of one line naming the option otherwise."""
    if config.adapter == "lora" and config.lora_r <= 0:
        raise ValueError("--adapter lora needs --lora-r > 0 (the LoRA rank)")
    if config.adapter in ("none", "ssf") and config.lora_r > 0:
        raise ValueError(f"--adapter {config.adapter} trains no LoRA adapter: drop --lora-r {config.lora_r} "
                         "(or use --adapter lora)")
    kind = adapter_kind(config)
    targets = config.ssf_target_modules
    if targets != "all-linear" and kind != "ssf":
        raise ValueError(f"--ssf-target-modules applies to --adapter ssf (this run: --adapter {kind})")
    if not targets.strip() or any(not name.strip() for name in targets.split(",")):
        raise ValueError(f"--ssf-target-modules must be all-linear or comma-separated layer names, got {targets!r}")
    if kind == "ssf" and (config.vllm_url or config.placement.startswith("split")):
        where = "--vllm-url's server" if config.vllm_url else f"--placement {config.placement}'s rollout workers"
        raise ValueError(f"--adapter ssf: {where} hold the base architecture, without the biases SSF's shift folds "
                         "into; let alignkit start its vLLM server, or use --placement local/colocate")
    if config.hft_round_steps and not config.hft:
        raise ValueError("--hft-round-steps applies to --set hft=true")
    if not config.hft:
        return
    if kind != "none":
        raise ValueError(f"--set hft=true: HFT freezes half of the full weights each round, and --adapter {kind} "
                         "trains none of them; use full fine-tuning (no --lora-r, --adapter none)")
    if hasattr(task, "run") and not getattr(task, "data_parallel", False):
        raise ValueError(f"--set hft=true: {config.algorithm} trains heads on a frozen backbone; there are no "
                         "block weights to halve")


def attach_ssf(model: Any, config: Any, task: str = "causal_lm") -> Any:
    """`model` with SSF on `--ssf-target-modules` (in place; returns it)."""
    from alignkit.models.ssf import apply_ssf

    targets = config.ssf_target_modules
    names = targets if targets == "all-linear" else [name.strip() for name in targets.split(",")]
    return apply_ssf(model, target_modules=names, task=task)
