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
(B4 T4096, 3 segments) the two local kernels take 0.10 ms each way. Done in PyTorch it was 0.84
ms of GPU time and about 90 small launches a layer, and the layer waited on the host (4.22 ms of
wall for 2.42 of GPU work; 2.00 for 1.97 with the kernels; one H200, fifteenth session). It pays
only where programs are few, so `segment_length` only splits then.
"""

from __future__ import annotations

import functools
import os

import torch

from ..gla import chunk_triton
from ..gla.backward_triton import gla_bwd
from ..gla.chunk_triton import gla_fwd
from .segment_states_triton import segment_state_grads, segment_states
from .window_bwd_triton import window_bwd
from .window_fwd_triton import window_fwd_into

# Rows per segment: None chooses (segment_length), 0 never splits; tests set a small value.
SEGMENT_LEN: int | None = None


def segment_length(batch: int, length: int, q_heads: int, head_dim: int, device: torch.device) -> int | None:
    """Rows per segment, or None to keep whole sequences (see _pick)."""
    if SEGMENT_LEN is not None:
        return SEGMENT_LEN or None
    if os.environ.get("LINEARIZE_SEGMENTS") == "0" or device.type != "cuda":  # the env variable turns it off
        return None
    return _pick(batch * q_heads, length, head_dim, torch.cuda.get_device_properties(device).multi_processor_count)


@functools.cache  # asked by every layer on every call: the same few shapes each step
def _pick(programs: int, length: int, head_dim: int, sms: int) -> int | None:
    """Split while the (sequence, head) programs fill less than half of what the SMs hold at once
    (two sweeps an SM at heads of 64 and less, whose backward runs at 4 warps; one above), into
    segments of 640 rows at heads up to 64 and 1024 above. Heads over 128 stay whole: their
    unsegmented backward differentiates the maps in PyTorch (fused_triton.FEATURE_MAP_MAX_D).

    Measured on one H200 (fifteenth session; ms of a layer's forward+backward, bf16, segments of 256
    to 2048 rows, as `benchmarks/sweep_launch.py --variants segments=0 segments=640 ...` times them).
    At heads of 64, 640 rows were the fastest or within 1% of it at B4 T4096, B8 T2048, B2 T8192,
    B1 T16384, B8 T1024 and B4 T2048 H16 (B4 T4096 H9: 3.93 whole, 1.89 at 1408 rows, 1.23 at 640);
    512 rows were slower than 384 in every one. At heads of 128 (H32/8), 1024 rows were within 2% of
    the best at B1 and B2 T4096 and B1 T16384, while B4 T4096 (128 programs) ran 8.96 whole and
    10.2-10.6 in segments. At B16 T1024 H9 (144 programs) whole sequences take 1.38 ms and 256-row
    segments 1.33, which this rule leaves (a whole training step: 119.4 against 116.2 ms of GPU)."""
    if head_dim > 128:  # the segments' backward runs the feature-map sweeps, which spill beyond 128
        return None
    rows = 640 if head_dim <= 64 else 1024
    held = sms * (2 if head_dim <= 64 else 1)
    return rows if 2 * programs < held and length > rows else None


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
        )
        dq, dk, dv = dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)
        if window > 0:
            window_bwd(q, k, v, do, cos, sin, window=window, mix=mix, add_to=(dq, dk, dv))
        dh0 = dh0.view(*entering.shape[:2], *dh0.shape[1:])[:, 0] if dh0 is not None else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dh0, None, None, None, None, None, None, None
