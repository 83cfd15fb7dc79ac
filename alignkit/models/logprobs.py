"""Per-token log-probabilities from hidden states, without a (B, T, V) float32 logits tensor.

For a causal LM with decoder f and output embedding W (V x H), the log-probability of token
x_t given its prefix is

    log p(x_t | x_<t) = z_{t-1}[x_t] - logsumexp_v z_{t-1}[v],   z_{t-1} = W h_{t-1} / tau

where h_{t-1} = f(x)_{t-1} is the final hidden state at the previous position and tau the
sampling temperature. Only response positions need it, so we

1. run the decoder once: h (B, T, H);
2. gather the N predictor rows h_{t-1} for which `response_mask[b, t]` is True: (N, H) --
   prompt and padding positions cost nothing past the decoder;
3. project `chunk_size` rows at a time: (chunk, V) logits live for one chunk only. A plain
   `nn.Linear` head goes through `_LinearLogps`, whose hand-written backward recomputes each
   chunk's logits once into reused buffers; any other head runs each chunk under
   `torch.utils.checkpoint`. Either way no N x V floats stay alive for backward;
4. scatter the N values back into a (B, T) tensor that is 0 off the response.

Models whose logits are not `W h` (soft-capping as in Gemma 2, logit scaling as in Cohere or
Granite, prompt-learning adapters) fall back to the full forward, same outputs, more memory.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from alignkit.models.packing import predictor_states
from alignkit.models.vlm import encode_images_once

# Config attributes that mean "logits are not just lm_head(hidden)"; a value other than the
# neutral one (None, or 1.0 for scales) sends us to the full-logits fallback.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
    "output_logits_scale": 1.0,
}


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only: (B, T) -> (B, T), `cumsum(mask) - 1`, >= 0.

    Equal to `arange(T)` on right-padded rows; on left-padded rows the first real token gets
    position 0, which is what `generate` uses, so log-probs of rollouts agree with sampling.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a `PeftModel` (LoRA layers stay injected and active)."""
    get_base_model = getattr(model, "get_base_model", None)
    if get_base_model is not None and hasattr(model, "peft_config"):
        return get_base_model()
    return model


