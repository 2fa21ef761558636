"""Forward of the sliding-window branch as a kernel of its own (softmax attention with RoPE over the
last W <= 64 keys), written as mix * o_win into o before the GLA sweep adds (1 - mix) * o_gla.

Why a separate kernel: inside the sweep (gla/chunk_triton.py, WINDOW > 0) the window cost 2.1 of
its 5.13 ms at B8 H32 T4096 D128 on an H200 (3.04 ms without it). The sweep is one program per
(sequence, head) at 255 registers and 8 warps an SM (Nsight Compute: 12.5% occupancy, an issue
every 4 cycles), so every instruction it carries is paid in latency. This kernel is parallel over
blocks instead: one program per (block of BQ = 64 query rows, query head), as window_dq_kernel in
window_bwd_triton.py. A block's queries see keys in that block and the one before, so an online
softmax runs over those two key blocks. Tiles are held as their two RoPE halves (rotate-half pairs
column c with c + D/2), so the rotation is elementwise and the scores are q1 k1^T + q2 k2^T.

Rows are flat (B * T, or the packed rows of cu_seqlens). A row's sequence starts at r - r % T, or at
starts[r] for packed rows (segments of one sequence share its start, so the window looks across
segment boundaries). Rotary tables are [B or 1, T, D] (row (r // T) * TABLE_T + r % T with
TABLE_T = T for per-sequence tables, 0 for one shared table) or [1, NT, D] when packed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import fast

BQ = 64  # rows per block: a query's keys lie in its block and the one before, so W <= 64
LAUNCH: dict[str, int] = {}  # overrides for benchmarks/sweep_launch.py: num_warps (else warps(D)), num_stages


# Tiles held as their two RoPE halves, shared with window_bwd_triton.py's kernels.


@triton.jit
def rotated_halves(x, row_ok, rows64, HEADS: tl.constexpr, i_h, cos, sin, table_rows, D: tl.constexpr, mult, dot_t):
    """RoPE'd halves (rotate-half convention) of rows [BQ] of head i_h of x [rows, HEADS, D], times
    mult, in dot_t; the rotary tables' rows are table_rows, the mask row_ok [BQ, 1]."""
    H2: tl.constexpr = D // 2
    ch = tl.arange(0, H2)
    p_x = x + (rows64 * HEADS + i_h)[:, None] * D + ch[None, :]
    x1 = tl.load(p_x, mask=row_ok, other=0.0).to(tl.float32)
    x2 = tl.load(p_x + H2, mask=row_ok, other=0.0).to(tl.float32)
    c = tl.load(cos + table_rows[:, None] * D + ch[None, :], mask=row_ok, other=0.0).to(tl.float32)
    s = tl.load(sin + table_rows[:, None] * D + ch[None, :], mask=row_ok, other=0.0).to(tl.float32)
    return ((x1 * c - x2 * s) * mult).to(dot_t), ((x2 * c + x1 * s) * mult).to(dot_t)


@triton.jit
def halves(x, row_ok, rows64, HEADS: tl.constexpr, i_h, D: tl.constexpr, mult, dot_t):
    """The halves of rows [BQ] of head i_h of x [rows, HEADS, D], times mult, in dot_t."""
    H2: tl.constexpr = D // 2
    p_x = x + (rows64 * HEADS + i_h)[:, None] * D + tl.arange(0, H2)[None, :]
    x1 = tl.load(p_x, mask=row_ok, other=0.0).to(tl.float32) * mult
    x2 = tl.load(p_x + H2, mask=row_ok, other=0.0).to(tl.float32) * mult
    return x1.to(dot_t), x2.to(dot_t)


@triton.jit
def dot_halves(a1, a2, b1, b2):
    """a b^T for a, b held as halves of their columns: a1 b1^T + a2 b2^T."""
    return tl.dot(a1, tl.trans(b1), input_precision="ieee") + tl.dot(a2, tl.trans(b2), input_precision="ieee")


@triton.jit
def window_scores(q1, q2, k1, k2, r, start, c, NT, scale, W: tl.constexpr):
    """Scaled scores [queries r, keys c], -inf outside each query's window (and its sequence)."""
    visible = (c[None, :] <= r[:, None]) & (r[:, None] - c[None, :] < W) & (c[None, :] >= start[:, None])
    visible = visible & (c[None, :] >= 0) & (r[:, None] < NT)
    return tl.where(visible, dot_halves(q1, q2, k1, k2) * scale, -float("inf"))


