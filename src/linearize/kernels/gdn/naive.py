"""Gated DeltaNet on the pretrained projections (target `gdn`), step by step in plain PyTorch.

    S_t = diag(a_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,     o_t = q_t S_t

with q, k L2-normalised per head, the forget gate read off the key as in Liger
(log a_t = logsigmoid(k_t) / gate_normalizer, one per key channel) and the write strength
b_t = sigmoid(mean of k_t over the head dimension): a pooled key projection, no new parameters.
With a window, o = mix * (softmax attention over the last `window` tokens, RoPE) + (1 - mix) * o.
This is the reference and the decode step; chunk.py has the exact chunked form the model runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..gla.naive import compute_dtype
from ..liger.naive import mix_window_branch, repeat_heads, window_decode_step


def delta_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate_normalizer: float, valid: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """Normalised q, k, values, log-gates and write strengths in the compute dtype; padded steps
    write nothing and forget nothing."""
    dt = compute_dtype(q)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    log_gate = F.logsigmoid(k) / gate_normalizer
    beta = torch.sigmoid(k.mean(-1))  # [B, T, Hkv]
    if valid is not None:
        log_gate = torch.where(valid[:, :, None, None], log_gate, 0.0)
        beta = torch.where(valid[:, :, None], beta, 0.0)
    return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, log_gate, beta


def delta_update(state: torch.Tensor, k, v, log_gate, beta) -> torch.Tensor:
    """The next state, out of place (differentiable): state [B, H, D, D]; k, v, log_gate [B, H, D], beta [B, H]."""
    erase = torch.einsum("bhk,bhkv->bhv", k, state)  # k^T S: what the key currently reads
    beta = beta[..., None, None]
    kept = state - beta * k[..., :, None] * erase[..., None, :]
    return kept * log_gate.exp()[..., None] + beta * k[..., :, None] * v[..., None, :]


def delta_step(state: torch.Tensor, q, k, v, log_gate, beta) -> torch.Tensor:
    """One step in place on state [B, Hs, D, D] (decode: the cache's tensor; Hs = Hkv when a kv
    group's query heads share it); k, v, log_gate [B, Hs, D], beta [B, Hs]; q [B, Hq, D] -> o [B, Hq, D]."""
    state.copy_(delta_update(state, k, v, log_gate, beta))
    return torch.einsum("bhgk,bhkv->bhgv", q.unflatten(1, (state.shape[1], -1)), state).flatten(1, 2)


def delta_rule_steps(q, k, v, log_gate, beta, state) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one step at a time, out of place so autograd can train through it:
    q, k, log_gate [B, T, H, D], v [B, T, H, V], beta [B, T, H], state [B, H, D, V] -> (o, final state)."""
    outs = []
    for t in range(q.shape[1]):
        state = delta_update(state, k[:, t], v[:, t], log_gate[:, t], beta[:, t])
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outs, 1), state


def gdn_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    mix: float = 0.5,
    gate_normalizer: float = 16.0,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    window_prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    recurrence: Callable = delta_rule_steps,
    window_on_triton: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, Hq, D], k, v [B, T, Hkv, D] -> (o in q's dtype, final state [B, Hq, D, V]).
    `recurrence` has delta_rule_steps' contract: chunk.py passes the chunked form.
    window_on_triton: see liger/naive.py's mix_window_branch."""
    B, T, Hq, D = q.shape
    qn, kn, vv, log_gate, beta = delta_inputs(q, k, v, gate_normalizer, attention_mask)
    kn, vv, log_gate = (repeat_heads(x, Hq) for x in (kn, vv, log_gate))
    beta = repeat_heads(beta[..., None], Hq)[..., 0]
    state = qn.new_zeros(B, Hq, D, v.shape[-1]) if initial_state is None else initial_state.to(qn.dtype)
    o, state = recurrence(qn, kn, vv, log_gate, beta, state)
    if window > 0:
        o = mix_window_branch(o, q, k, v, window=window, mix=mix, cos=cos, sin=sin, attention_mask=attention_mask,
                              window_prefix=window_prefix, on_triton=window_on_triton)
    return o.to(q.dtype), state


def gdn_decode_step_torch(
    q, k, v, state, k_ring, v_ring, ring_valid, position: int | torch.Tensor, *, window: int, mix: float = 0.5,
    gate_normalizer: float = 16.0, cos=None, sin=None,
) -> torch.Tensor:
    """One token: the delta-rule update of `state` and the window ring, in place. Returns [B, 1, Hq, D].
    state [B, Hq or Hkv, D, D]: the state depends only on keys, values, gates and write strengths,
    so a kv group's query heads may share one."""
    Hs = state.shape[1]
    qn, kn, vv, log_gate, beta = delta_inputs(q, k, v, gate_normalizer, None)
    kn, vv, log_gate = (repeat_heads(x, Hs)[:, 0] for x in (kn, vv, log_gate))
    beta = repeat_heads(beta[..., None], Hs)[:, 0, :, 0]
    o = delta_step(state, qn[:, 0].to(state.dtype), kn.to(state.dtype), vv.to(state.dtype),
                   log_gate.to(state.dtype), beta.to(state.dtype))
    if window > 0:
        o_win = window_decode_step(q, k, v, k_ring, v_ring, ring_valid, position, cos, sin, state.dtype)
        o = mix * o_win + (1.0 - mix) * o
    return o[:, None].to(q.dtype)
