"""Hedgehog attention with its linear part on chunk_gla (Triton on CUDA); see naive.py for the maths.

The linear part reads, at token t, only the tokens that have left the window:

    S_{t-W} = S0 + sum_{s <= t-W} phi(k_s) v_s^T,    z_{t-W} = z0 + sum_{s <= t-W} phi(k_s).

Feed the keys and values in W steps late (the window prefix's first, or zeros) and that is plain
causal linear attention, sum_{s <= t} phi(k'_s) v'_s^T: `linearize.kernels.chunk_gla` with
log-gates of zero, whose Triton forward and backward run on CUDA (the chunked PyTorch form
elsewhere). The normaliser is a running sum of the late keys. The window branch is the blocked
softmax of `sliding_window_attention` (on Triton: liger/window_triton.py, the Liger window kernels,
when there is no cached prefix and no padding), and it shares the normaliser through its
log-sum-exp:

    o_t = (o_win e^lse + phi(q_t) S_{t-W}) / (e^lse + phi(q_t) z_{t-W})

(divided through by e^lse, which is finite: a query always sees itself). Same contract as
`hedgehog_attention_torch`, without its [2W, F] blocks of lagged scores and [F, D] state per block.
"""

from __future__ import annotations

import torch

from ..cumsum import blocked_cumsum
from ..gla.naive import compute_dtype
from ..liger.naive import apply_rope, repeat_heads, sliding_window_attention, window_kernels
from .naive import prefix_or_empty


def hedgehog_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    *,
    window: int,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    window_prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """hedgehog_attention_torch's arguments and results (o in q's dtype; (S, z) of every token older
    than the window after these T). `backend` is chunk_gla's."""
    from .. import _pick, chunk_gla  # noqa: PLC0415 - the dispatcher imports this package's siblings

    dt = compute_dtype(q)
    io = q.dtype if q.is_cuda else dt  # the Triton products run in the I/O dtype, as Liger's layer does
    B, T, Hq, D = q.shape
    W = window
    # keys and values stay in the I/O dtype up to chunk_gla (no round trip through fp32: copies were
    # most of the layer's time on CUDA); padded steps' values and keys are zeroed
    valid = attention_mask
    keep = None if valid is None else valid[:, :, None, None]
    v_io, phi_k_io = (x.to(io) if keep is None else torch.where(keep, x.to(io), 0.0) for x in (v, phi_k))
    if W > 0:
        pk, pv, pphi, pvalid = prefix_or_empty(window_prefix, B, W, k.shape[2], D, v.shape[-1], phi_k.shape[-1], dt,
                                               q.device)
        late_phi, late_v = (torch.cat([p.to(io), x], 1)[:, :T] for p, x in ((pphi, phi_k_io), (pv, v_io)))
    else:
        late_phi, late_v = phi_k_io, v_io
    late_phi, late_v = repeat_heads(late_phi, Hq), repeat_heads(late_v, Hq)
    S0 = None if initial_state is None else initial_state[0].to(dt)
    # the window on the Liger window kernels too where chunk_gla runs on Triton (not for float64 references)
    on_triton = _pick(backend, q, D) == "triton" and dt != torch.float64
    num, S = chunk_gla(phi_q.to(io), late_phi, late_v, torch.zeros_like(late_phi), scale=1.0,
                       initial_state=S0, output_final_state=True, backend=backend)
    z_all = blocked_cumsum(late_phi, 1, dtype=dt)  # [B, T, Hq, F]
    if initial_state is not None:
        z_all = z_all + initial_state[1].to(dt)[:, None]
    num, den = num.to(dt), (phi_q * z_all).sum(-1, keepdim=True)  # one kernel promotes phi_q: no fp32 copy
    if W > 0:
        kernels = window_kernels(q, v, W, window_prefix, valid) if on_triton else None
        if kernels is not None:
            o_win, lse = kernels.window_with_lse(q.to(io), k.to(io), v.to(io), cos, sin, window=W)  # fp32 = dt
        else:
            valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if valid is None else valid
            keys = torch.cat([pk, apply_rope(k.to(dt), cos, sin)], 1)
            o_win, lse = sliding_window_attention(apply_rope(q.to(dt), cos, sin), keys, torch.cat([pv, v_io.to(dt)], 1),
                                                  window=W, scale=D**-0.5, key_valid=torch.cat([pvalid, valid], 1),
                                                  return_lse=True)
        w = torch.exp(-lse)[..., None]
        o = (o_win + w * num) / (1.0 + w * den)
    else:
        o = num / den.clamp_min(1e-30)
    return o.to(q.dtype), (S.to(dt), z_all[:, -1])
