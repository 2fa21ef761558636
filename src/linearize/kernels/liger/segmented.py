"""Liger Attention with each sequence cut into segments that the Triton sweeps run side by side.

The sweeps walk a sequence block by block, one program per (sequence, head). With few of them
most of the GPU idles: SmolLM2's 9 heads at batch 4 make 36 programs for an H100's 132 SMs,
each taking 256 sequential blocks for 4096 tokens (docs/kernels.md, fourth session). Here each
sequence becomes S segments, run as separate programs through the kernels' packed-sequence mode.

Forward. A segment's own contribution to the state is one batched matrix product,
L_j = sum_t exp(G_j - C_t) phi(k_t) v_t^T, with C_t its cumulative log-gate and G_j its total;
the state entering each segment follows in S small steps, S_in[j+1] = exp(G_j) S_in[j] + L_j.
Then one kernel launch computes every segment's outputs from its S_in, the window looking back
across the segment boundary (`window_starts` in gla/chunk_triton.py).

Backward. The gradient reaching a segment's final state comes from the segments after it:
dS_in[j] = exp(G_j) dS_out[j] + sum_t exp(C_t) phi(q_t) do_t^T (again one batched product),
dS_out[j - 1] = dS_in[j], run backwards. Then one launch of the two sweeps takes each segment's
initial and final state and its final-state gradient. The window's backward kernels are parallel
over blocks already and run on the whole sequences as before.

The extra work (the prologue's products, a second pass over q and k in PyTorch) is not free: at
SmolLM2's shape (B4 T4096, 3 segments) it took 0.87 ms of GPU time per layer's forward and
backward, against 2.95 ms saved in the sweeps (5.18 -> 3.07 ms in all; docs/kernels.md, fifth
session). It pays only where programs are few, so `segment_length` only splits then.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from ..cumsum import blocked_cumsum
from ..gla import chunk_triton
from ..gla.backward_triton import gla_bwd
from ..gla.chunk_triton import gla_fwd
from .window_bwd_triton import window_bwd

# Rows per segment: None chooses (segment_length), 0 never splits; tests set a small value.
SEGMENT_LEN: int | None = None
MIN_SEGMENT = 256  # rows; shorter segments would be mostly look-back and prologue
# A segment's fixed cost in rows: the window's look-back (64 rows) plus, by estimate, as much
# again for the PyTorch prologue and the launch tail.
SEGMENT_OVERHEAD = 128


def segment_length(batch: int, length: int, q_heads: int, device: torch.device) -> int | None:
    """Rows per segment, or None to keep whole sequences.

    The sweeps hold ~230 registers a thread at 8 warps, so an SM runs one program at a time and
    the time goes in waves of `SMs` programs. The pick minimises waves x rows per program (plus
    SEGMENT_OVERHEAD per segment), splitting only for a 10% gain. With 132 SMs: SmolLM2's 36
    programs at 4096 tokens take 3 segments of 1408 rows (one wave); at 1024 tokens and batch 16
    (144 programs) they stay whole, as B8 x 32 heads do."""
    if SEGMENT_LEN is not None:
        return SEGMENT_LEN or None
    if os.environ.get("LINEARIZE_SEGMENTS") == "0" or device.type != "cuda":  # the env variable turns it off
        return None
    return _best_split(batch * q_heads, length, torch.cuda.get_device_properties(device).multi_processor_count)


@functools.cache  # asked by every layer on every call: the same few shapes each step
def _best_split(programs: int, length: int, sms: int) -> int | None:
    step = 4 * chunk_triton.BT  # whole blocks, and a full window look-back (4 blocks) from the second segment on
    best, best_cost = None, -(-programs // sms) * length
    for pieces in range(2, length // MIN_SEGMENT + 1):
        rows = -(-length // pieces // step) * step
        pieces = -(-length // rows)  # after rounding rows up to whole steps
        cost = -(-programs * pieces // sms) * (rows + SEGMENT_OVERHEAD)
        if cost < 0.9 * best_cost:  # a clear gain only: splitting has costs this model leaves out
            best, best_cost = rows, cost
    return best


def _segments(x: torch.Tensor, pieces: int, rows: int) -> torch.Tensor:
    """[B, T, H, D] -> [B, S, rows, H, D] in fp32, the last segment padded with zero rows."""
    x = x.float()
    if pieces * rows != x.shape[1]:
        x = F.pad(x, (0, 0, 0, 0, 0, pieces * rows - x.shape[1]))
    return x.view(x.shape[0], pieces, rows, *x.shape[2:])


def _gates(k: torch.Tensor, pieces: int, rows: int, gate_normalizer: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative log-gate within each segment C [B, S, rows, Hkv, K] and each segment's total [B, S, Hkv, K]
    (padding rows add nothing)."""
    cum = blocked_cumsum(_segments(F.logsigmoid(k.float()).div_(gate_normalizer), pieces, rows), 2)
    return cum, cum[:, :, -1]


def _packed(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:])


