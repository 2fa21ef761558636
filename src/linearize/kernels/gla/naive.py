"""Step-by-step gated linear attention: the reference every other form is checked against.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,      o_t = scale * q_t S_t

Shapes follow flash-linear-attention: q, k, g are [B, T, H, K], v is [B, T, H, V],
states are [B, H, K, V]. Arithmetic runs in float32 (float64 when the inputs are).
"""

from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def naive_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    dt = compute_dtype(q)
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, g = (x.to(dt) for x in (q, k, v, g))
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt).clone()
    out = q.new_empty(B, T, H, V)
    for t in range(T):
        state = state * g[:, t].exp()[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        out[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state)
    return out, (state if output_final_state else None)
