"""Backward of the sliding-window branch (softmax attention with RoPE over the last W <= 64 keys).

Sequences are laid out flat (B * T rows, or the packed rows of cu_seqlens); `starts[r]` is the
first row of row r's sequence, so a window never crosses a sequence boundary. Rows are cut into
blocks of 64: the keys of a query block lie in that block and the one before. As in
FlashAttention-2 the work is split in two kernels, so that every output row has one owner and
nothing is added atomically:

- window_dq_kernel, one program per (query block, query head). Pass 1 runs the softmax statistics
  online over the two key blocks: lse = logsumexp of the scores and delta = sum_j p_j dp_j
  (= do_w . o_win, with do_w = mix * do and dp = do_w v^T). Pass 2 recomputes p = exp(s - lse)
  and adds ds k_rot into dq, where ds = p * (dp - delta) * D^-1/2.
- window_dkv_kernel, one program per (block of BKV <= 64 keys, kv head): for each query head of
  the group and the two 64-row query tiles starting at its first key (they hold every query that
  can see these keys), it recomputes p from the saved lse and adds p^T do_w into dv and ds^T q_rot
  into dk.

RoPE (rotate-half convention) pairs column c with c + D/2, so every tile is held as its two
halves x1, x2: rot(x) = (x1 cos - x2 sin, x2 cos + x1 sin), scores are q1 k1^T + q2 k2^T, and the
backward is dx1 = dy1 cos + dy2 sin, dx2 = dy2 cos - dy1 sin (cos and sin repeat across halves).
Halved tiles, plain `range` loops (`tl.static_range` unrolled both blocks' tiles into registers)
and one flat loop in the dk/dv kernel keep both kernels spill-free on sm_90 at D 64 and 128
(benchmarks/kernel_registers.py); the single kernel before them held [128, D] fp32 tiles and
their swapped copies and spilled 3.7 KB per thread.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..gla import chunk_triton
from ..launch import fast
from .naive import apply_rope, sliding_window_attention
from .window_fwd_triton import dot_halves, halves, packed_starts, rotated_halves, window_scores

BQ = 64  # rows per block; a query's keys come from its block and the one before, so W <= 64
MIN_D = 32  # the halves feed tl.dot, whose inner size must be at least 16
# Key rows per dk/dv program for heads of 128 and more; 64 below (at 4 warps, sm_90, Triton 3.6:
# 64 rows spill 824 B a thread at D 128, 32 rows 256 B; at D 64, 64 rows none).
BKV_WIDE = 32
# Launch overrides for benchmarks/sweep_launch.py: dq_warps, dkv_warps, dq_stages, dkv_stages, block_kv.
LAUNCH: dict[str, int] = {}


def launch(kernel: str) -> dict[str, int]:
    """num_warps and num_stages of window_dq_kernel ("dq") or window_dkv_kernel ("dkv"). 4 warps, one
    stage: on an H200 (fourteenth session, sweep_launch.py) 4 warps took the dq kernel from 0.240 to
    0.102 ms at B16 T1024 H9 D64 and from 2.54 to 1.53 ms at B8 T4096 H32 D128, and the dk/dv kernel
    from 0.191 to 0.102 and from 4.07 to 2.63 ms (despite 256 B of spill at D 128), against 8 warps.
    At 8 warps an SM held one program (142-255 registers); at 4 it holds two or three. Two stages
    made the dq kernel slower (0.286 ms at D 64)."""
    return dict(num_warps=LAUNCH.get(f"{kernel}_warps", 4), num_stages=LAUNCH.get(f"{kernel}_stages", 1))


@triton.jit
def query_rows(q, do, starts, cos, sin, r, NT, HQ: tl.constexpr, i_h, D: tl.constexpr, mix, dot_t):
    """A tile of query rows r of head i_h: (r as int64, which rows exist, rotated q halves, do halves
    times mix, each row's sequence start)."""
    r64 = r.to(tl.int64)
    valid = r < NT
    q1, q2 = rotated_halves(q, valid[:, None], r64, HQ, i_h, cos, sin, r64, D, 1.0, dot_t)
    do1, do2 = halves(do, valid[:, None], r64, HQ, i_h, D, mix, dot_t)
    return r64, valid, q1, q2, do1, do2, tl.load(starts + r, mask=valid, other=0)


@triton.jit
def store_halves(out, g1, g2, row_ok, rows64, HEADS: tl.constexpr, i_h, D: tl.constexpr, add,
                 ACCUMULATE: tl.constexpr, ADD_GROUP: tl.constexpr):
    """Write halves into out [rows, HEADS, D] (in out's dtype), plus, with ACCUMULATE, the rows of
    `add` [rows, HEADS * ADD_GROUP, D] fp32 summed over head i_h's ADD_GROUP heads there."""
    H2: tl.constexpr = D // 2
    ch = tl.arange(0, H2)[None, :]
    if ACCUMULATE:
        for i_g in tl.static_range(ADD_GROUP):
            p_a = add + (rows64 * (HEADS * ADD_GROUP) + i_h * ADD_GROUP + i_g)[:, None] * D + ch
            g1 += tl.load(p_a, mask=row_ok, other=0.0)
            g2 += tl.load(p_a + H2, mask=row_ok, other=0.0)
    p_o = out + (rows64 * HEADS + i_h)[:, None] * D + ch
    tl.store(p_o, g1.to(out.dtype.element_ty), mask=row_ok)
    tl.store(p_o + H2, g2.to(out.dtype.element_ty), mask=row_ok)


@triton.jit
def unrotate_and_store(out, d1, d2, row_ok, rows64, HEADS: tl.constexpr, i_h, cos, sin, D: tl.constexpr, add,
                       ACCUMULATE: tl.constexpr, ADD_GROUP: tl.constexpr):
    """RoPE's backward on the halves of a gradient, then store_halves."""
    ch = tl.arange(0, D // 2)
    c = tl.load(cos + rows64[:, None] * D + ch[None, :], mask=row_ok, other=0.0)
    s = tl.load(sin + rows64[:, None] * D + ch[None, :], mask=row_ok, other=0.0)
    store_halves(out, d1 * c + d2 * s, d2 * c - d1 * s, row_ok, rows64, HEADS, i_h, D, add, ACCUMULATE, ADD_GROUP)


@triton.jit
def key_block_scores(q1, q2, do1, do2, k, v, cos, sin, r, start, i_c, NT, scale,
                     HKV: tl.constexpr, i_hk, D: tl.constexpr, W: tl.constexpr, BQ: tl.constexpr, dot_t):
    """Against key block i_c: the scores s and dp = do_w v^T [queries, keys], and the block's rotated keys."""
    c = i_c * BQ + tl.arange(0, BQ)
    c64 = c.to(tl.int64)
    key_ok = ((c >= 0) & (c < NT))[:, None]
    k1, k2 = rotated_halves(k, key_ok, c64, HKV, i_hk, cos, sin, c64, D, 1.0, dot_t)
    v1, v2 = halves(v, key_ok, c64, HKV, i_hk, D, 1.0, dot_t)
    return window_scores(q1, q2, k1, k2, r, start, c, NT, scale, W), dot_halves(do1, do2, v1, v2), k1, k2


@triton.jit
def window_dq_kernel(
    q, k, v, do, cos, sin, starts, dq, dq_add, lse, delta, dlse,
    NT, mix, scale,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BQ: tl.constexpr,
    LOW_PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    i_q, i_h = tl.program_id(0), tl.program_id(1)
    i_hk = i_h // (HQ // HKV)
    dot_t = q.dtype.element_ty if LOW_PRECISION else tl.float32
    r = i_q * BQ + tl.arange(0, BQ)
    r64, valid, q1, q2, do1, do2, start = query_rows(q, do, starts, cos, sin, r, NT, HQ, i_h, D, mix, dot_t)

    # pass 1: online softmax statistics over this key block, then the one before (a finite initial
    # max keeps rows with no visible key so far free of inf - inf)
    m_i = tl.full([BQ], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BQ], dtype=tl.float32)
    pdp = tl.zeros([BQ], dtype=tl.float32)
    for j in range(2):
        s, dp, _, _ = key_block_scores(q1, q2, do1, do2, k, v, cos, sin, r, start, i_q - j, NT, scale,
                                       HKV, i_hk, D, W, BQ, dot_t)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pdp = pdp * alpha + tl.sum(p * dp, axis=1)
        m_i = m_new
    l_safe = tl.where(valid, l_i, 1.0)
    b_lse = m_i + tl.log(l_safe)
    b_delta = pdp / l_safe
    if HAS_DLSE:  # a gradient on the lse itself: d lse / d s = p, so ds = p (dp - (delta - dlse))
        b_delta -= tl.load(dlse + r64 * HQ + i_h, mask=valid, other=0.0)
    tl.store(lse + r64 * HQ + i_h, b_lse, mask=valid)
    tl.store(delta + r64 * HQ + i_h, b_delta, mask=valid)

    # pass 2: dq_rot = ds k_rot, by halves
    dq1 = tl.zeros([BQ, D // 2], dtype=tl.float32)
    dq2 = tl.zeros([BQ, D // 2], dtype=tl.float32)
    for j in range(2):
        s, dp, k1, k2 = key_block_scores(q1, q2, do1, do2, k, v, cos, sin, r, start, i_q - j, NT, scale,
                                         HKV, i_hk, D, W, BQ, dot_t)
        ds = (tl.exp(s - b_lse[:, None]) * (dp - b_delta[:, None]) * scale).to(dot_t)
        dq1 += tl.dot(ds, k1, input_precision="ieee")
        dq2 += tl.dot(ds, k2, input_precision="ieee")
    unrotate_and_store(dq, dq1, dq2, valid[:, None], r64, HQ, i_h, cos, sin, D, dq_add, ACCUMULATE, 1)


@triton.jit
def window_dkv_kernel(
    q, k, v, do, cos, sin, starts, lse, delta, dk, dv, dk_add, dv_add,
    NT, mix, scale,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BQ: tl.constexpr,
    BKV: tl.constexpr, LOW_PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr, ADD_GROUP: tl.constexpr,
):
    i_k, i_hk = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = HQ // HKV
    H2: tl.constexpr = D // 2
    dot_t = q.dtype.element_ty if LOW_PRECISION else tl.float32
    c = i_k * BKV + tl.arange(0, BKV)
    c64 = c.to(tl.int64)
    key_ok = (c < NT)[:, None]
    k1, k2 = rotated_halves(k, key_ok, c64, HKV, i_hk, cos, sin, c64, D, 1.0, dot_t)
    v1, v2 = halves(v, key_ok, c64, HKV, i_hk, D, 1.0, dot_t)
    dk1 = tl.zeros([BKV, H2], dtype=tl.float32)
    dk2 = tl.zeros([BKV, H2], dtype=tl.float32)
    dv1 = tl.zeros([BKV, H2], dtype=tl.float32)
    dv2 = tl.zeros([BKV, H2], dtype=tl.float32)
    # the queries that see these keys lie in [first key, first key + BKV - 1 + W): two tiles of BQ rows
    for it in range(2 * G):  # (one loop, not two nested: the nested form spilled registers on sm_90)
        i_h = i_hk * G + it // 2
        r = i_k * BKV + (it % 2) * BQ + tl.arange(0, BQ)
        r64, valid, q1, q2, do1, do2, start = query_rows(q, do, starts, cos, sin, r, NT, HQ, i_h, D, mix, dot_t)
        b_lse = tl.load(lse + r64 * HQ + i_h, mask=valid, other=0.0)
        b_delta = tl.load(delta + r64 * HQ + i_h, mask=valid, other=0.0)
        p = tl.exp(window_scores(q1, q2, k1, k2, r, start, c, NT, scale, W) - b_lse[:, None])  # [queries, keys]
        p_t = tl.trans(p.to(dot_t))
        dv1 += tl.dot(p_t, do1, input_precision="ieee")
        dv2 += tl.dot(p_t, do2, input_precision="ieee")
        ds_t = tl.trans((p * (dot_halves(do1, do2, v1, v2) - b_delta[:, None]) * scale).to(dot_t))
        dk1 += tl.dot(ds_t, q1, input_precision="ieee")
        dk2 += tl.dot(ds_t, q2, input_precision="ieee")
    unrotate_and_store(dk, dk1, dk2, key_ok, c64, HKV, i_hk, cos, sin, D, dk_add, ACCUMULATE, ADD_GROUP)
    store_halves(dv, dv1, dv2, key_ok, c64, HKV, i_hk, D, dv_add, ACCUMULATE, ADD_GROUP)


def window_bwd_torch(q, k, v, do, cos, sin, *, window: int, mix: float, cu_seqlens=None, dlse=None):
    """window_bwd's fresh float32 gradients by PyTorch autograd through the banded reference
    (sliding_window_attention), for heads narrower than MIN_D and devices where the kernels' tiles
    do not fit (Triton raises OutOfResources)."""
    scale = q.shape[-1] ** -0.5
    with torch.enable_grad():
        leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
        q_rot, k_rot = apply_rope(leaves[0], cos.float(), sin.float()), apply_rope(leaves[1], cos.float(), sin.float())
        bounds = [0, q.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
        parts = [sliding_window_attention(q_rot[:, lo:hi], k_rot[:, lo:hi], leaves[2][:, lo:hi], window=window,
                                          scale=scale, return_lse=True)
                 for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo]
        o, lse = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
    outputs, grad_outputs = ([o], [do.float() * mix]) if dlse is None else ([o, lse], [do.float() * mix, dlse.float()])
    return torch.autograd.grad(outputs, leaves, grad_outputs)


@functools.lru_cache(maxsize=16)  # every layer asks the same each step: three small launches saved a call
def _row_starts(rows: int, length: int, device: torch.device) -> torch.Tensor:
    """int32 [rows]: the first row of each row's sequence in a flat [B * T] layout (read-only: cached)."""
    r = torch.arange(rows, device=device, dtype=torch.int32)
    return r - r % length


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
    out_dtype: torch.dtype = torch.float32,
    block_kv: int | None = None,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of mix * window_attention(rope(q), rope(k), v) for the output gradient do, in new
    tensors of out_dtype.

    q, do [B, T, Hq, D]; k, v [B, T, Hkv, D]; cos, sin [B or 1, T, D]; window <= 64. Returns dq, dk,
    dv. `add_to`: fp32 dq, dk, dv to add the gradients to; its dk, dv may hold a row per query head
    ([B, T, Hq, D]), summed over each kv group. The Liger backward hands over its sweeps' gradients
    so, which saves it the group sum and the casts as separate passes. dlse [B, T, Hq]: a gradient
    on the scores' log-sum-exp too (hedgehog's window shares it). Heads narrower than MIN_D take
    the PyTorch form, as does a kernel whose tiles do not fit the device's shared memory (Triton
    raises OutOfResources when it is built). block_kv: key rows per dk/dv program (<= 64).
    """
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    if window > BQ:
        raise ValueError(f"the Triton window backward handles windows up to {BQ}, got {window}")

    def from_torch_form(dq_done: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The PyTorch form's gradients, combined with add_to as the kernels combine them (dq_done:
        dq, which the dq kernel has written already)."""
        grads = window_bwd_torch(q, k, v, do, cos, sin, window=window, mix=mix, cu_seqlens=cu_seqlens, dlse=dlse)
        if add_to is not None:
            grads = [g + (a if a.shape[2] == g.shape[2] else a.view(*g.shape[:3], -1, D).sum(3))
                     for a, g in zip(add_to, grads, strict=True)]
        return dq_done if dq_done is not None else grads[0].to(out_dtype), *(g.to(out_dtype) for g in grads[1:])

    if D < MIN_D:
        return from_torch_form()
    if block_kv is None:
        block_kv = LAUNCH.get("block_kv", BKV_WIDE if D >= 128 else BQ)
    NT = B * T
    if cu_seqlens is None:
        starts = _row_starts(NT, T, q.device)
    else:
        starts = packed_starts(cu_seqlens.to(q.device), NT)
    tables = [x.to(torch.float32).expand(B, T, D).reshape(NT, D).contiguous() for x in (cos, sin)]
    dq, dk, dv = (torch.empty(B, T, h, D, dtype=out_dtype, device=q.device) for h in (HQ, HKV, HKV))
    chunk_triton.poison(dq, dk, dv)
    adds = add_to if add_to is not None else (dq, dk, dv)  # not read without add_to (ACCUMULATE off)
    lse = torch.empty(NT, HQ, dtype=torch.float32, device=q.device)
    delta = torch.empty_like(lse)
    q, k, v, do = (x.contiguous() for x in (q, k, v, do))
    common = dict(HQ=HQ, HKV=HKV, D=D, W=int(window), BQ=BQ, LOW_PRECISION=q.dtype in (torch.bfloat16, torch.float16),
                  ACCUMULATE=add_to is not None)
    n_blocks = triton.cdiv(NT, BQ)
    args = (q, k, v, do, tables[0], tables[1], starts.contiguous())
    dlse_rows = None if dlse is None else dlse.float().reshape(NT, HQ).contiguous()
    try:
        fast(window_dq_kernel)[(n_blocks, HQ)](
            *args, dq, adds[0], lse, delta, lse if dlse_rows is None else dlse_rows, NT, float(mix),
            float(D) ** -0.5, HAS_DLSE=dlse is not None, **common, **launch("dq"))
    except OutOfResources:  # nothing written yet
        return from_torch_form()
    try:
        fast(window_dkv_kernel)[(triton.cdiv(NT, block_kv), HKV)](
            *args, lse, delta, dk, dv, adds[1], adds[2], NT, float(mix), float(D) ** -0.5, BKV=block_kv,
            ADD_GROUP=adds[1].shape[2] // HKV, **common, **launch("dkv"))
    except OutOfResources:  # dq is written already: only dk, dv from the PyTorch form
        return from_torch_form(dq_done=dq)
    return dq, dk, dv
