"""Pass 1 of gated slot attention (the slot scores, see chunk.py) as Triton kernels, step by step.

The slot keys carry a forget gate per slot, i.e. on the output side of the scores

    S_t = S_{t-1} diag(a_t) + phi(k_t) u_t^T     [D, m] (S = K^T),   s_t = S_t^T phi(q_t)   [m]

so every slot column evolves on its own: a program owns one block of BM slot columns of one
(batch, head) and walks the sequence with its [D, BM] state in registers. The columns'
independence is the parallelism (m / BM programs per head) and no pairwise decays
exp(b_t - b_j) are ever formed, unlike the chunked PyTorch form, which builds a
[CHUNK, CHUNK, m] tensor of them per chunk.

Backward, without the states of the forward:
- dphi(q)_t = S_t ds_t: the forward walk again;
- walking back with dS (= q_t ds_t^T + dS_{t+1} diag(a_{t+1})): dphi(k)_t = dS_t u_t and
  du_t = dS_t^T phi(k)_t; dS after the first step is the initial state's gradient;
- the gates: with B_t the cumulative log-gate, s_t[m] = sum_j exp(B_t - B_j)[m] (phi(q_t).phi(k_j)) u_j[m]
  gives dL/dB_t = s_t ds_t - u_t du_t (plus S_T dS_T summed over D at the last step), and the
  log-gates' gradient is its reverse cumulative sum: no division by a gate, exact for any a.
dphi(q) and dphi(k) sum over the slot blocks (one partial per block, added in PyTorch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gla import chunk_triton


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


@triton.jit
def step_inputs(fk, u, log_gate, row, rd, cm, d_ok, m_ok, D: tl.constexpr, M: tl.constexpr):
    """Step `row`'s phi(k) [D], write u [BM] and gate a = exp(log-gate) [BM], in fp32."""
    k_t = tl.load(fk + row * D + rd, mask=d_ok, other=0.0).to(tl.float32)
    u_t = tl.load(u + row * M + cm, mask=m_ok, other=0.0).to(tl.float32)
    a_t = tl.exp(tl.load(log_gate + row * M + cm, mask=m_ok, other=0.0).to(tl.float32))
    return k_t, u_t, a_t


@triton.jit
def slot_scores_fwd_kernel(
    fq, fk, u, log_gate, s, h0, ht, dq_parts, ds, T, ROWS,
    H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, GRAD_Q: tl.constexpr,
):
    """The forward walk. GRAD_Q: instead of the scores, this block's part of dphi(q)_t = S_t ds_t
    into dq_parts [M / BM, ROWS, D] (ROWS = B * T * H)."""
    i_m, i_b, i_h, rd, cm, d_ok, m_ok, tile = slot_block(H, D, M, BD, BM)
    S = initial_tile(h0, tile, USE_H0, BD, BM)
    for t in range(T):
        row = (i_b * T + t) * H + i_h
        k_t, u_t, a_t = step_inputs(fk, u, log_gate, row, rd, cm, d_ok, m_ok, D, M)
        S = S * a_t[None, :] + k_t[:, None] * u_t[None, :]
        if GRAD_Q:
            ds_t = tl.load(ds + row * M + cm, mask=m_ok, other=0.0).to(tl.float32)
            tl.store(dq_parts + (i_m * ROWS + row) * D + rd, tl.sum(S * ds_t[None, :], axis=1), mask=d_ok)
        else:
            q_t = tl.load(fq + row * D + rd, mask=d_ok, other=0.0).to(tl.float32)
            tl.store(s + row * M + cm, tl.sum(S * q_t[:, None], axis=0), mask=m_ok)
    if STORE_HT:
        tl.store(ht + tile[0], S, mask=tile[1])


@triton.jit
def slot_scores_bwd_kernel(
    fq, fk, u, log_gate, ds, dht, dk_parts, du, dh0, T, ROWS,
    H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
):
    """The walk back with dS: dphi(k)_t (this block's part) and du_t; dS at the start is dh0."""
    i_m, i_b, i_h, rd, cm, d_ok, m_ok, tile = slot_block(H, D, M, BD, BM)
    dS = initial_tile(dht, tile, USE_DHT, BD, BM)
    for i in range(T):
        row = (i_b * T + (T - 1 - i)) * H + i_h
        k_t, u_t, a_t = step_inputs(fk, u, log_gate, row, rd, cm, d_ok, m_ok, D, M)
        q_t = tl.load(fq + row * D + rd, mask=d_ok, other=0.0).to(tl.float32)
        ds_t = tl.load(ds + row * M + cm, mask=m_ok, other=0.0).to(tl.float32)
        dS += q_t[:, None] * ds_t[None, :]
        tl.store(dk_parts + (i_m * ROWS + row) * D + rd, tl.sum(dS * u_t[None, :], axis=1), mask=d_ok)
        tl.store(du + row * M + cm, tl.sum(dS * k_t[:, None], axis=0), mask=m_ok)
        dS = dS * a_t[None, :]
    if STORE_DH0:
        tl.store(dh0 + tile[0], dS, mask=tile[1])


