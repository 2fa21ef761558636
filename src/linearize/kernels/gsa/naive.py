"""Gated slot attention on the pretrained projections (target `gsa`), step by step in plain PyTorch.

Each head keeps m slots of keys and values, written with a forget gate pooled from the key
(log a_t = logsigmoid of k_t averaged over D/m channel groups, / gate_normalizer):

    Kt = diag(a_t) K_{t-1} + (1 - a_t) phi(k_t)^T,   Vt = diag(a_t) V_{t-1} + (1 - a_t) v_t^T   [m, D]
    o_t = Vt^T softmax(Kt phi(q_t))

with phi = softmax over the head dimension, as in Liger. With a window, o = mix * (softmax
attention over the last `window` tokens, RoPE) + (1 - mix) * o. No new parameters. This is the
reference (and the decode step); chunk.py has the two-pass chunked form the model runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..gla.naive import compute_dtype
from ..liger.naive import mix_window_branch, repeat_heads, window_decode_step


def slot_inputs(q, k, v, slots: int, gate_normalizer: float, valid):
    """phi(q), phi(k), v and per-slot log-gates [B, T, H, m]; padded steps write and forget nothing."""
    dt = compute_dtype(q)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    D = k.shape[-1]
    if D % slots:
        raise ValueError(f"the head dimension {D} must be a multiple of the slot count {slots}")
    log_gate = F.logsigmoid(k).unflatten(-1, (slots, D // slots)).mean(-1) / gate_normalizer
    if valid is not None:
        log_gate = torch.where(valid[:, :, None, None], log_gate, 0.0)
    return q.softmax(-1), k.softmax(-1), v, log_gate


def slot_update(keys: torch.Tensor, values: torch.Tensor, q, k, v, log_gate):
    """One step out of place (differentiable): slot memories [B, Hs, m, D]; k, v [B, Hs, D],
    log_gate [B, Hs, m]; q [B, Hq, D] (Hq a multiple of Hs: a kv group's query heads may share the
    memories). Returns (o [B, Hq, D], keys, values)."""
    a = log_gate.exp()[..., None]
    keys = a * keys + (1 - a) * k[..., None, :]
    values = a * values + (1 - a) * v[..., None, :]
    weights = torch.einsum("bhmd,bhgd->bhgm", keys, q.unflatten(1, (keys.shape[1], -1))).softmax(-1)
    return torch.einsum("bhgm,bhmd->bhgd", weights, values).flatten(1, 2), keys, values


def slot_step(keys: torch.Tensor, values: torch.Tensor, q, k, v, log_gate) -> torch.Tensor:
    """One step in place on the slot memories (decode: the cache's tensors); returns o [B, Hq, D]."""
    o, new_keys, new_values = slot_update(keys, values, q, k, v, log_gate)
    keys.copy_(new_keys)
    values.copy_(new_values)
    return o


def slot_steps(phi_q, phi_k, v, log_gate, keys, values):
    """The recurrence one step at a time, out of place so autograd can train through it:
    phi_q, phi_k [B, T, H, D], v [B, T, H, V], log_gate [B, T, H, m], slot keys [B, H, m, D] and
    values [B, H, m, V] -> (o, (keys, values))."""
    outs = []
    for t in range(phi_q.shape[1]):
        o_t, keys, values = slot_update(keys, values, phi_q[:, t], phi_k[:, t], v[:, t], log_gate[:, t])
        outs.append(o_t)
    return torch.stack(outs, 1), (keys, values)


def gsa_attention_torch(
    q, k, v, *, window: int, slots: int, mix: float = 0.5, gate_normalizer: float = 16.0, cos=None, sin=None,
    attention_mask=None, initial_state: tuple[torch.Tensor, torch.Tensor] | None = None, window_prefix=None,
    recurrence: Callable = slot_steps, window_on_triton: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """q [B, T, Hq, D], k, v [B, T, Hkv, D] -> (o in q's dtype, (slot keys, slot values) [B, Hq, m, D]).
    `recurrence` has slot_steps' contract: chunk.py passes the two-pass chunked form.
    window_on_triton: see liger/naive.py's mix_window_branch."""
    B, T, Hq, D = q.shape
    fq, fk, vv, log_gate = slot_inputs(q, k, v, slots, gate_normalizer, attention_mask)
    fk, vv, log_gate = (repeat_heads(x, Hq) for x in (fk, vv, log_gate))
    if initial_state is None:
        keys, values = fq.new_zeros(B, Hq, slots, D), fq.new_zeros(B, Hq, slots, v.shape[-1])
    else:
        keys, values = (x.to(fq.dtype) for x in initial_state)
    o, states = recurrence(fq, fk, vv, log_gate, keys, values)
    if window > 0:
        o = mix_window_branch(o, q, k, v, window=window, mix=mix, cos=cos, sin=sin, attention_mask=attention_mask,
                              window_prefix=window_prefix, on_triton=window_on_triton)
    return o.to(q.dtype), states


def gsa_decode_step_torch(
    q, k, v, states: tuple[torch.Tensor, torch.Tensor], k_ring, v_ring, ring_valid, position: int | torch.Tensor, *,
    window: int, slots: int, mix: float = 0.5, gate_normalizer: float = 16.0, cos=None, sin=None,
) -> torch.Tensor:
    """One token: slot memories and the window ring updated in place. Returns [B, 1, Hq, D].
    The memories [B, Hq or Hkv, m, D] depend only on keys, values and gates, so a kv group's query
    heads may share them."""
    keys, values = states
    fq, fk, vv, log_gate = slot_inputs(q, k, v, slots, gate_normalizer, None)
    fk, vv, log_gate = (repeat_heads(x, keys.shape[1])[:, 0].to(keys.dtype) for x in (fk, vv, log_gate))
    o = slot_step(keys, values, fq[:, 0].to(keys.dtype), fk, vv, log_gate)
    if window > 0:
        o_win = window_decode_step(q, k, v, k_ring, v_ring, ring_valid, position, cos, sin, keys.dtype)
        o = mix * o_win + (1.0 - mix) * o
    return o[:, None].to(q.dtype)
