"""The sliding-window branch alone on the Liger window kernels: its output and log-sum-exp.

Liger's fused layer runs its window inside `liger_attention`'s own autograd function. The other
targets mix the same window branch with their recurrences outside it: mamba2, hgrn2, gsa and gdn
as mix * o_win + (1 - mix) * o (liger/naive.py's mix_window_branch), hedgehog through one shared
normaliser, which needs each query's log-sum-exp too (hedgehog/chunk.py). window_fwd_triton
writes both (mix 1, STORE_LSE); the backward is window_bwd_triton's two kernels with the lse's
own gradient folded into the softmax's (ds = p (dp - delta + dlse)). The kernels take no cached
prefix and no padding mask: callers use this only without them (training, plain prefill).
"""

from __future__ import annotations

import torch

from . import window_bwd_triton, window_fwd_triton


class WindowLseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cos, sin, window, with_lse):
        B, T, HQ, D = q.shape
        q, k, v = (x.contiguous() for x in (q, k, v))
        o = torch.empty(B, T, HQ, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, T, HQ, dtype=torch.float32, device=q.device) if with_lse else None
        window_fwd_triton.window_fwd_into(o, q, k, v, cos, sin, window=window, mix=1.0, lse=lse)
        ctx.save_for_backward(q, k, v, cos, sin)
        ctx.window = window
        ctx.set_materialize_grads(False)  # an unused lse's gradient stays None: no dlse pass
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, cos, sin = ctx.saved_tensors
        do = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if do is None else do.float()
        dq, dk, dv = window_bwd_triton.window_bwd(q, k, v, do, cos, sin, window=ctx.window, mix=1.0, dlse=dlse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def supported(q: torch.Tensor, v: torch.Tensor, window: int) -> bool:
    """Shapes the window kernels take: heads of 32 to 128, values as wide as keys, windows up to 64."""
    return window_fwd_triton.supported(q.shape[-1], v.shape[-1]) and 0 < window <= window_fwd_triton.BQ


def window_with_lse(q, k, v, cos, sin, *, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_win [B, T, Hq, D] fp32, lse [B, T, Hq] fp32) of softmax attention with RoPE over the last
    `window` keys (scale D^-1/2), as sliding_window_attention(..., return_lse=True) on rotated q, k."""
    return WindowLseFunction.apply(q, k, v, cos, sin, window, True)


def window_attention(q, k, v, cos, sin, *, window: int) -> torch.Tensor:
    """window_with_lse's o_win alone: the kernel writes no lse (the targets that only mix the window in)."""
    return WindowLseFunction.apply(q, k, v, cos, sin, window, False)[0]
