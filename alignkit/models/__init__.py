"""Models: loading (local dir, hub id, GGUF, embedded alias), log-probs, heads, adapters, saving.

Public API (the trainers are written against these names):

- `EMBEDDED_ALIASES`, `resolve_model_path(name_or_path) -> str`
- `load_model(name_or_path, *, kind, dtype, device, trust_remote_code, num_labels)
  -> (model, tokenizer)`
- `token_logps(model, input_ids, attention_mask, response_mask, *, chunk_size, temperature)
  -> (B, T)`, `sequence_logps(...) -> ((B,), (B,))`, `token_logps_and_entropy(...)`
- `last_token_index(attention_mask) -> (B,)`, `reward_scores(model, input_ids, attention_mask)`
- `apply_lora(model, *, r, alpha, dropout, target_modules, task)`, `adapter_disabled(model)`,
  `is_peft(model)`
- `apply_ssf(model, *, target_modules, task)`, `has_ssf(model)` (SSF scale-and-shift layers)
- `save_pretrained_merged(model, tokenizer, path, *, merge_lora) -> Path` (LoRA merged, SSF
  folded), `plain_state_dict(model)`,
  `count_parameters(model) -> (trainable, total)`
"""

from alignkit.models.adapters import adapter_disabled, apply_lora, is_peft
from alignkit.models.heads import last_token_index, reward_scores
from alignkit.models.loading import (
    EMBEDDED_ALIASES,
    cache_dir,
    ensure_pad_token,
    load_model,
    load_vlm,
    resolve_dtype,
    resolve_model_path,
)
from alignkit.models.logprobs import (
    position_ids_from_mask,
    sequence_logps,
    token_logps,
    token_logps_and_entropy,
)
from alignkit.models.saving import (
    count_parameters,
    merged_state_dict,
    plain_state_dict,
    save_pretrained_merged,
)
from alignkit.models.ssf import apply_ssf, has_ssf
from alignkit.models.vlm import is_vlm_config, is_vlm_dir, load_processor

__all__ = [
    "EMBEDDED_ALIASES",
    "adapter_disabled",
    "apply_lora",
    "apply_ssf",
    "cache_dir",
    "count_parameters",
    "ensure_pad_token",
    "has_ssf",
    "is_peft",
    "is_vlm_config",
    "is_vlm_dir",
    "last_token_index",
    "load_model",
    "load_processor",
    "load_vlm",
    "merged_state_dict",
    "plain_state_dict",
    "position_ids_from_mask",
    "resolve_dtype",
    "resolve_model_path",
    "reward_scores",
    "save_pretrained_merged",
    "sequence_logps",
    "token_logps",
    "token_logps_and_entropy",
]
