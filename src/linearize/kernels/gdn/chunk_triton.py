"""The gated delta rule in chunks on CUDA: a Triton kernel for each chunk's terms, one Triton sweep for the state.

chunk.py unrolls a 16-step chunk into (G_t its cumulative gate, r the reads k_j^T S_{j-1})

    r = W S + U,   o = (q G) S - P1 r + P2 v,   S' = G_C S - Kr^T r + Kw^T v

where W, U solve one unit lower-triangular system per chunk and P1, P2 are decayed q.k products.
Everything but S is chunk-local: terms_triton.py computes it for all chunks at once, one program
per chunk (beside its differentiable PyTorch reference, `chunk_terms_torch`). Folding r into o
leaves the sweep

    o = Qe S + Oe,   S' = dec * S - Kr^T (W S + U) + Kw^T v      (Qe = q G - P1 W, Oe = P2 v - P1 U)

one program per (batch, head, block of BV value columns), its [D, BV] state in fp32 registers,
T / 16 steps of [16, D] x [D, BV] products (chunk_delta_fwd_kernel). The pairwise decays
exp(x_t - y_j) of a chunk (per key channel) are one product of x exp(x - mid) and
y exp(mid - y) about the chunk's middle row, clamped at 60 as in gla/chunk_triton.py: no
[C, C, D] tensor, exact while 8 steps of a channel's log-gates sum above -60.

Only q, k, v, the gates and the state are kept for the backward, which computes the terms again.
Backward of the sweep, walking back with dS (the gradient reaching the state at a chunk's end)
over the chunk-start states (the forward sweep again writes them: T / 16 states of [D, V] per
head, freed after the layer's backward; the step-by-step walk writes all T):

    dr = -Kr dS,  dQe = do S^T,  dW = dr S^T,  dU = dr,  dOe = do,  dKr = -r dS^T,  dKw = v dS^T,
    dv = Kw dS,  ddec = rowsum(dS * S),  dS <- Qe^T do + dec * dS + W^T dr

with r = W S + U recomputed. The [16, D] gradients and ddec sum over the value blocks (one
partial per block, added in PyTorch). Products take fp32 operands on the tensor cores
(dot_precision: TF32, three-pass by default), not bf16: the delta rule's erase and write nearly
cancel for a repeated key.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gla import chunk_triton
from ..launch import fast
from . import terms_triton
from .terms_triton import BT, chunk_rows


@triton.jit
def chunk_delta_fwd_kernel(
    Qe, Oe, W, U, Kr, Kw, v, dec, h0, o, ht, states, NC,
    D: tl.constexpr, V: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    STORE_STATES: tl.constexpr, PRECISION: tl.constexpr,
):
    """The sweep. STORE_STATES (the backward's first pass): write each chunk-start state to
    states [B H, N, D, V] instead of the outputs."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    rd, cv = tl.arange(0, BD), i_v * BV + tl.arange(0, BV)
    d_ok, v_ok = rd < D, cv < V
    tile, tile_ok = rd[:, None] * V + cv[None, :], d_ok[:, None] & v_ok[None, :]
    S = tl.load(h0 + i_bh.to(tl.int64) * D * V + tile, mask=tile_ok, other=0.0).to(tl.float32)
    for n in range(0, NC):
        p_d, p_v, m_d, m_v = chunk_rows(i_bh, n, NC, rd, cv, d_ok, v_ok, D, V, BT)
        w = tl.load(W + p_d, mask=m_d, other=0.0).to(tl.float32)
        u = tl.load(U + p_v, mask=m_v, other=0.0).to(tl.float32)
        if STORE_STATES:
            tl.store(states + (i_bh * NC + n).to(tl.int64) * D * V + tile, S, mask=tile_ok)
        else:
            qe = tl.load(Qe + p_d, mask=m_d, other=0.0).to(tl.float32)
            b_o = tl.dot(qe, S, input_precision=PRECISION) + tl.load(Oe + p_v, mask=m_v, other=0.0).to(tl.float32)
            tl.store(o + p_v, b_o, mask=m_v)
        r = tl.dot(w, S, input_precision=PRECISION) + u
        kr = tl.load(Kr + p_d, mask=m_d, other=0.0).to(tl.float32)
        kw = tl.load(Kw + p_d, mask=m_d, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_v, mask=m_v, other=0.0).to(tl.float32)
        dc = tl.load(dec + (i_bh * NC + n).to(tl.int64) * D + rd, mask=d_ok, other=0.0).to(tl.float32)
        S = S * dc[:, None] - tl.dot(tl.trans(kr), r, input_precision=PRECISION)
        S += tl.dot(tl.trans(kw), b_v, input_precision=PRECISION)
    if not STORE_STATES:
        tl.store(ht + i_bh.to(tl.int64) * D * V + tile, S, mask=tile_ok)


@triton.jit
def chunk_delta_bwd_kernel(
    Qe, W, U, Kr, Kw, v, dec, states, do, dht, dqe_parts, dw_parts, dkr_parts, dkw_parts, ddec_parts,
    du, dv, dh0, NC, ROWS,
    D: tl.constexpr, V: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    USE_DHT: tl.constexpr, PRECISION: tl.constexpr,
):
    """The sweep back (formulas in the module docstring); [16, D] gradients and ddec as per-block
    partials [V / BV, ROWS, D] (ROWS = B H N BT) and [V / BV, B H N, D]."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    rd, cv = tl.arange(0, BD), i_v * BV + tl.arange(0, BV)
    d_ok, v_ok = rd < D, cv < V
    tile, tile_ok = rd[:, None] * V + cv[None, :], d_ok[:, None] & v_ok[None, :]
    dS = tl.zeros([BD, BV], dtype=tl.float32)
    if USE_DHT:
        dS += tl.load(dht + i_bh.to(tl.int64) * D * V + tile, mask=tile_ok, other=0.0).to(tl.float32)
    for i in range(0, NC):
        n = NC - 1 - i
        p_d, p_v, m_d, m_v = chunk_rows(i_bh, n, NC, rd, cv, d_ok, v_ok, D, V, BT)
        S = tl.load(states + (i_bh * NC + n).to(tl.int64) * D * V + tile, mask=tile_ok, other=0.0).to(tl.float32)
        qe = tl.load(Qe + p_d, mask=m_d, other=0.0).to(tl.float32)
        w = tl.load(W + p_d, mask=m_d, other=0.0).to(tl.float32)
        kr = tl.load(Kr + p_d, mask=m_d, other=0.0).to(tl.float32)
        kw = tl.load(Kw + p_d, mask=m_d, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_v, mask=m_v, other=0.0).to(tl.float32)
        b_do = tl.load(do + p_v, mask=m_v, other=0.0).to(tl.float32)
        r = tl.dot(w, S, input_precision=PRECISION) + tl.load(U + p_v, mask=m_v, other=0.0).to(tl.float32)
        dr = -tl.dot(kr, dS, input_precision=PRECISION)
        p_part = i_v.to(tl.int64) * ROWS * D + p_d
        tl.store(dqe_parts + p_part, tl.dot(b_do, tl.trans(S), input_precision=PRECISION), mask=m_d)
        tl.store(dw_parts + p_part, tl.dot(dr, tl.trans(S), input_precision=PRECISION), mask=m_d)
        tl.store(dkr_parts + p_part, -tl.dot(r, tl.trans(dS), input_precision=PRECISION), mask=m_d)
        tl.store(dkw_parts + p_part, tl.dot(b_v, tl.trans(dS), input_precision=PRECISION), mask=m_d)
        p_dec = (i_bh * NC + n).to(tl.int64) * D + rd
        tl.store(ddec_parts + i_v.to(tl.int64) * (ROWS // BT) * D + p_dec, tl.sum(dS * S, axis=1), mask=d_ok)
        tl.store(du + p_v, dr, mask=m_v)
        tl.store(dv + p_v, tl.dot(kw, dS, input_precision=PRECISION), mask=m_v)
        dc = tl.load(dec + p_dec, mask=d_ok, other=0.0).to(tl.float32)
        dS = dS * dc[:, None] + tl.dot(tl.trans(qe), b_do, input_precision=PRECISION)
        dS += tl.dot(tl.trans(w), dr, input_precision=PRECISION)
    tl.store(dh0 + i_bh.to(tl.int64) * D * V + tile, dS, mask=tile_ok)


def sweep_fwd(terms, state, precision: str, store_states: bool = False):
    """Launch the sweep over chunk_terms' outputs from state [B H, D, V] fp32: (o [B H, N BT, V], final
    state), or with store_states the chunk-start states [B H, N, D, V] only."""
    Qe, Oe, W, U, Kr, Kw, v, dec = terms
    BH, rows, D = Qe.shape
    V = v.shape[-1]
    BD, BV = chunk_triton.state_tile(D, V)
    if store_states:
        o = ht = None
        states = Qe.new_empty(BH, rows // BT, D, V)
    else:
        o, ht, states = Qe.new_empty(BH, rows, V), Qe.new_empty(BH, D, V), None
        chunk_triton.poison(o, ht)
    fast(chunk_delta_fwd_kernel)[(triton.cdiv(V, BV), BH)](
        Qe, Oe, W, U, Kr, Kw, v, dec, state, o if o is not None else Qe, ht if ht is not None else Qe,
        states if states is not None else Qe, rows // BT,
        D=D, V=V, BD=BD, BV=BV, BT=BT, STORE_STATES=store_states, PRECISION=precision, num_warps=8,
    )
    return states if store_states else (o, ht)


def sweep_bwd(terms, state, do, dht, precision: str):
    """The sweep's backward: the terms' gradients (chunk_terms' order) and the initial state's."""
    Qe, Oe, W, U, Kr, Kw, v, dec = terms
    BH, rows, D = Qe.shape
    V, NC = v.shape[-1], rows // BT
    BD, BV = chunk_triton.state_tile(D, V)
    blocks = triton.cdiv(V, BV)
    states = sweep_fwd(terms, state, precision, store_states=True)
    dqe, dw, dkr, dkw = (Qe.new_empty(blocks, BH, rows, D) for _ in range(4))
    ddec = Qe.new_empty(blocks, BH, NC, D)
    du, dv, dh0 = torch.empty_like(U), torch.empty_like(v), torch.empty_like(state)
    chunk_triton.poison(dqe, dw, dkr, dkw, ddec, du, dv, dh0)
    fast(chunk_delta_bwd_kernel)[(blocks, BH)](
        Qe, W, U, Kr, Kw, v, dec, states, do, dht if dht is not None else dh0,
        dqe, dw, dkr, dkw, ddec, du, dv, dh0, NC, BH * rows,
        D=D, V=V, BD=BD, BV=BV, BT=BT, USE_DHT=dht is not None, PRECISION=precision,
        num_warps=8,  # at 4 the five [D, BV] tiles live at once spill (kernel_registers.py)
    )
    return (dqe.sum(0), do, dw.sum(0), du, dkr.sum(0), dkw.sum(0), dv, ddec.sum(0)), dh0


class ChunkDeltaFunction(torch.autograd.Function):
    """The terms kernel, then the sweep; the backward recomputes the terms (only the inputs are kept
    from forward to backward), replays the sweep for its chunk-start states, then runs both back."""

    @staticmethod
    def forward(ctx, q, k, v, log_gate, beta, state):
        B, T, H, D = q.shape
        V = v.shape[-1]
        q, k, v, log_gate, beta = (x.contiguous() for x in (q, k, v, log_gate, beta))
        state = state.float().flatten(0, 1).contiguous()
        ctx.precision = chunk_triton.dot_precision()
        o, ht = sweep_fwd(terms_triton.chunk_terms_fwd(q, k, v, log_gate, beta, ctx.precision), state, ctx.precision)
        ctx.save_for_backward(q, k, v, log_gate, beta, state)
        return o.view(B, H, -1, V)[:, :, :T].transpose(1, 2), ht.view(B, H, D, V)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, log_gate, beta, state = ctx.saved_tensors
        B, T, H, D = q.shape
        V = v.shape[-1]
        terms = terms_triton.chunk_terms_fwd(q, k, v, log_gate, beta, ctx.precision)
        rows = terms[0].shape[1]
        do_rows = torch.zeros(B, H, rows, V, dtype=torch.float32, device=q.device)
        if do is not None:
            do_rows[:, :, :T] = do.transpose(1, 2)
        dht = None if dht is None else dht.float().flatten(0, 1).contiguous()
        d_terms, dh0 = sweep_bwd(terms, state, do_rows.flatten(0, 1), dht, ctx.precision)
        dq, dk, dv, dg, dbeta = terms_triton.chunk_terms_bwd(q, k, v, log_gate, beta, d_terms, ctx.precision)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(log_gate.dtype), dbeta.to(beta.dtype),
                dh0.view(B, H, D, V))


def gated_delta_chunked_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk.gated_delta_chunked's contract: q, k, log_gate [B, T, H, D] (q, k normalised),
    v [B, T, H, V], beta [B, T, H], state [B, H, D, V] -> (o [B, T, H, V], final state), fp32."""
    return ChunkDeltaFunction.apply(q, k, v, log_gate, beta, state)
