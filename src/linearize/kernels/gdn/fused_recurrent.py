"""The gated delta rule (see naive.py) as Triton kernels, step by step: the model's path on CUDA.

    r_t = S_{t-1}^T k_t,   S_t = diag(a_t) (S_{t-1} - b_t k_t r_t^T) + b_t k_t v_t^T,   o_t = S_t^T q_t

Every value column of the state evolves on its own (r_t is read column by column), so a
program owns one block of BV value columns of one (batch, head) and walks the sequence with its
[D, BV] state in registers. The per-channel gates a_t do not commute with the delta rule's
(I - b k k^T), which is what makes a chunked form costly (chunk.py solves a triangular system per
chunk); a walk needs none of that.

Backward. The step is not invertible in a stable way (it would divide by a_t and by 1 - b_t), so
the forward walk runs again first and writes every S_{t-1} to a scratch tensor [B H, T, D, V]
(fp32, freed after the layer's backward: T D V floats per head, about as much as the [T, T]
scores a non-flash softmax attention keeps). Walking back with dS (the gradient reaching S_t):

    dS += q_t do_t^T;   P = S_{t-1} - b k r^T
    dq = S_t do,  da = rowsum(dS * P),  dv = b dS^T k,  db = k^T dS v - k^T (a dS) r
    dk = b dS v - b (a dS) r + S_{t-1} dr   with  dr = -b (a dS)^T k
    dS_{t-1} = a dS + k dr^T

dq, dk, da and db sum over the value blocks (one partial per block, added in PyTorch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gla import chunk_triton


@triton.jit
def delta_block(H: tl.constexpr, D: tl.constexpr, V: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr):
    """This program's value block, batch row and head; its key and value offsets with their masks;
    its [D, BV] state tile's offsets and mask in a [D, V] state."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    rd = tl.arange(0, BD)
    cv = i_v * BV + tl.arange(0, BV)
    d_ok, v_ok = rd < D, cv < V
    tile = (rd[:, None] * V + cv[None, :], d_ok[:, None] & v_ok[None, :])
    return i_v, i_bh, i_bh // H, i_bh % H, rd, cv, d_ok, v_ok, tile


@triton.jit
def step_inputs(k, v, log_gate, beta, row, rd, cv, d_ok, v_ok, D: tl.constexpr, V: tl.constexpr):
    """Step `row`'s key [D], value [BV], gate a = exp(log-gate) [D] and write strength b, in fp32."""
    k_t = tl.load(k + row * D + rd, mask=d_ok, other=0.0).to(tl.float32)
    v_t = tl.load(v + row * V + cv, mask=v_ok, other=0.0).to(tl.float32)
    a_t = tl.exp(tl.load(log_gate + row * D + rd, mask=d_ok, other=0.0).to(tl.float32))
    b_t = tl.load(beta + row).to(tl.float32)
    return k_t, v_t, a_t, b_t


