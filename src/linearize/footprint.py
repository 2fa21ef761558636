"""What a model keeps in memory per sequence while decoding, from its config alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

STATE_BYTES = 4  # recurrent states are kept in float32


def _dtype_bytes(config: Any) -> int:
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.finfo(dtype).bits // 8


@dataclass(frozen=True)
class Footprint:
    converted_layers: int
    kept_layers: int
    state_bytes: int  # fixed per sequence: recurrent states + window rings of converted layers
    kv_bytes_per_token: int  # what still grows: keys and values of kept softmax layers
    source_kv_bytes_per_token: int  # the unconverted model's KV cache, every layer


def footprint(config: Any) -> Footprint:
    n = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hkv, item = config.num_key_value_heads, _dtype_bytes(config)
    kv_per_token_layer = 2 * hkv * head_dim * item
    settings = getattr(config, "linearize", None)
    if settings is None:
        return Footprint(0, n, 0, n * kv_per_token_layer, n * kv_per_token_layer)
    kept, window, target = len(settings["keep_attention"]), settings["window"], settings.get("target", "gla")
    ring = window * (kv_per_token_layer + 1)  # rotated keys, values and a validity byte per slot
    # states are kept per kv head: they depend only on keys, values and gates, so a group's query heads share them
    if target == "hedgehog":  # S [2D, D] and z [2D]; the ring also keeps feature-mapped keys [2D]
        state = hkv * (2 * head_dim * head_dim + 2 * head_dim) * STATE_BYTES
        ring += window * hkv * 2 * head_dim * item
    elif target == "gsa":  # slot keys and slot values [m, D]
        state = hkv * 2 * settings["slots"] * head_dim * STATE_BYTES
    else:  # gla, mamba2, hgrn2, gdn: one [D, D] state
        state = hkv * head_dim * head_dim * STATE_BYTES
    per_layer_state = state + ring
    return Footprint(n - kept, kept, (n - kept) * per_layer_state, kept * kv_per_token_layer, n * kv_per_token_layer)
