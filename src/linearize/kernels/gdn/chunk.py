"""Gated DeltaNet in chunks, exact, in plain PyTorch (see naive.py for the recurrence).

With per-channel gates D_t = diag(a_t) the decay does not commute with the delta rule's
(I - b_t k_t k_t^T), so the usual scalar-gate WY form does not apply as is. Instead, with
r_j = k_j^T S_{j-1} (what step j's key reads before writing), one chunk unrolls to

    S_t = G_t S_0 - sum_{j<=t} b_j (G_t G_{j-1}^-1 k_j) r_j + sum_{j<=t} b_j (G_t G_j^-1 k_j) v_j^T

(G_t the chunk's cumulative gate), and the reads solve a unit lower-triangular system

    r_j + sum_{i<j} b_i (k_j . G_{j-1} G_{i-1}^-1 k_i) r_i = (k_j G_{j-1}) S_0 + sum_{i<j} b_i (k_j . G_{j-1} G_i^-1 k_i) v_i.

Every gate ratio above is a product of later gates over earlier ones, exp(<= 0): the pairwise
decays of a chunk are formed as [C, C, D] tensors, masked before exp, as kernels/gla/chunk.py
does for its diagonal blocks. The solve is shared by all chunks (r = W S_0 + U with W, U solved
once, batched); only S_0 -> S_C runs chunk after chunk: T / CHUNK sequential steps instead of T.
Memory: the [C, C, D] decay tensors (T * CHUNK * D floats per head each) exist one at a time
and are recomputed in the backward, not kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .naive import gdn_attention_torch

CHUNK = 16


def _pairwise_decayed(x, y, rows, cols, mask):
    diff = rows[..., :, None, :] - cols[..., None, :, :]
    decay = torch.where(mask[..., None], diff, float("-inf")).exp()
    return torch.einsum("...td,...jd,...tjd->...tj", x, y, decay)


def _pairwise(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_d x_t[d] y_j[d] exp(rows_t[d] - cols_j[d]) where mask[t, j], else 0: [..., C, C].

    Under autograd the [..., C, C, D] decays are recomputed in the backward instead of kept
    (4 T C D floats per head and layer would otherwise stay alive until the backward)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, rows, cols)):
        return checkpoint(_pairwise_decayed, x, y, rows, cols, mask, use_reentrant=False)
    return _pairwise_decayed(x, y, rows, cols, mask)


def gated_delta_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, log_gate [B, T, H, D] (q, k normalised), v [B, T, H, V], beta [B, T, H], state [B, H, D, V].

    Returns o [B, T, H, V] and the final state."""
    B, T, H, D = q.shape
    N = (T + CHUNK - 1) // CHUNK
    pad = N * CHUNK - T

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, X] -> [B, H, N, C, X]; padding: identity steps
        return F.pad(x, (0, 0, 0, 0, 0, pad)).transpose(1, 2).unflatten(2, (N, CHUNK))

    q, k, v, g = chunks(q), chunks(k), chunks(v), chunks(log_gate)
    beta = chunks(beta[..., None])[..., 0]  # [B, H, N, C]
    b = g.cumsum(-2)  # log G_t, inclusive
    bp = b - g  # log G_{t-1}
    b_end = b[..., -1:, :]
    strict = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril(-1)
    causal = strict | torch.eye(CHUNK, dtype=torch.bool, device=q.device)

    # the reads: (I + L) r = (k G_{t-1}) S_0 + M v, solved for both right-hand sides at once
    L = _pairwise(k, k, bp, bp, strict) * beta[..., None, :]
    M = _pairwise(k, k, bp, b, strict) * beta[..., None, :]
    A = torch.eye(CHUNK, dtype=q.dtype, device=q.device) + L
    W = torch.linalg.solve_triangular(A, k * bp.exp(), upper=False, unitriangular=True)  # [B, H, N, C, D]
    U = torch.linalg.solve_triangular(A, M @ v, upper=False, unitriangular=True)  # [B, H, N, C, V]
    # outputs: o_t = (q_t G_t) S_0 - sum_j P1_tj b_j r_j + sum_j P2_tj b_j v_j
    P1 = _pairwise(q, k, b, bp, causal) * beta[..., None, :]
    P2v = (_pairwise(q, k, b, b, causal) * beta[..., None, :]) @ v
    q_in = q * b.exp()
    # the state at the chunk's end: G_C S_0 - sum_j b_j (k_j G_C G_{j-1}^-1) r_j + sum_j b_j (k_j G_C G_j^-1) v_j
    k_read = k * (b_end - bp).exp() * beta[..., None]
    k_write_v = (k * (b_end - b).exp() * beta[..., None]).transpose(-1, -2) @ v  # [B, H, N, D, V]
    chunk_decay = b_end[..., 0, :].exp()[..., None]  # [B, H, N, D, 1]
    outs = []
    for n in range(N):
        r = W[:, :, n] @ state + U[:, :, n]
        outs.append(q_in[:, :, n] @ state - P1[:, :, n] @ r + P2v[:, :, n])
        state = chunk_decay[:, :, n] * state - k_read[:, :, n].transpose(-1, -2) @ r + k_write_v[:, :, n]
    o = torch.stack(outs, dim=2).flatten(2, 3)[:, :, :T].transpose(1, 2)
    return o, state


def gdn_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """naive.gdn_attention_torch (same arguments) with the chunked recurrence: the model's path.
    On CUDA the recurrence is chunk_triton.py's (Triton kernels for the chunk terms, then the state)
    and the window runs on the Liger window kernels."""
    from .. import _triton_ops_for  # noqa: PLC0415 - the dispatcher imports this package's siblings

    ops = _triton_ops_for(q)
    recurrence = ops.gated_delta if ops else gated_delta_chunked
    return gdn_attention_torch(q, k, v, recurrence=recurrence, window_on_triton=ops is not None, **kwargs)
