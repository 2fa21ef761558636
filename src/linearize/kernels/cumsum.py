"""Cumulative sums along a middle dimension, in two levels.

PyTorch scans a dimension that is not the last with one thread per column, serially over the whole
length. At B x H x D columns of T steps most of a GPU idles: 0.3 ms per call for the segments'
gates at SmolLM2's shape (fifth GPU session), 0.4 ms each way for hedgehog's normaliser at B4 T1024
H16 F256 (eleventh). Summing within blocks of BLOCK steps, then over the blocks' totals, makes the
serial part BLOCK steps long and the columns T / BLOCK times as many.
"""

from __future__ import annotations

import torch

BLOCK = 64


def blocked_cumsum(x: torch.Tensor, dim: int, *, reverse: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.cumsum(x, dim, dtype=dtype), or with reverse the sums from each step to the last, in two levels."""
    dim = dim % x.ndim
    T = x.shape[dim]
    if T == 0:
        return x.to(dtype or x.dtype)
    if reverse:
        x = x.flip(dim)
    pad = (-T) % BLOCK
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:dim], pad, *x.shape[dim + 1 :])], dim)
    within = x.unflatten(dim, (-1, BLOCK)).cumsum(dim + 1, dtype=dtype)  # [..., N, BLOCK, ...]
    totals = within.select(dim + 1, BLOCK - 1)  # [..., N, ...]
    n = totals.shape[dim]
    before = torch.cat([torch.zeros_like(totals.narrow(dim, 0, 1)), totals.narrow(dim, 0, n - 1).cumsum(dim)], dim)
    out = (within + before.unsqueeze(dim + 1)).flatten(dim, dim + 1).narrow(dim, 0, T)
    return out.flip(dim) if reverse else out