@functools.lru_cache(maxsize=16)  # every layer asks the same: ten small launches saved per call
def _layout(batch: int, length: int, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment offsets in the packed [1, B*T] layout (cu_seqlens form) and each segment's sequence start
    (read-only: cached)."""
    pieces = -(-length // rows)
    firsts = torch.arange(batch, device=device)[:, None] * length
    starts = firsts + (torch.arange(pieces, device=device) * rows)[None]
    cu = torch.cat([starts.flatten(), torch.full((1,), batch * length, device=device)]).to(torch.int32)
    return cu, firsts.expand(batch, pieces).flatten().to(torch.int32).contiguous()


def _rope_packed(table: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    return table.expand(batch, length, table.shape[-1]).reshape(1, batch * length, -1).contiguous()


class SegmentedLigerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, initial_state, cos, sin, window, mix, gate_normalizer, output_final_state, rows):
        B, T, HQ, K = q.shape
        HKV, V = k.shape[2], v.shape[-1]
        group, pieces = HQ // HKV, -(-T // rows)
        k32 = k.float()  # the gates and phi(k) both read k in fp32: one conversion
        cum, total = _gates(k32, pieces, rows, gate_normalizer)
        phi_k = _segments(k32, pieces, rows).softmax(-1)
        local = torch.einsum("bslhk,bslhv->bshkv", phi_k.mul_(torch.exp(total[:, :, None] - cum)),
                             _segments(v, pieces, rows))[:, :, :, None]  # [B, S, HKV, 1, K, V]: one per kv group
        decay = torch.exp(total)[:, :, :, None, :, None]  # [B, S, HKV, 1, K, 1]
        # query heads of a group share k and v: their states differ only by the initial state
        state = (torch.zeros(B, HKV, 1, K, V, device=q.device) if initial_state is None
                 else initial_state.float().unflatten(1, (HKV, group)))
        entering, leaving = [], []
        for j in range(pieces):
            entering.append(state)
            state = decay[:, j] * state + local[:, j]
            leaving.append(state)
        # [B, S, HQ, K, V]
        entering, leaving = (torch.stack(x, 1).expand(-1, -1, -1, group, -1, -1).flatten(2, 3) for x in (entering, leaving))

        cu, starts = _layout(B, T, rows, q.device)
        cos_p, sin_p = (_rope_packed(x, B, T) for x in (cos, sin)) if window > 0 else (None, None)
        o, _ = gla_fwd(
            _packed(q), _packed(k), _packed(v), feature_map=True, gate_mult=1.0 / gate_normalizer, window=window,
            mix=mix, cos=cos_p, sin=sin_p, initial_state=entering.flatten(0, 1), cu_seqlens=cu,
            window_starts=starts if window > 0 else None, num_warps=8,  # 4 spilled at D 64 (kernel_registers.py)
        )
        ctx.save_for_backward(q, k, v, cos, sin, entering, leaving, cu)
        ctx.cfg = (window, mix, gate_normalizer, rows, initial_state is not None)
        return o.view(B, T, HQ, V), leaving[:, -1].clone() if output_final_state else None

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, cos, sin, entering, leaving, cu = ctx.saved_tensors
        window, mix, gn, rows, has_h0 = ctx.cfg
        B, T, HQ, K = q.shape
        group, pieces = HQ // k.shape[2], -(-T // rows)
        do_linear = do * ((1.0 - mix) if window > 0 else 1.0)
        cum, total = _gates(k, pieces, rows, gn)
        phi_q = _segments(q, pieces, rows).softmax(-1).unflatten(3, (-1, group))  # [B, S, rows, HKV, group, K]
        phi_q.mul_(torch.exp(cum)[:, :, :, :, None])  # times exp(C_t), shared by a group's query heads
        do_grouped = _segments(do_linear, pieces, rows).unflatten(3, (-1, group))
        local = torch.einsum("bslhgk,bslhgv->bshgkv", phi_q, do_grouped).flatten(2, 3)  # [B, S, HQ, K, V]
        decay = torch.exp(total).repeat_interleave(group, dim=2)[..., None]
        grad = torch.zeros_like(leaving[:, 0]) if dht is None else dht.float()
        leaving_grads = []
        for j in reversed(range(pieces)):
            leaving_grads.append(grad)
            grad = decay[:, j] * grad + local[:, j]
        leaving_grads = torch.stack(leaving_grads[::-1], 1)

        dq, dk, dv, _, dh0 = gla_bwd(
            _packed(q), _packed(k), _packed(v), None, _packed(do_linear), scale=1.0, feature_map=True,
            gate_mult=1.0 / gn, initial_state=entering.flatten(0, 1), dht=leaving_grads.flatten(0, 1),
            final_state=leaving.flatten(0, 1), cu_seqlens=cu, need_dh0=has_h0 and ctx.needs_input_grad[3],
        )
        dq, dk, dv = dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)
        if window > 0:
            window_bwd(q, k, v, do, cos, sin, window=window, mix=mix, add_to=(dq, dk, dv))
        dh0 = dh0.view(B, pieces, *dh0.shape[1:])[:, 0] if dh0 is not None else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dh0, None, None, None, None, None, None, None
