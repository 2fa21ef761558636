"""Pass 1 of gated slot attention (the slot scores, see chunk.py) as chunked Triton kernels.

The recurrence (naive.py, chunk.py) is

    S_t = S_{t-1} diag(a_t) + phi(k_t) u_t^T     [D, m] (S = K^T),   s_t = S_t^T phi(q_t)   [m]

and every slot column evolves on its own, so a program owns one block of BM slot columns of one
(batch, head) and sweeps the sequence BT = 16 steps at a time, its [D, BM] state in fp32
registers: matrix products on the tensor cores, not one outer product per step. The gate acts
on the output (slot) side, which makes a block's intra part one product: with b the cumulative
log-gate inside the block and mid its value at the middle row,

    s_i = exp(b_i) * (phi(q_i) S) + exp(b_i - mid) * sum_{j <= i} (phi(q_i) . phi(k_j)) u_j exp(mid - b_j)
    S  <- S diag(exp(b_last)) + phi(k)^T (u exp(b_last - b))

Both exponents about the middle row span at most BT/2 steps and are clamped at 60 as in
gla/chunk_triton.py (exact while 8 steps of a slot's log-gates sum above -60).

Backward, block by block:
- dphi(q) = (ds exp(b)) S^T + [mask_{j<=i} (ds exp(b - mid)) (u exp(mid - b))^T] phi(k): the forward sweep again;
- walking back with dS (the gradient reaching the state at a block's end):
  dphi(k) = [mask_{i>=j} (u exp(mid - b)) (ds exp(b - mid))^T] phi(q) + (u exp(b_last - b)) dS^T,
  du = exp(mid - b) ([mask_{j<=i} phi(q) phi(k)^T]^T (ds exp(b - mid))) + exp(b_last - b) (phi(k) dS),
  dS <- dS diag(exp(b_last)) + phi(q)^T (ds exp(b));
- the gates from the scores and du (gate_gradient): no division by a gate.
dphi(q) and dphi(k) sum over the slot blocks (one partial per block, added in PyTorch).
bf16 inputs run the products in bf16 with fp32 accumulation; other dtypes take fp32 operands on the
tensor cores (chunk_triton.dot_precision).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..cumsum import blocked_cumsum
from ..gla import chunk_triton
from ..launch import fast

BT = 16


@triton.jit
def slot_block(H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    """This program's slot block, batch row and head; its head-dimension and slot-column offsets with
    their masks; its state tile's offsets ([m, D] in memory, a [D, BM] tile in registers) and mask."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    rd = tl.arange(0, BD)
    cm = i_m * BM + tl.arange(0, BM)
    d_ok, m_ok = rd < D, cm < M
    tile = (i_bh * M * D + cm[None, :] * D + rd[:, None], d_ok[:, None] & m_ok[None, :])
    return i_m, i_bh // H, i_bh % H, rd, cm, d_ok, m_ok, tile


