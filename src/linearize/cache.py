"""Generation cache for converted models.

Per converted layer: the fp32 recurrent state (through transformers' native
`LinearAttentionLayer`; for the Liger targets one per kv head, which a group's query heads
share) and a ring buffer of the last `window` RoPE'd keys and values, with
a validity bit per slot so left padding never enters the window. Kept softmax layers get the
ordinary cache layer their source family uses. Unlike transformers' own caches, this one
counts tokens even when no layer keeps keys, so a model with no softmax layer generates too.
"""

from __future__ import annotations

import inspect

import torch
from transformers import LlamaModel
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    DynamicCache,
    LinearAttentionLayer,
    get_layer_types_and_kwargs,
)

# transformers 5.24 renamed the `past_key_values` argument and output field to `cache` (the old name warns
# there): every call we make passes, and every output we read, under the name the installed version declares.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def given_cache(past_key_values, kwargs: dict):
    """The cache a forward was given under either name (popped from kwargs: it is passed on by name)."""
    cache = kwargs.pop("cache", None)
    return cache if past_key_values is None else past_key_values


class LigerCacheLayer(LinearAttentionLayer):
    is_compileable = False

    def __init__(self, window: int, number_of_states: int = 1):
        super().__init__(number_of_states=number_of_states)
        self.window = window
        self.seen = 0  # tokens consumed so far, padding included
        self.k_ring: torch.Tensor | None = None  # [B, Hkv, window, D]
        self.v_ring: torch.Tensor | None = None
        self.f_ring: torch.Tensor | None = None  # feature-mapped keys [B, Hkv, window, F] (hedgehog)
        self.ring_valid: torch.Tensor | None = None  # [B, window] bool
        # A 0-dim int64 device tensor counting the tokens cached, kept by a CUDA-graph decoder
        # (decoding.py): a recorded decode step reads the ring slot from it instead of `seen`.
        self.device_position: torch.Tensor | None = None

    @property
    def state(self) -> torch.Tensor | None:
        return self.recurrent_states[0]

    @property
    def norm(self) -> torch.Tensor | None:
        """The normaliser z of targets that keep one (hedgehog)."""
        return self.recurrent_states.get(1)

    def get_seq_length(self) -> int:
        return self.seen

    def decode_position(self) -> int | torch.Tensor:
        """Tokens cached so far, for a decode step's ring slot: `seen`, or the device counter if one is kept."""
        return self.seen if self.device_position is None else self.device_position

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def window_prefix(self) -> tuple[torch.Tensor, ...]:
        """The ring in time order, oldest first: rotated keys, values ([B, W, Hkv, D]), then feature-mapped
        keys if kept, and validity [B, W]."""
        order = (torch.arange(self.window, device=self.k_ring.device) + self.seen) % self.window
        rings = [r for r in (self.k_ring, self.v_ring, self.f_ring) if r is not None]
        return (*(r[:, :, order].transpose(1, 2) for r in rings), self.ring_valid[:, order])

    def store(
        self,
        state: torch.Tensor | tuple[torch.Tensor, ...],
        n_new: int,
        k_rot: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        phi_k: torch.Tensor | None = None,
    ) -> None:
        """Record a forward pass over `n_new` tokens: the state after them and, for a window,
        the rotated keys, values and validity of the last of them ([B, n, Hkv, D] x2 and [B, n]
        or None = all real, n <= n_new), of which the last `window` go into the ring."""
        states = state if isinstance(state, tuple) else (state,)
        for i, s in enumerate(states):
            self.update_recurrent_state(s, state_idx=i)
            self.has_previous_state[i] = True
        self.batch_size = states[0].shape[0]
        if self.window > 0:
            B, tail, H, D = k_rot.shape
            if self.k_ring is None:
                self.k_ring = k_rot.new_zeros(B, H, self.window, D)
                self.v_ring = v.new_zeros(B, H, self.window, D)
                self.ring_valid = torch.zeros(B, self.window, dtype=torch.bool, device=k_rot.device)
                if phi_k is not None:
                    self.f_ring = phi_k.new_zeros(B, H, self.window, phi_k.shape[-1])
            n = min(tail, self.window)
            first = self.seen + n_new - n  # absolute position of the first token kept
            slots = (torch.arange(n, device=k_rot.device) + first) % self.window
            self.k_ring[:, :, slots] = k_rot[:, tail - n :].transpose(1, 2).to(self.k_ring.dtype)
            self.v_ring[:, :, slots] = v[:, tail - n :].transpose(1, 2).to(self.v_ring.dtype)
            if self.f_ring is not None:
                self.f_ring[:, :, slots] = phi_k[:, tail - n :].transpose(1, 2).to(self.f_ring.dtype)
            self.ring_valid[:, slots] = True if valid is None else valid[:, tail - n :]
        self.seen += n_new

    def advance(self, n_tokens: int) -> None:
        self.seen += n_tokens

    def _rings(self) -> list[str]:
        return [name for name in ("k_ring", "v_ring", "f_ring", "ring_valid") if getattr(self, name) is not None]

    def reset(self) -> None:
        super().reset()
        for name in self._rings():
            getattr(self, name).zero_()
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for name in self._rings():
            setattr(self, name, getattr(self, name).index_select(0, beam_idx.to(self.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for i, s in self.recurrent_states.items():
            if s is not None:
                self.recurrent_states[i] = s.repeat_interleave(repeats, dim=0)
        for name in self._rings():
            setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for i, s in self.recurrent_states.items():
            if s is not None:
                self.recurrent_states[i] = s[indices]
        for name in self._rings():
            setattr(self, name, getattr(self, name)[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("a recurrent state cannot be rolled back: assisted and speculative decoding are not supported")


class LigerCache(DynamicCache):
    """One cache layer per decoder layer: `LigerCacheLayer` for converted ones, the source's for kept ones."""

    def __init__(self, config, converted: list[bool], window: int, number_of_states: int = 1):
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
        layers = [
            LigerCacheLayer(window, number_of_states) if is_converted else DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs)
            for is_converted, kind, kwargs in zip(converted, layer_types, layer_kwargs, strict=True)
        ]
        Cache.__init__(self, layers=layers)  # DynamicCache's own __init__ would rebuild the layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if isinstance(layer, LigerCacheLayer):
            return layer.seen
        return super().get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if isinstance(layer, LigerCacheLayer):
            return layer.get_mask_sizes(query_length)
        return super().get_mask_sizes(query_length, layer_idx)
