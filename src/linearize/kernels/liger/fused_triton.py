"""Liger Attention and chunked GLA on the fused Triton forward kernel, as autograd Functions.

Forward: one pass of gla/chunk_triton.gla_fwd_kernel (feature maps, gates, chunked GLA,
sliding window with RoPE, mixing; o written once).

Backward (first version): recomputation through the PyTorch reference (kernels/gla/chunk.py,
kernels/liger/naive.py) under autograd, one packed sequence at a time. It is exact but not
fused; a Triton backward is future work (docs/kernels.md). The rotary tables get no gradient.
"""

from __future__ import annotations

import torch

from ..gla.chunk import chunk_gla_torch
from ..gla.chunk_triton import MAX_WINDOW, gla_fwd, supported
from .naive import liger_attention_torch


def _segments(cu_seqlens, B, T):
    """(batch rows, state rows, first step, end step) per independent piece: the whole batch at
    once for padded-free [B, T] input, one sequence at a time for packed input."""
    if cu_seqlens is None:
        return [(slice(0, B), slice(0, B), 0, T)]
    cu = cu_seqlens.tolist()
    return [(slice(0, 1), slice(i, i + 1), cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def _recompute_grads(fn, cu_seqlens, inputs, needs, initial_state, need_h0, do, dht, seq_split):
    """Gradients of sum(o * do) + sum(ht * dht) by re-running `fn` per sequence under autograd.

    inputs: the tensors fn differentiates, [B, T, ...]; seq_split(i, lo, hi) -> per-sequence
    slices (and extras) handed to fn; returns grads for inputs and initial_state.
    """
    grads = [torch.zeros_like(x) if need else None for x, need in zip(inputs, needs, strict=True)]
    dh0 = torch.zeros_like(initial_state) if initial_state is not None and need_h0 else None
    B, T = inputs[0].shape[:2]
    for i, (bsel, hsel, lo, hi) in enumerate(_segments(cu_seqlens, B, T)):
        if hi <= lo:
            continue
        with torch.enable_grad():
            leaves = [x[bsel, lo:hi].detach().requires_grad_(need) for x, need in zip(inputs, needs, strict=True)]
            h0 = None
            if initial_state is not None:
                h0 = initial_state[hsel].detach().requires_grad_(dh0 is not None)
            o, ht = fn(*leaves, h0, seq_split(i, lo, hi))
            loss = (o.float() * do[bsel, lo:hi].float()).sum()
            if dht is not None and ht is not None:
                loss = loss + (ht * dht[hsel]).sum()
            wrt = [x for x in leaves if x.requires_grad] + ([h0] if dh0 is not None else [])
            if not wrt:
                continue
            got = list(torch.autograd.grad(loss, wrt, allow_unused=True))
        for j, x in enumerate(leaves):
            if x.requires_grad:
                gx = got.pop(0)
                if gx is not None:
                    grads[j][bsel, lo:hi] += gx.to(grads[j].dtype)
        if dh0 is not None:
            gh = got.pop(0)
            if gh is not None:
                dh0[hsel] += gh
    return grads, dh0


class _LigerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, initial_state, cos, sin, cu_seqlens, window, mix, gate_normalizer, output_final_state):
        o, ht = gla_fwd(
            q, k, v, feature_map=True, gate_mult=1.0 / gate_normalizer, window=window, mix=mix, cos=cos, sin=sin,
            initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )
        ctx.save_for_backward(q, k, v, initial_state, cos, sin, cu_seqlens)
        ctx.cfg = (window, mix, gate_normalizer, output_final_state)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, h0, cos, sin, cu = ctx.saved_tensors
        window, mix, gn, ofs = ctx.cfg

        def rope_slice(i, lo, hi):
            if window <= 0:
                return None, None
            return cos[:, lo:hi], sin[:, lo:hi]

        def fn(qi, ki, vi, h0i, cs):
            return liger_attention_torch(
                qi, ki, vi, window=window, mix=mix, gate_normalizer=gn, cos=cs[0], sin=cs[1],
                initial_state=h0i, output_final_state=True,
            )

        (dq, dk, dv), dh0 = _recompute_grads(
            fn, cu, (q, k, v), ctx.needs_input_grad[:3], h0, ctx.needs_input_grad[3], do, dht if ofs else None, rope_slice)
        return dq, dk, dv, dh0, None, None, None, None, None, None, None


class _ChunkGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, cu_seqlens, scale, output_final_state):
        o, ht = gla_fwd(
            q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )
        ctx.save_for_backward(q, k, v, g, initial_state, cu_seqlens)
        ctx.cfg = (scale, output_final_state)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, cu = ctx.saved_tensors
        scale, ofs = ctx.cfg

        def fn(qi, ki, vi, gi, h0i, _):
            return chunk_gla_torch(qi, ki, vi, gi, scale=scale, initial_state=h0i, output_final_state=True)

        (dq, dk, dv, dg), dh0 = _recompute_grads(
            fn, cu, (q, k, v, g), ctx.needs_input_grad[:4], h0, ctx.needs_input_grad[4], do, dht if ofs else None, lambda *a: None)
        return dq, dk, dv, dg, dh0, None, None, None


def _check(q, cu_seqlens):
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError("packed input (cu_seqlens) must have batch size 1")


def liger_attention(q, k, v, *, window=64, mix=0.5, gate_normalizer=16.0, cos=None, sin=None, initial_state=None,
                    output_final_state=False, cu_seqlens=None, attention_mask=None):
    """Triton Liger Attention; same contract as linearize.kernels.liger_attention."""
    D = q.shape[-1]
    padded = attention_mask is not None and not bool(attention_mask.all())
    if padded and cu_seqlens is not None:
        raise ValueError("pass either cu_seqlens (packed sequences) or attention_mask (padding), not both")
    if padded or window > MAX_WINDOW or not supported(D) or q.shape[2] % k.shape[2] != 0:
        # PyTorch path (exact, slower) for what the fused kernel does not cover: padding inside
        # the batch (it has no per-token validity; packed sequences via cu_seqlens are the fast
        # route for ragged batches), windows over MAX_WINDOW keys (it keeps at most that many
        # in registers) and head sizes that are not a power of two in [16, 256].
        from .. import liger_attention as dispatch  # noqa: PLC0415

        return dispatch(
            q, k, v, window=window, mix=mix, gate_normalizer=gate_normalizer, cos=cos, sin=sin,
            initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
            attention_mask=attention_mask, backend="torch",
        )
    if window > 0 and (cos is None or sin is None):
        raise ValueError("the sliding-window branch needs the rotary tables cos and sin")
    _check(q, cu_seqlens)
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