@triton.jit
def delta_fwd_kernel(
    q, k, v, log_gate, beta, h0, o, ht, states, T,
    H: tl.constexpr, D: tl.constexpr, V: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, REPLAY: tl.constexpr,
):
    """The forward walk. REPLAY (the backward's first walk): write each S_{t-1} to states [B H, T, D, V]
    instead of the outputs."""
    i_v, i_bh, i_b, i_h, rd, cv, d_ok, v_ok, tile = delta_block(H, D, V, BD, BV)
    S = tl.zeros([BD, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + i_bh * D * V + tile[0], mask=tile[1], other=0.0).to(tl.float32)
    for t in range(T):
        row = (i_b * T + t) * H + i_h
        k_t, v_t, a_t, b_t = step_inputs(k, v, log_gate, beta, row, rd, cv, d_ok, v_ok, D, V)
        if REPLAY:
            tl.store(states + (i_bh * T + t).to(tl.int64) * D * V + tile[0], S, mask=tile[1])
        r = tl.sum(S * k_t[:, None], axis=0)
        S = a_t[:, None] * (S - b_t * k_t[:, None] * r[None, :]) + b_t * k_t[:, None] * v_t[None, :]
        if not REPLAY:
            q_t = tl.load(q + row * D + rd, mask=d_ok, other=0.0).to(tl.float32)
            tl.store(o + row * V + cv, tl.sum(S * q_t[:, None], axis=0), mask=v_ok)
    if STORE_HT:
        tl.store(ht + i_bh * D * V + tile[0], S, mask=tile[1])


@triton.jit
def delta_bwd_kernel(
    q, k, v, log_gate, beta, states, do, dht, dq_parts, dk_parts, da_parts, db_parts, dv, dh0, T, ROWS,
    H: tl.constexpr, D: tl.constexpr, V: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
):
    """The walk back (formulas in the module docstring); per-block partials of dq, dk, da, db."""
    i_v, i_bh, i_b, i_h, rd, cv, d_ok, v_ok, tile = delta_block(H, D, V, BD, BV)
    dS = tl.zeros([BD, BV], dtype=tl.float32)
    if USE_DHT:
        dS += tl.load(dht + i_bh * D * V + tile[0], mask=tile[1], other=0.0).to(tl.float32)
    for i in range(T):
        t = T - 1 - i
        row = (i_b * T + t) * H + i_h
        k_t, v_t, a_t, b_t = step_inputs(k, v, log_gate, beta, row, rd, cv, d_ok, v_ok, D, V)
        q_t = tl.load(q + row * D + rd, mask=d_ok, other=0.0).to(tl.float32)
        do_t = tl.load(do + row * V + cv, mask=v_ok, other=0.0).to(tl.float32)
        S_prev = tl.load(states + (i_bh * T + t).to(tl.int64) * D * V + tile[0], mask=tile[1], other=0.0)
        r = tl.sum(S_prev * k_t[:, None], axis=0)
        P = S_prev - b_t * k_t[:, None] * r[None, :]
        S = a_t[:, None] * P + b_t * k_t[:, None] * v_t[None, :]
        dS += q_t[:, None] * do_t[None, :]
        dP = a_t[:, None] * dS
        dr = -b_t * tl.sum(dP * k_t[:, None], axis=0)
        dk_t = (b_t * tl.sum(dS * v_t[None, :], axis=1) - b_t * tl.sum(dP * r[None, :], axis=1)
                + tl.sum(S_prev * dr[None, :], axis=1))
        db_t = tl.sum(tl.sum(dS * k_t[:, None] * v_t[None, :], axis=1) - tl.sum(dP * k_t[:, None] * r[None, :], axis=1))
        part = (i_v * ROWS + row) * D + rd
        tl.store(dq_parts + part, tl.sum(S * do_t[None, :], axis=1), mask=d_ok)
        tl.store(dk_parts + part, dk_t, mask=d_ok)
        tl.store(da_parts + part, tl.sum(dS * P, axis=1), mask=d_ok)
        tl.store(db_parts + i_v * ROWS + row, db_t)
        tl.store(dv + row * V + cv, b_t * tl.sum(dS * k_t[:, None], axis=0), mask=v_ok)
        dS = dP + k_t[:, None] * dr[None, :]
    if STORE_DH0:
        tl.store(dh0 + i_bh * D * V + tile[0], dS, mask=tile[1])


class DeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_gate, beta, state):
        B, T, H, D = q.shape
        V = v.shape[-1]
        q, k, v, log_gate, beta, state = (x.contiguous() for x in (q, k, v, log_gate, beta, state))
        BD, BV = chunk_triton.walk_tile(D, V)
        o = q.new_empty(B, T, H, V, dtype=torch.float32)
        ht = q.new_empty(B, H, D, V, dtype=torch.float32)
        chunk_triton.poison(o, ht)
        delta_fwd_kernel[(triton.cdiv(V, BV), B * H)](
            q, k, v, log_gate, beta, state, o, ht, o, T,
            H=H, D=D, V=V, BD=BD, BV=BV, USE_H0=True, STORE_HT=True, REPLAY=False,
        )
        ctx.save_for_backward(q, k, v, log_gate, beta, state)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, log_gate, beta, state = ctx.saved_tensors
        B, T, H, D = q.shape
        V = v.shape[-1]
        BD, BV = chunk_triton.walk_tile(D, V)
        blocks, rows = triton.cdiv(V, BV), B * T * H
        grid = (blocks, B * H)
        do = torch.zeros(B, T, H, V, device=q.device) if do is None else do.float().contiguous()
        # every S_{t-1}, from the forward walk again (the step cannot be undone stably)
        states = q.new_empty(B * H, T, D, V, dtype=torch.float32)
        delta_fwd_kernel[grid](
            q, k, v, log_gate, beta, state, states, state, states, T,
            H=H, D=D, V=V, BD=BD, BV=BV, USE_H0=True, STORE_HT=False, REPLAY=True,
        )
        dq_parts = q.new_empty(blocks, B, T, H, D, dtype=torch.float32)
        dk_parts, da_parts = torch.empty_like(dq_parts), torch.empty_like(dq_parts)
        db_parts = q.new_empty(blocks, B, T, H, dtype=torch.float32)
        dv, dh0 = torch.empty_like(do), q.new_empty(B, H, D, V, dtype=torch.float32)
        chunk_triton.poison(dq_parts, dk_parts, da_parts, db_parts, dv, dh0)
        delta_bwd_kernel[grid](
            q, k, v, log_gate, beta, states, do, dht.float().contiguous() if dht is not None else dh0,
            dq_parts, dk_parts, da_parts, db_parts, dv, dh0, T, rows,
            H=H, D=D, V=V, BD=BD, BV=BV, USE_DHT=dht is not None, STORE_DH0=True,
            num_warps=8,  # five [D, BV] tiles live at once: 4 warps spill 144-744 B (kernel_registers.py)
        )
        d_log_gate = da_parts.sum(0) * log_gate.float().exp()  # d/d(log a) = a d/da
        return (dq_parts.sum(0).to(q.dtype), dk_parts.sum(0).to(k.dtype), dv.to(v.dtype),
                d_log_gate.to(log_gate.dtype), db_parts.sum(0).to(beta.dtype), dh0.to(state.dtype))


def gated_delta_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk.gated_delta_chunked's contract: q, k, log_gate [B, T, H, D] (q, k normalised),
    v [B, T, H, V], beta [B, T, H], state [B, H, D, V] -> (o [B, T, H, V], final state), fp32."""
    return DeltaRuleFunction.apply(q, k, v, log_gate, beta, state)