def gate_gradient(scores, d_scores, write, du, keys, d_keys) -> torch.Tensor:
    """The log-gates' gradient [B, T, H, m] from the scores, the slot writes and their gradients:
    dL/dB_t = s_t ds_t - u_t du_t (B the cumulative log-gate), plus the final keys' own dependence
    on B_T, summed in reverse over t."""
    d_cum = scores * d_scores - write.float() * du
    if d_keys is not None:
        d_cum[:, -1] += (keys * d_keys.float()).sum(-1)
    return d_cum.flip(1).cumsum(1).flip(1)


class SlotScoresFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, phi_q, phi_k, write, log_gate, keys0):
        B, T, H, D = phi_q.shape
        M = write.shape[-1]
        phi_q, phi_k, write, log_gate = (x.contiguous() for x in (phi_q, phi_k, write, log_gate))
        keys0 = keys0.contiguous()
        BD, BM = chunk_triton.walk_tile(D, M)
        scores = phi_q.new_empty(B, T, H, M, dtype=torch.float32)
        keys = phi_q.new_empty(B, H, M, D, dtype=torch.float32)
        chunk_triton.poison(scores, keys)
        grid = (triton.cdiv(M, BM), B * H)
        slot_scores_fwd_kernel[grid](
            phi_q, phi_k, write, log_gate, scores, keys0, keys, scores, scores, T, B * T * H,
            H=H, D=D, M=M, BD=BD, BM=BM, USE_H0=True, STORE_HT=True, GRAD_Q=False,
        )
        ctx.save_for_backward(phi_q, phi_k, write, log_gate, keys0, scores, keys)
        return scores, keys

    @staticmethod
    def backward(ctx, d_scores, d_keys):
        phi_q, phi_k, write, log_gate, keys0, scores, keys = ctx.saved_tensors
        B, T, H, D = phi_q.shape
        M = write.shape[-1]
        BD, BM = chunk_triton.walk_tile(D, M)
        blocks = triton.cdiv(M, BM)
        grid, rows = (blocks, B * H), B * T * H
        d_scores = torch.zeros_like(scores) if d_scores is None else d_scores.float().contiguous()
        dq_parts = phi_q.new_empty(blocks, B, T, H, D, dtype=torch.float32)
        dk_parts, du = torch.empty_like(dq_parts), torch.empty_like(scores)
        dh0 = torch.empty_like(keys)
        chunk_triton.poison(dq_parts, dk_parts, du, dh0)
        slot_scores_fwd_kernel[grid](
            phi_q, phi_k, write, log_gate, scores, keys0, keys, dq_parts, d_scores, T, rows,
            H=H, D=D, M=M, BD=BD, BM=BM, USE_H0=True, STORE_HT=False, GRAD_Q=True,
        )
        d_keys_in = d_keys.float().contiguous() if d_keys is not None else dh0
        slot_scores_bwd_kernel[grid](
            phi_q, phi_k, write, log_gate, d_scores, d_keys_in, dk_parts, du, dh0, T, rows,
            H=H, D=D, M=M, BD=BD, BM=BM, USE_DHT=d_keys is not None, STORE_DH0=True,
        )
        d_log_gate = gate_gradient(scores, d_scores, write, du, keys, d_keys)
        return (dq_parts.sum(0).to(phi_q.dtype), dk_parts.sum(0).to(phi_k.dtype), du.to(write.dtype),
                d_log_gate.to(log_gate.dtype), dh0.to(keys0.dtype))


def slot_scores_triton(
    phi_q: torch.Tensor, phi_k: torch.Tensor, write: torch.Tensor, log_gate: torch.Tensor, keys0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk.slot_scores' contract: the scores [B, T, H, m] and the final slot keys [B, H, m, D] (fp32)."""
    return SlotScoresFunction.apply(phi_q, phi_k, write, log_gate, keys0)