def _is_prompt_learning(model: nn.Module) -> bool:
    """Prefix/prompt tuning adds virtual tokens the bare decoder would not see."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder returning final hidden states, output embedding) or None to use full logits."""
    if _is_prompt_learning(model):
        return None
    inner = _unwrap_peft(model)
    config = getattr(inner, "config", None)
    for attribute, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, attribute, neutral)
        if value is not None and value != neutral:
            return None
    get_decoder = getattr(inner, "get_decoder", None)
    get_head = getattr(inner, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or decoder is inner or head is None:
        return None
    return decoder, head


def _chunk_logps(
    head: nn.Module, hidden: Tensor, targets: Tensor, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor]:
    """hidden (n, H), targets (n,) -> log p(target) (n,), entropy (n,) (zeros if not asked).

    H(p) = logsumexp(z) - sum_v p_v z_v, computed from the same (n, V) logits.
    """
    logits = head(hidden).float()  # (n, V), only this chunk
    if temperature != 1.0:
        logits = logits / temperature
    log_normalizer = logits.logsumexp(-1)  # (n,)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_normalizer
    if not with_entropy:
        return logps, torch.zeros_like(logps)
    entropy = log_normalizer - (torch.softmax(logits, -1) * logits).sum(-1)
    return logps, entropy


def _chunked(
    head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    chunk_size: int,
    temperature: float,
    with_entropy: bool,
) -> tuple[Tensor, Tensor]:
    """Run `_chunk_logps` over `chunk_size` rows at a time; (N, H), (N,) -> (N,), (N,)."""
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    logps, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        if needs_grad:  # recompute the chunk's logits in backward instead of storing them
            chunk = checkpoint(
                _chunk_logps,
                head,
                hidden[rows],
                targets[rows],
                temperature,
                with_entropy,
                use_reentrant=False,
                preserve_rng_state=False,  # the head draws no random numbers
            )
        else:
            chunk = _chunk_logps(head, hidden[rows], targets[rows], temperature, with_entropy)
        logps.append(chunk[0])
        entropies.append(chunk[1])
    if not logps:  # no response token in the whole batch
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(entropies)


def _scatter(values: Tensor, predict_mask: Tensor) -> Tensor:
    """(N,) values at the True entries of `predict_mask` (B, T-1) -> (B, T), position 0 zero."""
    batch, length = predict_mask.shape
    flat_index = predict_mask.reshape(-1).nonzero().squeeze(-1)
    flat = values.new_zeros(batch * length).index_put((flat_index,), values)
    return torch.cat([values.new_zeros(batch, 1), flat.view(batch, length)], dim=1)


def token_logps_and_entropy(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    position_ids: Tensor | None = None,
    with_entropy: bool = True,
    pixel_inputs: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token log-probs and entropies of the response tokens.

    Shapes: input_ids, attention_mask, response_mask (B, T) -> logps (B, T), entropy (B, T),
    both float32 and 0 wherever `response_mask & attention_mask` is False (and at t = 0).
    logps[b, t] = log_softmax(z_{t-1} / tau)[x_t] and entropy[b, t] = H(softmax(z_{t-1} / tau)),
    the entropy of the (tempered) distribution that produced x_t. `position_ids` default:
    `position_ids_from_mask(attention_mask)` (pass your own for packed sequences).
    `pixel_inputs` (a VLM batch's `pixel_values`, `image_grid_thw`, ...; see
    `alignkit.data.image_tokenize`) route through `vlm_predictor_states`: the image features
    fill the image tokens, which are prompt tokens and so never scored.
    """
    if input_ids.dim() != 2 or not (input_ids.shape == attention_mask.shape == response_mask.shape):
        raise ValueError(
            f"input_ids, attention_mask, response_mask must all be (B, T); got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(response_mask.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    packable = position_ids is None
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    # Logits at t-1 predict token t: predictor rows are [:, :-1], targets [:, 1:].
    predict_mask = (response_mask.bool() & attention_mask.bool())[:, 1:]  # (B, T-1)
    targets = input_ids[:, 1:][predict_mask]  # (N,)

    predictors, head = predictors_and_head(model, input_ids, attention_mask, predict_mask, position_ids=position_ids,
                                           packable=packable, pixel_inputs=pixel_inputs)
    logps, entropy = linear_head_logps(head, predictors, targets, chunk_size, temperature, with_entropy)
    return _scatter(logps, predict_mask), _scatter(entropy, predict_mask)


def predictors_and_head(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, predict_mask: Tensor, *,
    position_ids: Tensor | None = None, packable: bool = False, pixel_inputs: dict[str, Tensor] | None = None,
) -> tuple[Tensor, nn.Module]:
    """(the states predicting the True entries of `predict_mask` (B, T-1), the head that maps them
    to logits): h_{t-1} (N, H) and the LM head for a decoder with a plain linear head (packed
    when `packable`), a VLM's multimodal body with `pixel_inputs`, else the full logits (N, V)
    with the identity as head (soft-capped or scaled logits are not W h)."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    if pixel_inputs:
        return vlm_predictor_states(model, input_ids, attention_mask, predict_mask, pixel_inputs)
    parts = decoder_and_head(model)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits
        return logits[:, :-1][predict_mask], nn.Identity()  # (N, V)
    decoder, head = parts
    return predictor_states(decoder, input_ids, attention_mask, predict_mask, position_ids,
                            packable=packable), head  # (N, H)


def vlm_predictor_states(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, predict: Tensor, pixel_inputs: dict[str, Tensor],
    row_inputs: list | None = None,
) -> tuple[Tensor, nn.Module]:
    """(h_{t-1} at the True entries of `predict` (B, T-1): (N, H), output embedding) of a
    vision-language model: its multimodal body (`model.model`: vision tower, projector and
    language model, which places the image features at the image tokens) run on the padded
    batch. Positions are left to the model (Qwen2-VL derives its 3-D M-RoPE positions from
    the ids and `image_grid_thw`), so rows must be right-padded; nothing is packed.
    `row_inputs`: each row's own pixel inputs, rows of one prompt sharing one dict (a rollout's
    group), so the images are encoded once per prompt (`encode_images_once`)."""
    inner = _unwrap_peft(model)
    body, head = getattr(inner, "model", None), inner.get_output_embeddings()
    if body is None or head is None:
        raise ValueError(f"{type(inner).__name__} is not a vision-language model with a body and an LM head")
    return vlm_body_states(body, input_ids, attention_mask, predict, pixel_inputs, row_inputs), head


def vlm_body_states(
    body: nn.Module, input_ids: Tensor, attention_mask: Tensor, predict: Tensor, pixel_inputs: dict[str, Tensor],
    row_inputs: list | None = None,
) -> Tensor:
    """h_{t-1} at the True entries of `predict` (B, T-1) -> (N, H) from a VLM's multimodal body
    (a policy's, or a critic's copy of it) on right-padded rows with their pixel inputs (see
    `vlm_predictor_states` for `row_inputs`)."""
    if not bool(attention_mask[:, 0].all()):
        raise ValueError("vision-language batches must be right-padded (every row starts with a real token)")
    if row_inputs is not None:
        pixel_inputs = encode_images_once(body, row_inputs, pixel_inputs)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **pixel_inputs).last_hidden_state
    return hidden[:, :-1][predict]  # (N, H)


def token_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    position_ids: Tensor | None = None,
    pixel_inputs: dict[str, Tensor] | None = None,
) -> Tensor:
    """log p(x_t | x_<t) at response positions, 0 elsewhere: (B, T) ids and masks -> (B, T).

    Same values as `log_softmax(model(input_ids).logits / tau)[:, :-1].gather(x[:, 1:])`
    shifted right by one, but computed from hidden states in chunks (see module docstring).
    """
    logps, _ = token_logps_and_entropy(
        model,
        input_ids,
        attention_mask,
        response_mask,
        chunk_size=chunk_size,
        temperature=temperature,
        position_ids=position_ids,
        with_entropy=False,
        pixel_inputs=pixel_inputs,
    )
    return logps


def sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Summed response log-probs and response lengths: (B, T) -> ((B,), (B,) float32).

    log pi(y | x) = sum_t m_t log p(x_t | x_<t); lengths |y| = sum_t m_t over the positions
    that were scored (response & attention, t >= 1). Keyword arguments go to `token_logps`.
    """
    per_token = token_logps(model, input_ids, attention_mask, response_mask, **kwargs)
    scored = (response_mask.bool() & attention_mask.bool())[:, 1:]
    return per_token.sum(-1), scored.sum(-1).float()


# --------------------------------------------------------------------------- fused linear head


class _LinearLogps(torch.autograd.Function):
    """log p(target) and entropy of `softmax((hidden @ W.T + b) / tau)`, `chunk_size` rows at a
    time, with a hand-written backward.

    Saves only hidden, W, b, targets and the per-row log-normaliser (N,): backward recomputes
    each chunk's logits once and turns them into the logits gradient in place,
    d log p_x / dz_v = (1[v = x] - p_v) / tau (entropy: dH/dz_v = -p_v (log p_v + H) / tau),
    then accumulates grad_hidden = G W and grad_W = G^T hidden. Same three matmuls per chunk
    as checkpointing `_chunk_logps`, but every (chunk, V) pass writes into one or two buffers
    reused across chunks (a fresh 200 MB tensor per op costs more in page faults on CPU than
    the op itself), the entropy is never recomputed, and autograd keeps nothing of size V.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, temperature, with_entropy):
        ctx.set_materialize_grads(False)
        n_rows = hidden.shape[0]
        logps = hidden.new_zeros(n_rows, dtype=torch.float32)
        entropy = hidden.new_zeros(n_rows, dtype=torch.float32)
        log_z = hidden.new_zeros(n_rows, dtype=torch.float32)
        buffers = _Buffers()
        for start in range(0, n_rows, chunk_size):
            rows = slice(start, start + chunk_size)
            z = _logits_into(buffers, hidden[rows], weight, bias, temperature)  # (n, V) float32
            shift = z.amax(-1, keepdim=True)  # (n, 1)
            target_z = z.gather(-1, targets[rows].unsqueeze(-1))  # (n, 1)
            if with_entropy:  # H = log s - sum_v e_v (z_v - max) / s, e = exp(z - max), s = sum e
                z.sub_(shift)
                e = torch.exp(z, out=buffers.get("e", z.shape))
                sums = e.sum(-1, keepdim=True)
                dot = e.mul_(z).sum(-1, keepdim=True)
                entropy[rows] = (sums.log() - dot / sums).squeeze(-1)
            else:
                sums = z.sub_(shift).exp_().sum(-1, keepdim=True)
            log_z[rows] = (shift + sums.log()).squeeze(-1)
            logps[rows] = target_z.squeeze(-1) - log_z[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, entropy)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        acc = torch.promote_types(weight.dtype, torch.float32)  # gradient GEMMs accumulate in >= fp32
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=acc) if need_bias else None
        if grad_logps is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        tau = ctx.temperature
        buffers = _Buffers()
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = hidden[rows]
            log_p = _logits_into(buffers, h, weight, bias, tau).sub_(log_z[rows].unsqueeze(-1))
            if grad_entropy is not None:  # dH/dz = -p (log p + H), from log p before it becomes p
                g_ent = grad_entropy[rows].float().unsqueeze(-1)
                extra = log_p.add(entropy[rows].unsqueeze(-1)).mul_(log_p.exp()).mul_(-g_ent)
            grad = log_p.exp_()  # in place: p
            if grad_logps is not None:
                g = grad_logps[rows].float().unsqueeze(-1)
                grad.mul_(-g).scatter_add_(-1, targets[rows].unsqueeze(-1), g)
            else:
                grad.zero_()
            if grad_entropy is not None:
                grad.add_(extra)
            if tau != 1.0:
                grad.div_(tau)
            grad = grad.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad.to(acc).t(), h.to(acc))
            if grad_bias is not None:
                grad_bias += grad.sum(0).to(acc)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None)


