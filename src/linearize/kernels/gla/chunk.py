"""Chunked parallel gated linear attention in plain PyTorch.

The sequence is cut into chunks of 64. Inside a chunk, pairwise decays come from the
cumulative log-gate b (non-increasing along time, since g <= 0). Every exponent we take
is non-positive, so nothing overflows however long the sequence or strong the decay:

- intra-chunk, diagonal 16x16 blocks: exp(b_i - b_j) for j <= i, masked before exp;
- intra-chunk, off-diagonal blocks: split exp(b_i - b_j) = exp(b_i - r) * exp(r - b_j)
  with r the cumulative gate just before the query sub-chunk, so b_i <= r <= b_j;
- between chunks: q_i exp(b_i) reads the carried state, k_j exp(b_last - b_j) writes it.

Memory is O(T * 16 * K) for the diagonal blocks plus O(T * 64) for the chunk matrices.
"""

from __future__ import annotations

import torch

from .naive import compute_dtype

CHUNK = 64
SUBCHUNK = 16


def _intra_chunk_scores(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Lower-triangular decayed scores A[i, j] = sum_d q_id k_jd exp(b_id - b_jd), j <= i.

    q, k, b: [..., C, K] (C = CHUNK). Returns [..., C, C].
    """
    C, c = q.shape[-2], SUBCHUNK
    s = C // c
    A = q.new_zeros(*q.shape[:-1], C)
    # Diagonal sub-blocks: exact pairwise form on [.., s, c, c, K].
    qs, ks, bs = (x.unflatten(-2, (s, c)) for x in (q, k, b))
    diff = bs[..., :, :, None, :] - bs[..., :, None, :, :]  # [.., s, c(i), c(j), K]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    decay = torch.where(causal[..., None], diff, float("-inf")).exp()
    diag = torch.einsum("...sik,...sjk,...sijk->...sij", qs, ks, decay)
    for i in range(s):
        A[..., i * c : (i + 1) * c, i * c : (i + 1) * c] = diag[..., i, :, :]
    # Off-diagonal: queries of sub-block i against every key before it.
    for i in range(1, s):
        ref = b[..., i * c - 1 : i * c, :]  # cumulative gate just before sub-block i
        qi = q[..., i * c : (i + 1) * c, :] * (b[..., i * c : (i + 1) * c, :] - ref).exp()
        kj = k[..., : i * c, :] * (ref - b[..., : i * c, :]).exp()
        A[..., i * c : (i + 1) * c, : i * c] = qi @ kj.transpose(-1, -2)
    return A


def chunk_gla_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `naive_recurrent_gla`: q, k, g [B, T, H, K], v [B, T, H, V]."""
    dt = compute_dtype(q)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 0:  # an empty sequence (say, an empty segment of packed input) leaves the state as it was
        state = q.new_zeros(B, H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt)
        return q.new_zeros(B, 0, H, V, dtype=dt), (state if output_final_state else None)
    N = (T + CHUNK - 1) // CHUNK
    pad = N * CHUNK - T

    def prep(x: torch.Tensor) -> torch.Tensor:
        # [B, T, H, X] -> [B, H, N, C, X]; padded steps have k = v = 0 and gate 1.
        x = torch.nn.functional.pad(x.to(dt), (0, 0, 0, 0, 0, pad))
        return x.transpose(1, 2).unflatten(2, (N, CHUNK))

    q, k, v, g = prep(q) * scale, prep(k), prep(v), prep(g)
    b = g.cumsum(-2)
    b_last = b[..., -1:, :]
    A = _intra_chunk_scores(q, k, b)
    out = A @ v  # intra-chunk part, [B, H, N, C, V]
    q_in = q * b.exp()
    k_out = k * (b_last - b).exp()
    chunk_decay = b_last.squeeze(-2).exp()[..., None]  # [B, H, N, K, 1]
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    inter = []
    for n in range(N):
        inter.append(q_in[:, :, n] @ state)
        state = chunk_decay[:, :, n] * state + k_out[:, :, n].transpose(-1, -2) @ v[:, :, n]
    out = out + torch.stack(inter, dim=2)
    out = out.flatten(2, 3)[:, :, :T].transpose(1, 2)
    return out, (state if output_final_state else None)
