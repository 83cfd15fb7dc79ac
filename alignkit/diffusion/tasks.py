"""The algorithms `d3po` and `prdp`: their hyper-parameters, and the task the offline loop runs.

Both train in a loop of their own (`task.run`, alignkit/diffusion/trainer.py) inside the run
directory the offline loop checks and locks; under torchrun every rank runs it on its share
of each step's pairs (`data_parallel`). Importing this module needs no diffusers; a run
without it fails with one line naming `pip install 'alignkit[diffusion]'`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignkit.training.offline.tasks import check_hparams
from alignkit.training.run.config import TrainConfig
from alignkit.training.run.registry import AlgorithmSpec, register_algorithm

SAMPLER_HPARAMS: dict[str, Any] = {
    "num_steps": 20,  # DDIM steps per chain (D3PO's sample.num_steps)
    "eta": 1.0,  # DDIM noise (D3PO's sample.eta); > 0, or steps have no likelihood
    "guidance_scale": 5.0,  # classifier-free guidance while sampling and training (D3PO's 5.0)
    "resolution": 0,  # image side in pixels; 0: the UNet's own sample size
}
HPARAMS: dict[str, dict[str, Any]] = {
    "d3po": {**SAMPLER_HPARAMS, "beta": 0.1, "eps": 0.1},
    "prdp": {**SAMPLER_HPARAMS, "beta": 1.0, "clip_eps": 1e-4, "inner_epochs": 1},
}
# What a diffusion run ignores, and why (an explicit one is an error, as for other algorithms).
IGNORED = {
    "ref_model": "the reference is the initial UNet (d3po) or the round's sampling UNet (prdp)",
    "reward_model": "give an image reward as --reward file.py:function (or redness, brightness, aesthetic)",
    "reward_weights": "it takes one --reward",
    "reward_timeout": "image rewards run in-process",
    "reward_workers": "image rewards run in-process",
    "grad_accum": "a step is one round of --batch-size pairs, its gradients accumulated over the denoising steps",
    "max_length": "prompts are cut to the text encoder's own length",
    "max_prompt_length": "prompts are cut to the text encoder's own length",
    "chat_template": "text-to-image prompts are plain text",
    "gradient_checkpointing": "not wired for UNets yet",
    "hft": "HFT's frozen halves are defined for transformer blocks",
    "ssf_target_modules": "diffusion runs train LoRA or the whole UNet (--adapter none)",
    "lora_dropout": "UNet LoRA has no dropout here",
    "lora_target_modules": "UNet LoRA adapts the attention projections to_q, to_k, to_v, to_out.0",
    "eval_data": "diffusion runs have no held-out evaluation yet",
    "eval_holdout": "diffusion runs have no held-out evaluation yet",
    "eval_steps": "diffusion runs have no held-out evaluation yet",
    "gold_reward": "diffusion runs have no held-out evaluation yet",
    "allow_identical_pairs": "image pairs are checked for readability only",
    "vlm_train": "it trains a diffusion UNet",
    "rollout": "it samples with the pipeline's own DDIM sampler",
    "vllm_url": "it samples with the pipeline's own DDIM sampler",
    "env": "it generates images, not conversations",
    "tools": "it generates images, not conversations",
    "user_model": "it generates images, not conversations",
    "padding_free": "it trains a UNet on latents",
}


@dataclass
class DiffusionTask:
    """d3po or prdp: hyper-parameters resolved from --set, and `run` (the whole loop)."""

    config: TrainConfig
    name: str
    hparams: dict[str, Any] = field(init=False, default_factory=dict)
    data_kinds: tuple[str, ...] = ("prompt_only", "pairwise")
    model_kind: str = "diffusion"
    data_parallel: bool = True  # under torchrun every rank runs `run` on its rows (trainer.py)

    def __post_init__(self) -> None:
        accepted = HPARAMS[self.name]
        check_hparams(self.name, self.config.hparams, accepted)
        self.hparams = {**accepted, **self.config.hparams}
        if not self.hparams["eta"] > 0:
            raise ValueError(f"{self.name}: --set eta must be > 0 (with eta = 0 a DDIM step has no likelihood)")
        if int(self.hparams["num_steps"]) < 1:
            raise ValueError(f"{self.name}: --set num_steps must be >= 1")
        if self.config.adapter not in ("auto", "lora", "none"):
            raise ValueError(f"--adapter {self.config.adapter}: {self.name} trains LoRA (default) or the whole UNet (none)")
        if self.config.adapter == "none" and self.config.lora_r > 0:
            raise ValueError("--adapter none trains every UNet weight; drop --lora-r")
        if self.config.hft:  # (data_parallel lets the generic HFT checks through to here)
            raise ValueError(f"--set hft=true: {self.name} trains a UNet; {IGNORED['hft']}")
        if self.config.strategy != "ddp":
            raise ValueError(f"--strategy {self.config.strategy}: {self.name} is data-parallel with --strategy ddp "
                             "only (its UNet is replicated on every rank, not sharded)")

    def ignored_fields(self, config: TrainConfig) -> dict[str, str]:
        ignored = {name: why for name, why in IGNORED.items() if hasattr(config, name)}
        if self.name == "prdp":
            ignored["ref_model"] = "its reference is the round's sampling UNet (a proximal update)"
        return ignored

    def run(self, model=None, tokenizer=None, data=None, eval_data=None, callbacks=(), reward=None):
        """Train; `model` may be a loaded diffusers pipeline, `data` rows or a path."""
        from alignkit.diffusion.pipeline import require_diffusers
        from alignkit.diffusion.trainer import DiffusionRun

        require_diffusers()
        return DiffusionRun(self, pipeline=model, data=data, reward=reward).run(callbacks)


DATA = {
    "d3po": "prompt + image_chosen + image_rejected (or prompt-only with --reward)",
    "prdp": "prompt-only (default: built-in prompts) + --reward",
}
PAPERS = {
    "d3po": "D3PO (Yang et al. 2024, Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model)",
    "prdp": "PRDP (Deng et al. 2024, Proximal Reward Difference Prediction for Large-Scale Reward Finetuning of Diffusion Models)",
}
for _name in ("d3po", "prdp"):
    register_algorithm(AlgorithmSpec(
        name=_name, kind="diffusion", data=DATA[_name], models="UNet (+LoRA), VAE, text encoder" +
        (", frozen reference UNet" if _name == "d3po" else ""), paper=PAPERS[_name],
        make_task=lambda config, _name=_name: DiffusionTask(config, _name), runner="offline",
    ))