@triton.jit
def window_fwd_kernel(
    q, k, v, cos, sin, starts, o, lse,
    NT, T, TABLE_T, mix, scale,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BQ: tl.constexpr,
    IS_VARLEN: tl.constexpr, LOW_PRECISION: tl.constexpr, STORE_LSE: tl.constexpr,
):
    i_q, i_h = tl.program_id(0), tl.program_id(1)
    i_hk = i_h // (HQ // HKV)
    H2: tl.constexpr = D // 2
    dot_t = q.dtype.element_ty if LOW_PRECISION else tl.float32
    r = i_q * BQ + tl.arange(0, BQ)
    valid = r < NT
    r64 = r.to(tl.int64)
    if IS_VARLEN:
        start = tl.load(starts + r, mask=valid, other=0)
    else:
        start = r - r % T
    # scores in log2 units: exp2 below is then the softmax's exp
    q1, q2 = rotated_halves(q, valid[:, None], r64, HQ, i_h, cos, sin, (r64 // T) * TABLE_T + r64 % T, D,
                            scale * 1.4426950408889634, dot_t)
    m_i = tl.full([BQ], -1e30, dtype=tl.float32)  # finite: a row with no key yet stays free of inf - inf
    l_i = tl.zeros([BQ], dtype=tl.float32)
    acc1 = tl.zeros([BQ, H2], dtype=tl.float32)
    acc2 = tl.zeros([BQ, H2], dtype=tl.float32)
    for j in range(2):  # the key block just before, then this one
        c = (i_q - 1 + j) * BQ + tl.arange(0, BQ)
        in_range = (c >= 0) & (c < NT)
        key_ok = in_range[:, None]
        c64 = tl.where(in_range, c, 0).to(tl.int64)
        k1, k2 = rotated_halves(k, key_ok, c64, HKV, i_hk, cos, sin, (c64 // T) * TABLE_T + c64 % T, D, 1.0, dot_t)
        v1, v2 = halves(v, key_ok, c64, HKV, i_hk, D, 1.0, dot_t)
        s = window_scores(q1, q2, k1, k2, r, start, c, NT, 1.0, W)  # in log2 units: q carries scale / ln 2
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc1 = acc1 * alpha[:, None] + tl.dot(p.to(dot_t), v1, input_precision="ieee")
        acc2 = acc2 * alpha[:, None] + tl.dot(p.to(dot_t), v2, input_precision="ieee")
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    norm = mix / l_safe
    p_o = o + (r64 * HQ + i_h)[:, None] * D + tl.arange(0, H2)[None, :]
    tl.store(p_o, (acc1 * norm[:, None]).to(o.dtype.element_ty), mask=valid[:, None])
    tl.store(p_o + H2, (acc2 * norm[:, None]).to(o.dtype.element_ty), mask=valid[:, None])
    if STORE_LSE:  # the scores' log-sum-exp, back from log2 units
        tl.store(lse + r64 * HQ + i_h, (m_i + tl.log2(l_safe)) * 0.6931471805599453, mask=valid)


def packed_starts(cu_seqlens: torch.Tensor, rows: int, firsts: torch.Tensor | None = None) -> torch.Tensor:
    """int32 [rows]: the first row of each packed row's sequence (`firsts[n]` for segment n when
    segments of one sequence are packed, else cu_seqlens[n]); output_size spares a host sync."""
    cu = cu_seqlens.to(dtype=torch.int64)
    firsts = cu[:-1] if firsts is None else firsts.to(device=cu.device, dtype=torch.int64)
    return torch.repeat_interleave(firsts, cu.diff(), output_size=rows).to(torch.int32).contiguous()


def warps(head_dim: int) -> int:
    """8 at heads of 128 (4 spilled 616 B a thread on sm_90, benchmarks/kernel_registers.py), else 4."""
    return 8 if head_dim >= 128 else 4


def stages(head_dim: int) -> int:
    """2 below heads of 128: the pipelined loads hold 139 registers a thread instead of 216 (sm_90), and
    B16 T1024 H9 D64 took 0.061 ms against 0.075 on an H200 (fourteenth session). At D 128 two
    stages were no faster (1.24 against 1.19 ms at B8 T4096 H32)."""
    return 2 if head_dim < 128 else 1


def supported(head_dim: int, value_dim: int) -> bool:
    """Heads the kernel takes: halves of at least 16 columns (tl.dot's minimum), at most 128 wide
    (wider tiles would spill), and values as wide as keys."""
    return 32 <= head_dim <= 128 and value_dim == head_dim


def window_fwd_into(
    o: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    window: int,
    mix: float,
    cu_seqlens: torch.Tensor | None = None,
    window_starts: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write mix * window_attention(rope(q), rope(k), v) into o [B, T, Hq, D] and return it.

    q [B, T, Hq, D]; k, v [B, T, Hkv, D] contiguous; cos, sin [B or 1, T, D], or [1, total, D] for
    packed rows (cu_seqlens, B = 1). window_starts (with cu_seqlens): the first row of each packed
    segment's sequence, so that windows see across segments of one sequence. lse (fp32 [B, T, Hq],
    contiguous): also each query's log-sum-exp of its scaled scores, written into it.
    """
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    if window > BQ:
        raise ValueError(f"the Triton window forward handles windows up to {BQ}, got {window}")
    NT = B * T
    starts = o if cu_seqlens is None else packed_starts(cu_seqlens, NT, window_starts)  # o: unused unless packed
    cos, sin = cos.contiguous(), sin.contiguous()
    table_t = T if cos.shape[0] > 1 else 0
    row_t = NT if cu_seqlens is not None else T
    fast(window_fwd_kernel)[(triton.cdiv(NT, BQ), HQ)](
        q, k, v, cos, sin, starts, o, o if lse is None else lse, NT, row_t, 0 if cu_seqlens is not None else table_t,
        float(mix), float(D) ** -0.5,
        HQ=HQ, HKV=HKV, D=D, W=int(window), BQ=BQ, IS_VARLEN=cu_seqlens is not None,
        LOW_PRECISION=q.dtype in (torch.bfloat16, torch.float16), STORE_LSE=lse is not None,
        num_warps=LAUNCH.get("num_warps", warps(D)), num_stages=LAUNCH.get("num_stages", stages(D)),
    )
    return o