@triton.jit
def initial_tile(ptr, tile, USE: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    """The fp32 [D, BM] state tile read from ptr where USE, else zeros."""
    state = tl.zeros([BD, BM], dtype=tl.float32)
    if USE:
        state += tl.load(ptr + tile[0], mask=tile[1], other=0.0).to(tl.float32)
    return state


def gate_gradient(scores, d_scores, write, du, keys, d_keys) -> torch.Tensor:
    """The log-gates' gradient [B, T, H, m] from the scores, the slot writes and their gradients:
    dL/dB_t = s_t ds_t - u_t du_t (B the cumulative log-gate), plus the final keys' own dependence
    on B_T, summed in reverse over t."""
    d_cum = scores * d_scores - write.float() * du
    if d_keys is not None:
        d_cum[:, -1] += (keys * d_keys.float()).sum(-1)
    return blocked_cumsum(d_cum, 1, reverse=True)


@triton.jit
def block_inputs(fq, fk, u, log_gate, i_b, i_h, i_c, T, rd, cm, d_ok, m_ok,
                 H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BT: tl.constexpr):
    """Block i_c's rows [BT], their mask, phi(q) and phi(k) [BT, BD], write u and the cumulative
    log-gate's parts [BT, BM] (block_gates: b, b_last, b - mid, mid - b), all fp32."""
    rows = tl.arange(0, BT)
    t = i_c * BT + rows
    m_t = t < T
    r = ((i_b * T + t) * H + i_h).to(tl.int64)  # element offsets pass 2^31 at B T H D of 2G
    m_d, m_m = m_t[:, None] & d_ok[None, :], m_t[:, None] & m_ok[None, :]
    b_q = tl.load(fq + r[:, None] * D + rd[None, :], mask=m_d, other=0.0).to(tl.float32)
    b_k = tl.load(fk + r[:, None] * D + rd[None, :], mask=m_d, other=0.0).to(tl.float32)
    b_u = tl.load(u + r[:, None] * M + cm[None, :], mask=m_m, other=0.0).to(tl.float32)
    b_g = tl.load(log_gate + r[:, None] * M + cm[None, :], mask=m_m, other=0.0).to(tl.float32)
    b_b, b_last, to_mid, from_mid = chunk_triton.block_gates(b_g, m_t, rows, BT // 2 - 1)
    return r, m_t, b_q, b_k, b_u, b_b, b_last, to_mid, from_mid


@triton.jit
def chunk_scores_fwd_kernel(
    fq, fk, u, log_gate, s, h0, ht, dq_parts, ds, T, ROWS,
    H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BT: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, GRAD_Q: tl.constexpr, LOW_PRECISION: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The forward sweep. GRAD_Q: instead of the scores, this slot block's part of
    dphi(q)_t = S_t ds_t into dq_parts [M / BM, ROWS, D] (ROWS = B * T * H)."""
    i_m, i_b, i_h, rd, cm, d_ok, m_ok, tile = slot_block(H, D, M, BD, BM)
    dot_t = tl.bfloat16 if LOW_PRECISION else tl.float32
    rows = tl.arange(0, BT)
    causal = rows[None, :] <= rows[:, None]
    S = initial_tile(h0, tile, USE_H0, BD, BM)
    for i_c in range(0, tl.cdiv(T, BT)):
        r, m_t, b_q, b_k, b_u, b_b, b_last, to_mid, from_mid = block_inputs(
            fq, fk, u, log_gate, i_b, i_h, i_c, T, rd, cm, d_ok, m_ok, H, D, M, BT)
        u_mid = (b_u * tl.exp(from_mid)).to(dot_t)
        if GRAD_Q:
            b_ds = tl.load(ds + r[:, None] * M + cm[None, :], mask=m_t[:, None] & m_ok[None, :], other=0.0)
            b_ds = b_ds.to(tl.float32)
            dA = tl.dot((b_ds * tl.exp(to_mid)).to(dot_t), tl.trans(u_mid), input_precision=PRECISION)
            dA = tl.where(causal, dA, 0.0)
            dq = tl.dot((b_ds * tl.exp(b_b)).to(dot_t), tl.trans(S.to(dot_t)), input_precision=PRECISION)
            dq += tl.dot(dA.to(dot_t), b_k.to(dot_t), input_precision=PRECISION)
            p_dq = dq_parts + (i_m * ROWS + r)[:, None].to(tl.int64) * D + rd[None, :]
            tl.store(p_dq, dq, mask=m_t[:, None] & d_ok[None, :])
        else:
            A = tl.dot(b_q.to(dot_t), tl.trans(b_k.to(dot_t)), input_precision=PRECISION)
            A = tl.where(causal, A, 0.0)
            sc = tl.dot(b_q.to(dot_t), S.to(dot_t), input_precision=PRECISION) * tl.exp(b_b)
            sc += tl.exp(to_mid) * tl.dot(A.to(dot_t), u_mid, input_precision=PRECISION)
            tl.store(s + r[:, None] * M + cm[None, :], sc, mask=m_t[:, None] & m_ok[None, :])
        u_out = (b_u * tl.exp(b_last[None, :] - b_b)).to(dot_t)
        S = S * tl.exp(b_last)[None, :] + tl.dot(tl.trans(b_k.to(dot_t)), u_out, input_precision=PRECISION)
    if STORE_HT:
        tl.store(ht + tile[0], S, mask=tile[1])


@triton.jit
def chunk_scores_bwd_kernel(
    fq, fk, u, log_gate, ds, dht, dk_parts, du, dh0, T, ROWS,
    H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BT: tl.constexpr,
    USE_DHT: tl.constexpr, LOW_PRECISION: tl.constexpr, PRECISION: tl.constexpr,
):
    """The sweep back with dS: dphi(k) (this slot block's part) and du; dS at the start is dh0."""
    i_m, i_b, i_h, rd, cm, d_ok, m_ok, tile = slot_block(H, D, M, BD, BM)
    dot_t = tl.bfloat16 if LOW_PRECISION else tl.float32
    rows = tl.arange(0, BT)
    causal = rows[None, :] <= rows[:, None]
    dS = initial_tile(dht, tile, USE_DHT, BD, BM)
    for i in range(0, tl.cdiv(T, BT)):
        i_c = tl.cdiv(T, BT) - 1 - i
        r, m_t, b_q, b_k, b_u, b_b, b_last, to_mid, from_mid = block_inputs(
            fq, fk, u, log_gate, i_b, i_h, i_c, T, rd, cm, d_ok, m_ok, H, D, M, BT)
        m_m = m_t[:, None] & m_ok[None, :]
        b_ds = tl.load(ds + r[:, None] * M + cm[None, :], mask=m_m, other=0.0).to(tl.float32)
        ds_mid = (b_ds * tl.exp(to_mid)).to(dot_t)
        u_out = b_u * tl.exp(b_last[None, :] - b_b)
        # [t, i]: u_t exp(mid - b_t) . ds_i exp(b_i - mid), kept where i >= t
        Bt = tl.dot((b_u * tl.exp(from_mid)).to(dot_t), tl.trans(ds_mid), input_precision=PRECISION)
        Bt = tl.where(rows[None, :] >= rows[:, None], Bt, 0.0)
        dk = tl.dot(Bt.to(dot_t), b_q.to(dot_t), input_precision=PRECISION)
        dk += tl.dot(u_out.to(dot_t), tl.trans(dS.to(dot_t)), input_precision=PRECISION)
        A = tl.dot(b_q.to(dot_t), tl.trans(b_k.to(dot_t)), input_precision=PRECISION)
        A = tl.where(causal, A, 0.0)
        d_u = tl.exp(from_mid) * tl.dot(tl.trans(A).to(dot_t), ds_mid, input_precision=PRECISION)
        d_u += tl.exp(b_last[None, :] - b_b) * tl.dot(b_k.to(dot_t), dS.to(dot_t), input_precision=PRECISION)
        p_dk = dk_parts + (i_m * ROWS + r)[:, None].to(tl.int64) * D + rd[None, :]
        tl.store(p_dk, dk, mask=m_t[:, None] & d_ok[None, :])
        tl.store(du + r[:, None] * M + cm[None, :], d_u, mask=m_m)
        dS = dS * tl.exp(b_last)[None, :] + tl.dot(tl.trans(b_q.to(dot_t)), (b_ds * tl.exp(b_b)).to(dot_t),
                                                  input_precision=PRECISION)
    tl.store(dh0 + tile[0], dS, mask=tile[1])


class ChunkSlotScoresFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, phi_q, phi_k, write, log_gate, keys0):
        B, T, H, D = phi_q.shape
        M = write.shape[-1]
        phi_q, phi_k, write, log_gate, keys0 = (x.contiguous() for x in (phi_q, phi_k, write, log_gate, keys0))
        BD, BM = chunk_triton.state_tile(D, M)
        ctx.low = low = phi_q.dtype == torch.bfloat16 and phi_k.dtype == torch.bfloat16
        ctx.precision = chunk_triton.dot_precision()
        scores = phi_q.new_empty(B, T, H, M, dtype=torch.float32)
        keys = phi_q.new_empty(B, H, M, D, dtype=torch.float32)
        chunk_triton.poison(scores, keys)
        grid = (triton.cdiv(M, BM), B * H)
        fast(chunk_scores_fwd_kernel)[grid](
            phi_q, phi_k, write, log_gate, scores, keys0, keys, scores, scores, T, B * T * H,
            H=H, D=D, M=M, BD=BD, BM=BM, BT=BT, USE_H0=True, STORE_HT=True, GRAD_Q=False, LOW_PRECISION=low,
            PRECISION=ctx.precision, num_warps=8,
        )
        ctx.save_for_backward(phi_q, phi_k, write, log_gate, keys0, scores, keys)
        return scores, keys

    @staticmethod
    def backward(ctx, d_scores, d_keys):
        phi_q, phi_k, write, log_gate, keys0, scores, keys = ctx.saved_tensors
        B, T, H, D = phi_q.shape
        M = write.shape[-1]
        BD, BM = chunk_triton.state_tile(D, M)
        blocks = triton.cdiv(M, BM)
        grid, rows = (blocks, B * H), B * T * H
        d_scores = torch.zeros_like(scores) if d_scores is None else d_scores.float().contiguous()
        dq_parts = phi_q.new_empty(blocks, B, T, H, D, dtype=torch.float32)
        dk_parts, du = torch.empty_like(dq_parts), torch.empty_like(scores)
        dh0 = torch.empty_like(keys)
        chunk_triton.poison(dq_parts, dk_parts, du, dh0)
        fast(chunk_scores_fwd_kernel)[grid](
            phi_q, phi_k, write, log_gate, scores, keys0, keys, dq_parts, d_scores, T, rows,
            H=H, D=D, M=M, BD=BD, BM=BM, BT=BT, USE_H0=True, STORE_HT=False, GRAD_Q=True, LOW_PRECISION=ctx.low,
            PRECISION=ctx.precision, num_warps=8,
        )
        d_keys_in = d_keys.float().contiguous() if d_keys is not None else dh0
        fast(chunk_scores_bwd_kernel)[grid](
            phi_q, phi_k, write, log_gate, d_scores, d_keys_in, dk_parts, du, dh0, T, rows,
            H=H, D=D, M=M, BD=BD, BM=BM, BT=BT, USE_DHT=d_keys is not None, LOW_PRECISION=ctx.low,
            PRECISION=ctx.precision, num_warps=8,  # 4 warps spill (kernel_registers.py)
        )
        d_log_gate = gate_gradient(scores, d_scores, write, du, keys, d_keys)
        return (dq_parts.sum(0).to(phi_q.dtype), dk_parts.sum(0).to(phi_k.dtype), du.to(write.dtype),
                d_log_gate.to(log_gate.dtype), dh0.to(keys0.dtype))


def slot_scores_chunked_triton(
    phi_q: torch.Tensor, phi_k: torch.Tensor, write: torch.Tensor, log_gate: torch.Tensor, keys0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk.slot_scores' contract: the scores [B, T, H, m] and the final slot keys [B, H, m, D] (fp32)."""
    return ChunkSlotScoresFunction.apply(phi_q, phi_k, write, log_gate, keys0)
