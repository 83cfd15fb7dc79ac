"""KV caches for the decode loop: group expansion and row dropping on transformers' caches.

`DynamicLayer.update` concatenates every step, so step t copies the whole cache (O(T^2)
bytes over a response). `expand_to_preallocated` turns the prefilled cache into one whose
full-attention layers write into buffers sized for the whole generation (no copies while
decoding), repeating each prompt's rows `n` times on the way. Where the installed
transformers or the model's layers do not fit (older `DynamicCache` without `.layers`,
sliding-window or linear-attention layers), it falls back to the cache's own
`batch_repeat_interleave` / `batch_select_indices`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

try:  # transformers >= 5: caches are lists of per-layer objects
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover - older transformers
    DynamicLayer = None  # type: ignore[assignment,misc]


if DynamicLayer is not None:

    class PreallocatedLayer(DynamicLayer):  # type: ignore[misc,valid-type]
        """A full-attention cache layer writing into a fixed-capacity buffer.

        `keys` / `values` are views `buffer[:, :, :length]` (what attention reads); the
        buffers are (rows, heads, capacity, head_dim).
        """

        def __init__(self, keys: Tensor, values: Tensor, capacity: int) -> None:
            super().__init__()
            rows, heads, length, head_dim = keys.shape
            self._key_buffer = keys.new_empty((rows, heads, capacity, head_dim))
            self._value_buffer = values.new_empty((rows, heads, capacity, values.shape[-1]))
            self._key_buffer[:, :, :length] = keys
            self._value_buffer[:, :, :length] = values
            self._length = length
            self.device = keys.device
            self.is_initialized = True
            self._refresh_views()

        def _refresh_views(self) -> None:
            self.keys = self._key_buffer[:, :, : self._length]
            self.values = self._value_buffer[:, :, : self._length]

        def update(
            self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
        ) -> tuple[Tensor, Tensor]:
            """Write the new states after the cached ones; return all cached states."""
            end = self._length + key_states.shape[-2]
            if end > self._key_buffer.shape[-2]:
                raise RuntimeError(f"KV cache capacity {self._key_buffer.shape[-2]} exceeded")
            self._key_buffer[:, :, self._length : end] = key_states
            self._value_buffer[:, :, self._length : end] = value_states
            self._length = end
            self._refresh_views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._length

        def batch_select_indices(self, indices: Tensor) -> None:
            """Keep only rows `indices` (drops finished samples)."""
            self._key_buffer = self._key_buffer[indices]
            self._value_buffer = self._value_buffer[indices]
            self._refresh_views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._key_buffer = self._key_buffer.repeat_interleave(repeats, dim=0)
            self._value_buffer = self._value_buffer.repeat_interleave(repeats, dim=0)
            self._refresh_views()

        def reorder_cache(self, beam_idx: Tensor) -> None:
            self.batch_select_indices(beam_idx)

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop expects a negative number of tokens to remove")
            self._length = max(self._length + tokens_to_remove, 0)
            self._refresh_views()

        def reset(self) -> None:
            self._length = 0
            self._refresh_views()


def _can_preallocate(cache: Any) -> bool:
    """True when every layer is a plain, filled full-attention `DynamicLayer`."""
    layers = getattr(cache, "layers", None)
    if DynamicLayer is None or not layers:
        return False
    return all(
        type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None
        for layer in layers
    )


def expand_to_preallocated(cache: Any, repeats: int, capacity: int, preallocate: bool) -> Any:
    """Repeat each prefilled row `repeats` times; give full-attention layers room for `capacity`.

    `cache` is the cache of the prefill forward (batch = prompts); it is modified in place
    (layers are swapped) and returned. `capacity` is the total sequence length to hold.
    """
    if preallocate and _can_preallocate(cache):
        layers = []
        for layer in cache.layers:
            keys = layer.keys.repeat_interleave(repeats, dim=0)
            values = layer.values.repeat_interleave(repeats, dim=0)
            layers.append(PreallocatedLayer(keys, values, capacity))
        cache.layers = layers
        return cache
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
    return cache


def select_rows(cache: Any, rows: Tensor) -> None:
    """Keep only batch rows `rows` of `cache` (in place)."""
    cache.batch_select_indices(rows)
