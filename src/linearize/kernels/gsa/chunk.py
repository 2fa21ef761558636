"""Gated slot attention in chunks: two passes of gated linear attention (see naive.py for the maths).

With u_t = 1 - a_t (what step t writes into each slot), the slot keys and values are

    K_t = diag(a_t) K_{t-1} + u_t phi(k_t)^T,   V_t = diag(a_t) V_{t-1} + u_t v_t^T     [m, D]

1. scores s_t = K_t phi(q_t) [m]: linear attention of query phi(q), key phi(k) and value u whose
   gate acts on the value (slot) side. On CUDA, chunk_triton.py's Triton kernels compute it;
   here (the reference and the CPU path) it is computed in PyTorch, chunk by chunk
   (CHUNK steps at a time: the pairwise decays exp(b_t - b_j) <= 1 of a chunk as a
   [CHUNK, CHUNK, m] tensor, the state K^T [D, m] carried between chunks);
2. o_t = V_t^T softmax(s_t): plain gated linear attention with query softmax(s), key u, value v
   and the gate on the key (slot) side: `linearize.kernels.chunk_gla` (Triton on CUDA).

Both passes are exact rewrites of the step-by-step recurrence; T / CHUNK sequential steps
instead of T, and everything differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .naive import gsa_attention_torch

CHUNK = 16


def _intra_scores(dots: torch.Tensor, b: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """sum_{j <= t} dots[t, j] exp(b_t - b_j) u_j inside each chunk, per slot: [B, H, N, C, m]."""
    C = dots.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=dots.device).tril()
    diff = b[..., :, None, :] - b[..., None, :, :]  # [B, H, N, C(t), C(j), m]
    decay = torch.where(causal[..., None], diff, float("-inf")).exp()
    return torch.einsum("bhntj,bhntjm,bhnjm->bhntm", dots, decay, u)


def slot_scores(
    phi_q: torch.Tensor, phi_k: torch.Tensor, write: torch.Tensor, log_gate: torch.Tensor, keys0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1. phi_q, phi_k [B, T, H, D]; write, log_gate [B, T, H, m]; keys0 [B, H, m, D].

    Returns the scores s [B, T, H, m] and the final slot keys [B, H, m, D]."""
    B, T, H, D = phi_q.shape
    N = (T + CHUNK - 1) // CHUNK
    pad = N * CHUNK - T

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, X] -> [B, H, N, C, X]; padding writes nothing
        return F.pad(x, (0, 0, 0, 0, 0, pad)).transpose(1, 2).unflatten(2, (N, CHUNK))

    fq, fk, u, g = chunks(phi_q), chunks(phi_k), chunks(write), chunks(log_gate)
    b = g.cumsum(-2)  # cumulative log-gate inside each chunk, [B, H, N, C, m]
    dots = fq @ fk.transpose(-1, -2)  # phi(q_t) . phi(k_j), [B, H, N, C, C]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (dots, b, u)):
        # the [.., C, C, m] decays are recomputed in the backward rather than kept alive until it
        intra = checkpoint(_intra_scores, dots, b, u, use_reentrant=False)
    else:
        intra = _intra_scores(dots, b, u)
    q_in = fq  # reads the carried state through exp(b_t)
    u_out = u * (b[..., -1:, :] - b).exp()  # writes into the state at the chunk's end
    chunk_decay = b[..., -1, :].exp()  # [B, H, N, m]
    state = keys0.transpose(-1, -2)  # K^T [B, H, D, m]
    inter = []
    for n in range(N):
        inter.append((q_in[:, :, n] @ state) * b[:, :, n].exp())
        state = state * chunk_decay[:, :, n, None, :] + fk[:, :, n].transpose(-1, -2) @ u_out[:, :, n]
    scores = intra + torch.stack(inter, dim=2)
    return scores.flatten(2, 3)[:, :, :T].transpose(1, 2), state.transpose(-1, -2)


def slots_chunked(phi_q, phi_k, v, log_gate, keys0, values0):
    """naive.slot_steps' contract in two chunked passes: the scores here, then chunk_gla."""
    from .. import _triton_ops_for, chunk_gla  # noqa: PLC0415 - the dispatcher imports this package's siblings

    write = -torch.expm1(log_gate)  # 1 - a, exactly 0 where a padded step has log-gate 0
    ops = _triton_ops_for(phi_q)
    scores_pass = ops.slot_scores if ops else slot_scores  # chunk_triton.py on CUDA
    scores, keys = scores_pass(phi_q, phi_k, write, log_gate, keys0)
    o, values = chunk_gla(scores.softmax(-1), write, v, log_gate, scale=1.0, initial_state=values0,
                          output_final_state=True)
    return o.to(phi_q.dtype), (keys, values.to(phi_q.dtype))


def gsa_attention_chunked(q, k, v, **kwargs) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """naive.gsa_attention_torch (same arguments) with the chunked recurrence: the model's path.
    On CUDA the slot scores and the window run on Triton kernels."""
    from .. import _triton_ops_for  # noqa: PLC0415 - the dispatcher imports this package's siblings

    return gsa_attention_torch(q, k, v, recurrence=slots_chunked, window_on_triton=_triton_ops_for(q) is not None,
                               **kwargs)