class _Buffers:
    """Scratch tensors reused across the chunks of one call (views of the first allocation)."""

    def __init__(self) -> None:
        self._store: dict[str, Tensor] = {}

    def get(self, name: str, shape: torch.Size, like: Tensor | None = None) -> Tensor:
        buffer = self._store.get(name)
        if buffer is None or buffer.shape[0] < shape[0] or buffer.shape[1:] != shape[1:]:
            source = like if like is not None else self._store.get("z")
            buffer = torch.empty(shape, dtype=torch.float32, device=source.device)
            self._store[name] = buffer
        return buffer[: shape[0]]


def _logits_into(buffers: _Buffers, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                 temperature: float) -> Tensor:
    """(hidden @ W.T + b) / tau as float32 (n, V), written into the reused "z" buffer."""
    shape = torch.Size((hidden.shape[0], weight.shape[0]))
    z = buffers.get("z", shape, like=hidden)
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        if bias is None:
            torch.mm(hidden, weight.t(), out=z)
        else:
            torch.addmm(bias, hidden, weight.t(), out=z)
    else:
        z.copy_(torch.nn.functional.linear(hidden, weight, bias))
    if temperature != 1.0:
        z.div_(temperature)
    return z


def linear_head_logps(
    head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor]:
    """`_chunked` with the same outputs, through `_LinearLogps` when `head` is a plain
    `nn.Linear` (faster backward, less memory); any other head goes through `_chunked`.

    Shapes: hidden (N, H), targets (N,) -> log-probs (N,), entropies (N,) (zeros unless asked).
    """
    if type(head) is not nn.Linear or hidden.shape[0] == 0:
        return _chunked(head, hidden, targets, chunk_size, temperature, with_entropy)
    return _LinearLogps.apply(hidden, head.weight, head.bias, targets, chunk_size, temperature, with_entropy)
