"""Backward of the sliding-window branch (softmax attention with RoPE over the last W <= 64 keys).

Sequences are laid out flat (B * T rows, or the packed rows of cu_seqlens); `starts[r]` is the
first row of row r's sequence, so a window never crosses a sequence boundary. One program owns
64 query rows of one query head and sees their only possible keys: the 64 rows before the block
and the block itself. It recomputes the scores and the softmax in fp32 (no statistics are kept
from the forward), then, with do_w = mix * do and delta = rowsum(do_w * o_win):

    ds = p * (do_w v^T - delta) * D^-1/2,  dq_rot = ds k_rot,  dk_rot = ds^T q_rot,  dv = p^T do_w.

RoPE's backward in the rotate-half convention is dx = dy cos + R^T(dy sin) with R^T(z) =
-sign * z[:, swap] (sign -1 on the first half, halves swapped). Column swaps commute with
right-multiplication, so (ds k_rot)[:, swap] = ds (k_rot[:, swap]), and k_rot[:, swap] comes
from the same loads: k_swap cos - sign k sin (cos and sin repeat across the halves). So every
product stays a matrix product and no register tile is permuted.

dq is written once per row; dk and dv collect contributions from two query blocks (and, with
GQA, from every query head of the group), so they are added atomically into fp32 buffers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gla import chunk_triton
from .naive import apply_rope, sliding_window_attention

BQ = 64  # query rows per program; keys come from this block and the one before, so W <= 64


@triton.jit
def rope_and_swapped(x, x_sw, c, s, sign):
    """RoPE'd rows (rotate-half convention) and the same with their halves swapped: x_sw is x with
    its halves swapped, sign -1 on the first half; cos and sin repeat across the halves."""
    return x * c + sign[None, :] * x_sw * s, x_sw * c - sign[None, :] * x * s


@triton.jit
def window_bwd_kernel(
    q, k, v, do, cos, sin, starts, dq, dk, dv,
    NT, mix, scale,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BQ: tl.constexpr,
    LOW_PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    i_q, i_h = tl.program_id(0), tl.program_id(1)
    i_hk = i_h // (HQ // HKV)
    dot_t = q.dtype.element_ty if LOW_PRECISION else tl.float32
    cd = tl.arange(0, D)
    cd_swap = (cd + D // 2) % D
    sign = tl.where(cd < D // 2, -1.0, 1.0)

    r = i_q * BQ + tl.arange(0, BQ)  # query rows
    m_r = r < NT
    c = i_q * BQ - BQ + tl.arange(0, 2 * BQ)  # key rows: the block before and this one
    m_c = (c >= 0) & (c < NT)
    r64, c64 = r.to(tl.int64), c.to(tl.int64)

    row_ok = m_r[:, None]
    b_q = tl.load(q + (r64 * HQ + i_h)[:, None] * D + cd[None, :], mask=row_ok, other=0.0).to(tl.float32)
    q_sw = tl.load(q + (r64 * HQ + i_h)[:, None] * D + cd_swap[None, :], mask=row_ok, other=0.0).to(tl.float32)
    cos_q = tl.load(cos + r64[:, None] * D + cd[None, :], mask=row_ok, other=0.0)
    sin_q = tl.load(sin + r64[:, None] * D + cd[None, :], mask=row_ok, other=0.0)
    q_rot, q_rot_sw = rope_and_swapped(b_q, q_sw, cos_q, sin_q, sign)

    key_ok = m_c[:, None]
    p_k = k + (c64 * HKV + i_hk)[:, None] * D
    b_k = tl.load(p_k + cd[None, :], mask=key_ok, other=0.0).to(tl.float32)
    k_sw = tl.load(p_k + cd_swap[None, :], mask=key_ok, other=0.0).to(tl.float32)
    cos_k = tl.load(cos + c64[:, None] * D + cd[None, :], mask=key_ok, other=0.0)
    sin_k = tl.load(sin + c64[:, None] * D + cd[None, :], mask=key_ok, other=0.0)
    k_rot, k_rot_sw = rope_and_swapped(b_k, k_sw, cos_k, sin_k, sign)
    b_v = tl.load(v + (c64 * HKV + i_hk)[:, None] * D + cd[None, :], mask=key_ok, other=0.0).to(dot_t)
    b_do = tl.load(do + (r64 * HQ + i_h)[:, None] * D + cd[None, :], mask=row_ok, other=0.0).to(tl.float32) * mix

    # scores and the softmax over each query's window (its own row always inside: no empty row)
    start = tl.load(starts + r, mask=m_r, other=0)
    visible = (c[None, :] <= r[:, None]) & (r[:, None] - c[None, :] < W) & (c[None, :] >= start[:, None])
    visible = visible & m_c[None, :] & m_r[:, None]
    s = tl.dot(q_rot.to(dot_t), tl.trans(k_rot.to(dot_t)), input_precision="ieee") * scale
    s = tl.where(visible, s, -float("inf"))
    m = tl.max(s, axis=1)
    m = tl.where(m_r, m, 0.0)
    p = tl.exp(s - m[:, None])
    p = p / tl.where(m_r, tl.sum(p, axis=1), 1.0)[:, None]

    o_win = tl.dot(p.to(dot_t), b_v, input_precision="ieee")
    delta = tl.sum(o_win * b_do, axis=1)
    dp = tl.dot(b_do.to(dot_t), tl.trans(b_v), input_precision="ieee")
    ds = (p * (dp - delta[:, None]) * scale).to(dot_t)

    dq_rot = tl.dot(ds, k_rot.to(dot_t), input_precision="ieee")
    dq_rot_sw = tl.dot(ds, k_rot_sw.to(dot_t), input_precision="ieee")
    b_dq = dq_rot * cos_q - sign[None, :] * dq_rot_sw * sin_q
    p_dq = dq + (r64 * HQ + i_h)[:, None] * D + cd[None, :]
    if ACCUMULATE:  # each query row belongs to this program alone: a plain read-add-write
        b_dq += tl.load(p_dq, mask=row_ok, other=0.0)
    tl.store(p_dq, b_dq, mask=row_ok)

    ds_t = tl.trans(ds)
    dk_rot = tl.dot(ds_t, q_rot.to(dot_t), input_precision="ieee")
    dk_rot_sw = tl.dot(ds_t, q_rot_sw.to(dot_t), input_precision="ieee")
    b_dk = dk_rot * cos_k - sign[None, :] * dk_rot_sw * sin_k
    b_dv = tl.dot(tl.trans(p.to(dot_t)), b_do.to(dot_t), input_precision="ieee")
    p_kv = (c64 * HKV + i_hk)[:, None] * D + cd[None, :]
    tl.atomic_add(dk + p_kv, b_dk, mask=key_ok)
    tl.atomic_add(dv + p_kv, b_dv, mask=key_ok)


def window_bwd_torch(q, k, v, do, cos, sin, *, window: int, mix: float, cu_seqlens=None, add_to=None):
    """window_bwd by PyTorch autograd through the banded reference (sliding_window_attention), for
    devices where the kernel's tiles do not fit (Triton raises OutOfResources). Same contract."""
    scale = q.shape[-1] ** -0.5
    with torch.enable_grad():
        leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
        q_rot, k_rot = apply_rope(leaves[0], cos.float(), sin.float()), apply_rope(leaves[1], cos.float(), sin.float())
        bounds = [0, q.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
        parts = [sliding_window_attention(q_rot[:, lo:hi], k_rot[:, lo:hi], leaves[2][:, lo:hi], window=window,
                                          scale=scale) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo]
        o = torch.cat(parts, 1)
    grads = torch.autograd.grad(o, leaves, do.float() * mix)
    if add_to is None:
        return grads
    for total, g in zip(add_to, grads, strict=True):
        total += g
    return add_to


def window_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    window: int,
    mix: float,
    cu_seqlens: torch.Tensor | None = None,
    add_to: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (float32) of mix * window_attention(rope(q), rope(k), v) for the output gradient do.

    q, do [B, T, Hq, D]; k, v [B, T, Hkv, D]; cos, sin [B or 1, T, D]; window <= 64. Returns dq, dk,
    dv; with `add_to` (contiguous fp32 dq, dk, dv of those shapes) adds into them and returns them.
    """
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    if window > BQ:
        raise ValueError(f"the Triton window backward handles windows up to {BQ}, got {window}")
    NT = B * T
    rows = torch.arange(NT, device=q.device, dtype=torch.int32)
    if cu_seqlens is None:
        starts = rows - rows % T
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        starts = torch.repeat_interleave(cu[:-1], cu.diff())
    tables = [x.to(torch.float32).expand(B, T, D).reshape(NT, D).contiguous() for x in (cos, sin)]
    if add_to is not None:
        dq, dk, dv = add_to
    else:
        dq = torch.empty(B, T, HQ, D, dtype=torch.float32, device=q.device)
        if chunk_triton.POISON_OUTPUTS:
            dq.fill_(float("nan"))
        dk = torch.zeros(B, T, HKV, D, dtype=torch.float32, device=q.device)
        dv = torch.zeros(B, T, HKV, D, dtype=torch.float32, device=q.device)
    q, k, v, do = (x.contiguous() for x in (q, k, v, do))
    window_bwd_kernel[(triton.cdiv(NT, BQ), HQ)](
        q, k, v, do, tables[0], tables[1], starts.contiguous(), dq, dk, dv,
        NT, float(mix), float(D) ** -0.5,
        HQ=HQ, HKV=HKV, D=D, W=int(window), BQ=BQ, LOW_PRECISION=q.dtype in (torch.bfloat16, torch.float16),
        ACCUMULATE=add_to is not None, num_warps=8,
    )
    return dq, dk, dv
