"""Liger Attention with each sequence cut into segments that the Triton sweeps run side by side.

The sweeps walk a sequence block by block, one program per (sequence, head). With few of them
most of the GPU idles: SmolLM2's 9 heads at batch 4 make 36 programs for an H100's 132 SMs,
each taking 256 sequential blocks for 4096 tokens (docs/kernels.md, fourth session). Here each
sequence becomes S segments, run as separate programs through the kernels' packed-sequence mode.

Forward. A segment's own contribution to the state is L_j = sum_t exp(G_j - C_t) phi(k_t) v_t^T,
with C_t its cumulative log-gate and G_j its total; the state entering each segment follows in S
small steps, S_in[j+1] = exp(G_j) S_in[j] + L_j (segment_states_triton.py: one kernel for every
L_j side by side, one for the steps). Then one launch computes every segment's outputs from its
S_in, the window looking back across the segment boundary (`window_starts` in gla/chunk_triton.py).

Backward. The gradient reaching a segment's final state comes from the segments after it:
dS_in[j] = exp(G_j) dS_out[j] + sum_t exp(C_t) phi(q_t) do_t^T, dS_out[j - 1] = dS_in[j], run
backwards (the same two kernels' backward forms). Then one launch of the two sweeps takes each
segment's initial and final state and its final-state gradient. The window's backward kernels are
parallel over blocks already and run on the whole sequences as before.

The extra work (the boundary states, a second pass over q and k) is small now: at SmolLM2's shape
(B4 T4096, then 3 segments of 1408 rows) the two local kernels took 0.10 ms each way. Done in PyTorch it was 0.84
ms of GPU time and about 90 small launches a layer, and the layer waited on the host (4.22 ms of
wall for 2.42 of GPU work; 2.00 for 1.97 with the kernels; one H200, fifteenth session). It pays
only where programs are few, so `segment_length` only splits then.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..gla import chunk_triton
from ..gla.backward_triton import gla_bwd
from ..gla.chunk_triton import gla_fwd
from .segment_states_triton import segment_state_grads, segment_states
from .window_bwd_triton import window_bwd
from .window_fwd_triton import window_fwd_into

# Rows per segment: None chooses (segment_length), 0 never splits; tests set a small value.
SEGMENT_LEN: int | None = None
# True while a pass is warmed up and recorded into a CUDA graph (recover/graphed.py): its launches then
# cost the host nothing a step, so splitting needs to pay only for its GPU work.
RECORDING = False


@contextmanager
def recording() -> Iterator[None]:
    """The segment choices inside this block are for a pass a CUDA graph will replay (see RECORDING)."""
    global RECORDING
    before, RECORDING = RECORDING, True
    try:
        yield
    finally:
        RECORDING = before


def segment_length(batch: int, length: int, q_heads: int, head_dim: int, device: torch.device) -> int | None:
    """Rows per segment, or None to keep whole sequences (see _pick)."""
    if SEGMENT_LEN is not None:
        return SEGMENT_LEN or None
    if os.environ.get("LINEARIZE_SEGMENTS") == "0" or device.type != "cuda":  # the env variable turns it off
        return None
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return _pick(batch * q_heads, length, head_dim, sms, 0 if RECORDING else SPLIT_HOST_ROWS)


# The segment rule's constants (_pick): the shortest and longest segments tried (the segment-state
# kernels walk each segment in turn, one program per kv head: long segments make them the slow part,
# 0.72 ms at B1 T4096 H32/8 D128 with 2048 rows against 0.46 with 1024); what splitting costs the GPU, as a
# share of a perfectly balanced sweep (the boundary states, a second pass over q and k); what it costs
# the host, in rows of a sweep (four more launches and their Python: ~0.2 ms a layer's forward+backward,
# about 256 rows at heads of 64); and how close to the cheapest a choice with fewer segments may be to win.
MIN_ROWS = 128
MAX_ROWS = 2048
SPLIT_COST = 0.4
SPLIT_HOST_ROWS = 256
FEWER_SEGMENTS_WITHIN = 1.03


def _rounds(programs: int, length: int, rows: int, held: int) -> int:
    """Sequential rows the busiest SM walks: the rounds of `held` programs the grid takes, times the rows each."""
    pieces = -(-length // rows)
    return -(-programs * pieces // held) * rows


@functools.cache  # asked by every layer on every call: the same few shapes each step
def _pick(programs: int, length: int, head_dim: int, sms: int, host_rows: int = SPLIT_HOST_ROWS) -> int | None:
    """The rows per segment that minimise the rows the busiest SM walks in turn, or None (whole sequences).

    An SM holds two sweeps at heads of 64 and less (their backward runs at 4 warps), one above, so a grid
    of P programs runs in ceil(P / held) rounds, each as long as its longest segment. Segments are as
    near equal as whole blocks (chunk_triton.BT rows) allow, MIN_ROWS to MAX_ROWS long. Splitting adds SPLIT_COST of a
    perfectly balanced sweep (P * length / held rows) and host_rows (SPLIT_HOST_ROWS; none for a pass
    recorded into a CUDA graph, whose launches the host does not repeat); among the choices within
    FEWER_SEGMENTS_WITHIN of the cheapest, the one with fewest segments wins. Heads over 128 stay
    whole: their unsegmented backward differentiates the maps in PyTorch (fused_triton.FEATURE_MAP_MAX_D).

    Measured on one H200 (seventeenth session, `benchmarks/sweep_launch.py --variants segments=N`, GPU
    ms of a layer's forward+backward, bf16). At B4 T4096 H9 D64 (36 programs, 264 held): 592 rows
    make 7 segments in one round, 1.15 ms; 640 rows also one round of 640, 1.21; 512 rows make 8
    segments, 288 programs, two rounds of 512: 1.54; 464 and 416 rows two rounds too (1.50, 1.40);
    192 rows three rounds of 192 (1.18). Before, with 640-row segments, "512 rows slower than 384"
    was unexplained: it is the second round. This rule against the one it replaced (640 rows at heads
    of 64, 1024 above, and only below half the SMs' programs): B8 T1024 H9 0.66 against 1.04 ms, B8
    T2048 1.14 against 1.31, B4 T2048 H16 1.07 against 1.24, B4 T4096 1.15 against 1.21. B16 T1024 H9
    stays whole (1.36 ms GPU, 1.38 wall): 208-row segments take 1.20 ms of GPU but 1.50 of wall, the
    split's host time, and in a SmolLM2 training step at that shape they cost tokens/s."""
    if head_dim > 128 or length < 4 * MIN_ROWS:  # beyond 128 the segments' backward sweeps spill; short
        return None  # sequences take microseconds a sweep, less than the segment kernels' launches
    held = sms * (2 if head_dim <= 64 else 1)
    whole = _rounds(programs, length, length, held)
    split = SPLIT_COST * programs * length / held + host_rows
    choices = []
    for pieces in range(max(2, -(-length // MAX_ROWS)), length // MIN_ROWS + 1):
        rows = -(-length // pieces // chunk_triton.BT) * chunk_triton.BT  # ceil(length / pieces), in whole blocks
        choices.append((_rounds(programs, length, rows, held) + split, rows))
    cheapest = min([whole, *(cost for cost, _ in choices)])
    if whole <= cheapest * FEWER_SEGMENTS_WITHIN:
        return None
    return next(rows for cost, rows in choices if cost <= cheapest * FEWER_SEGMENTS_WITHIN)


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
        V = v.shape[-1]
        q, k, v = (x.contiguous() for x in (q, k, v))  # the kernels index rows of contiguous tensors
        entering, leaving, totals = segment_states(k, v, initial_state, rows, 1.0 / gate_normalizer, HQ)
        cu, starts = _layout(B, T, rows, q.device)
        common = dict(feature_map=True, gate_mult=1.0 / gate_normalizer, mix=mix, initial_state=entering.flatten(0, 1),
                      cu_seqlens=cu, num_warps=8)  # 4 warps spilled at D 64 (kernel_registers.py)
        if window > 0 and chunk_triton.window_split_here(K, V):
            # the window does not care where the segments start: it runs on the whole sequences, then
            # the segments' sweeps add the linear branch (no packed RoPE tables or row starts)
            o = window_fwd_into(torch.empty(B, T, HQ, V, dtype=q.dtype, device=q.device), q, k, v, cos, sin,
                                window=window, mix=mix)
            gla_fwd(_packed(q), _packed(k), _packed(v), out=_packed(o), **common)
        else:  # the window, if any, inside the sweeps, looking back across segment starts
            tables = {} if window == 0 else dict(window=window, cos=_rope_packed(cos, B, T), sin=_rope_packed(sin, B, T),
                                                 window_starts=starts)
            o, _ = gla_fwd(_packed(q), _packed(k), _packed(v), **tables, **common)
        ctx.save_for_backward(q, k, v, cos, sin, entering, leaving, totals, cu)
        ctx.cfg = (window, mix, gate_normalizer, rows, initial_state is not None)
        return o.view(B, T, HQ, V), leaving[:, -1].clone() if output_final_state else None

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, cos, sin, entering, leaving, totals, cu = ctx.saved_tensors
        window, mix, gn, rows, has_h0 = ctx.cfg
        do_linear = do * ((1.0 - mix) if window > 0 else 1.0)
        leaving_grads = segment_state_grads(q, k, do_linear, dht, totals, rows, 1.0 / gn)
        dq, dk, dv, _, dh0 = gla_bwd(
            _packed(q), _packed(k), _packed(v), None, _packed(do_linear), scale=1.0, feature_map=True,
            gate_mult=1.0 / gn, initial_state=entering.flatten(0, 1), dht=leaving_grads.flatten(0, 1),
            final_state=leaving.flatten(0, 1), cu_seqlens=cu, need_dh0=has_h0 and ctx.needs_input_grad[3],
            sum_groups=window == 0,  # with a window, its dk/dv kernel sums the group's rows (and casts)
        )
        dq, dk, dv = (x.view(*q.shape[:2], *x.shape[2:]) for x in (dq, dk, dv))
        if window > 0:
            dq, dk, dv = window_bwd(q, k, v, do, cos, sin, window=window, mix=mix, add_to=(dq, dk, dv), out_dtype=q.dtype)
        dh0 = dh0.view(*entering.shape[:2], *dh0.shape[1:])[:, 0] if dh0 is not None else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dh0, None, None, None, None, None, None, None
