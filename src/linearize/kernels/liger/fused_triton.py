"""Liger Attention and chunked GLA on the Triton kernels, as autograd Functions.

Forward: liger/window_fwd_triton.py writes the sliding-window branch's share (RoPE, softmax over
the last W keys, times mix) into o, then one pass of gla/chunk_triton.gla_fwd_kernel (feature
maps, gates, chunked GLA) adds the linear branch's. Heads of 16 or over 128 run the window inside
that pass instead.

Backward: two Triton sweeps of gla/backward_triton.py in their feature-map form (they recompute
softmax(q), softmax(k) and the key gate in registers, take the gate's reverse sum and the chain
rule back to the raw q, k themselves), then liger/window_bwd_triton.py adds the sliding-window
branch's gradients (recomputed scores, RoPE backward in the kernel) and writes the sums in the
input dtype; its dk/dv kernel also sums the sweeps' rows, which are per query head, over each kv
group. The rotary tables get no gradient.

Where (sequence, head) programs are few, liger_attention cuts the sequences into segments that
run side by side instead (segmented.py).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..gla.backward_triton import gla_bwd
from ..gla.chunk_triton import MAX_WINDOW, gla_fwd, supported
from . import segmented
from .window_bwd_triton import window_bwd

# The feature-map sweeps hold a whole head's state tile [D, D] in registers; beyond 128 that
# spills, so wider heads differentiate the maps in PyTorch around the plain GLA sweeps.
FEATURE_MAP_MAX_D = 128


def _backward_through_torch_maps(q, k, v, do_linear, gate_normalizer, common):
    """The GLA part's gradients for wide heads: PyTorch softmax / logsigmoid under autograd around
    gla_bwd's plain form (which splits K and V across programs)."""
    with torch.enable_grad():
        q32, k32 = (x.detach().float().requires_grad_() for x in (q, k))
        phi_q, phi_k, log_gate = q32.softmax(-1), k32.softmax(-1), F.logsigmoid(k32) / gate_normalizer
    dphi_q, dphi_k, dv, dg, dh0 = gla_bwd(phi_q.detach(), phi_k.detach(), v, log_gate.detach(), do_linear,
                                          scale=1.0, low_precision=q.dtype in (torch.bfloat16, torch.float16),
                                          **common)
    torch.autograd.backward([phi_q, phi_k, log_gate], [dphi_q, dphi_k, dg])
    return q32.grad, k32.grad, dv.contiguous(), dh0


class _LigerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, initial_state, cos, sin, cu_seqlens, window, mix, gate_normalizer, output_final_state):
        o, ht = gla_fwd(
            q, k, v, feature_map=True, gate_mult=1.0 / gate_normalizer, window=window, mix=mix, cos=cos, sin=sin,
            initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )
        ctx.save_for_backward(q, k, v, initial_state, cos, sin, cu_seqlens, ht)
        ctx.cfg = (window, mix, gate_normalizer)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, h0, cos, sin, cu, ht = ctx.saved_tensors
        window, mix, gn = ctx.cfg
        linear_share = (1.0 - mix) if window > 0 else 1.0
        common = dict(initial_state=h0, dht=dht if ht is not None else None, final_state=ht, cu_seqlens=cu,
                      need_dh0=h0 is not None and ctx.needs_input_grad[3])
        # LINEARIZE_MAPS_BACKWARD=torch: the PyTorch-maps form at any head size (A/B timing, debugging)
        if q.shape[-1] <= FEATURE_MAP_MAX_D and os.environ.get("LINEARIZE_MAPS_BACKWARD") != "torch":
            # with a window, its dk/dv kernel sums the sweeps' per-query-head rows (and casts) as it adds its own
            dq, dk, dv, _, dh0 = gla_bwd(q, k, v, None, do * linear_share, scale=1.0, feature_map=True,
                                         gate_mult=1.0 / gn, sum_groups=window == 0, **common)
        else:
            dq, dk, dv, dh0 = _backward_through_torch_maps(q, k, v, do * linear_share, gn, common)
        if window > 0:
            dq, dk, dv = window_bwd(q, k, v, do, cos, sin, window=window, mix=mix, cu_seqlens=cu, add_to=(dq, dk, dv),
                                    out_dtype=q.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dh0, None, None, None, None, None, None, None


class _ChunkGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, cu_seqlens, scale, output_final_state):
        o, ht = gla_fwd(
            q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )
        ctx.save_for_backward(q, k, v, g, initial_state, cu_seqlens, ht)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, cu, ht = ctx.saved_tensors
        dq, dk, dv, dg, dh0 = gla_bwd(
            q, k, v, g, do, scale=ctx.scale, initial_state=h0, dht=dht if ht is not None else None,
            final_state=ht, cu_seqlens=cu, need_dh0=h0 is not None and ctx.needs_input_grad[4],
            need_dg=ctx.needs_input_grad[3],
        )
        dg = dg.to(g.dtype) if dg is not None else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, dh0, None, None, None


def _check(q, cu_seqlens):
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError("packed input (cu_seqlens) must have batch size 1")


def fused_supports(q: torch.Tensor, k: torch.Tensor, window: int, attention_mask: torch.Tensor | None) -> bool:
    """What the fused kernel takes: no padding inside the batch (it has no per-token validity; packed
    sequences via cu_seqlens are the fast route for ragged batches), windows up to MAX_WINDOW keys
    (it keeps at most that many in registers), power-of-two head sizes in [16, 256], whole GQA groups."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    return not padded and window <= MAX_WINDOW and supported(q.shape[-1]) and q.shape[2] % k.shape[2] == 0


def liger_attention(q, k, v, *, window=64, mix=0.5, gate_normalizer=16.0, cos=None, sin=None, initial_state=None,
                    output_final_state=False, cu_seqlens=None):
    """Triton Liger Attention on inputs `fused_supports` accepts; contract of linearize.kernels.liger_attention."""
    if window > 0 and (cos is None or sin is None):
        raise ValueError("the sliding-window branch needs the rotary tables cos and sin")
    _check(q, cu_seqlens)
    rows = (segmented.segment_length(q.shape[0], q.shape[1], q.shape[2], q.shape[3], q.device) if cu_seqlens is None
            else None)
    if rows is not None and rows < q.shape[1]:  # few (sequence, head) programs: split the sequences
        o, ht = segmented.SegmentedLigerFunction.apply(
            q, k, v, initial_state, cos, sin, int(window), float(mix), float(gate_normalizer),
            bool(output_final_state), rows,
        )
    else:
        o, ht = _LigerFunction.apply(
            q, k, v, initial_state, cos, sin, cu_seqlens, int(window), float(mix), float(gate_normalizer),
            bool(output_final_state),
        )
    return o, (ht if output_final_state else None)


def chunk_gla(q, k, v, log_gate, *, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Triton chunked GLA; same contract as linearize.kernels.chunk_gla."""
    if not supported(q.shape[-1], v.shape[-1]):  # head sizes the kernel lacks: PyTorch path
        from .. import chunk_gla as dispatch  # noqa: PLC0415

        return dispatch(q, k, v, log_gate, scale=scale, initial_state=initial_state,
                        output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend="torch")
    _check(q, cu_seqlens)
    o, ht = _ChunkGLAFunction.apply(
        q, k, v, log_gate, initial_state, cu_seqlens, float(scale), bool(output_final_state)
    )
    return o, (ht if output_final_state else None)
