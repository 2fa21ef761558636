"""Gated linear attention in Triton, with the Liger feature maps and sliding window fused in.

One program owns one (sequence, query head, block of BV value columns) and walks the
sequence in blocks of BT = 16 steps, carrying the state S [K, BV] in fp32 registers. Per
block it

1. loads raw q, k [BT, K] and v [BT, BV] once (bf16/fp16/fp32 I/O, fp32 maths); with PREFETCH (the
   default) the block before has issued these loads ahead of its own maths, so a block does not wait
   for its rows (docs/kernels.md, nineteenth session);
2. with FEATURE_MAP, builds phi(q) = softmax(q), phi(k) = softmax(k) and the log-gate
   logsigmoid(k) / gate_normalizer in registers (none of it is written to HBM); otherwise
   reads a given log-gate g (plain `chunk_gla`, q scaled by `scale`);
3. forms the cumulative log-gate b inside the block and, with m the value of b at the middle
   row, the decayed scores A[i, j] = sum_d q_id k_jd exp(b_id - b_jd) (j <= i) as one matrix
   product of q exp(b - m) and k exp(m - b). Each exponent spans at most BT/2 = 8 steps and
   is clamped at 60, so nothing overflows: exact while 8 consecutive log-gates of a channel
   sum to more than -60 (a mean log-gate above -7.5 per step; Liger's logsigmoid(k)/16 gets
   there only for raw keys below -120). fp16 runs this product in fp32 (exp(60) > fp16 max);
4. o = (phi(q) exp(b)) S + A v and S <- exp(b_last) S + (k exp(b_last - b))^T v, where all
   the other exponents are <= 0, as in kernels/gla/chunk.py;
5. with WINDOW > 0, softmax attention with RoPE (rotate-half, scale K^-1/2) of the block's
   queries over keys t - WINDOW + 1 .. t: the rotated keys and the values of the previous
   4 blocks stay in registers (so WINDOW <= 4 BT = 64), each key rotated once; then
   o = mix * o_win + (1 - mix) * o_gla, written once. gla_fwd runs this only where the window
   kernel of liger/window_fwd_triton.py cannot (heads of 16 or over 128, or FORWARD_LAUNCH
   split_window 0): elsewhere that kernel writes mix * o_win into o first and the sweep, at
   WINDOW = 0 with ADD_TO_OUT, adds (1 - mix) * o_gla to it (faster: the window's registers and
   instructions left the sequential sweep; docs/kernels.md, ninth session).

Packed sequences (cu_seqlens, FlashAttention-style offsets) are native: program (n, h)
reads rows cu_seqlens[n] .. cu_seqlens[n + 1] of the packed [1, sum T, H, D] tensors, and
the RoPE tables are indexed by packed position.

With `window_starts` (a segment of a longer sequence, see liger/segmented.py) the entries of
cu_seqlens are segments and window_starts[n] is the first row of segment n's sequence: before
its first block the program loads up to 4 blocks of the rows just before the segment into the
window's registers, so the window sees across the segment boundary. The state across that
boundary comes in through initial_state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import fast
from ..liger import window_fwd_triton as window_fwd

BT = 16  # block length (the state is carried from block to block)
MAX_WINDOW = 4 * BT  # window keys come from this block and the 4 before it
LOG2E = 1.4426950408889634
# Tests and benchmarks/kernel_check.py set this to fill outputs with NaN before each launch,
# so that an element the kernel fails to write shows up.
POISON_OUTPUTS = False


def poison(*outputs: torch.Tensor | None) -> None:
    """Fill the outputs (None skipped) with NaN where POISON_OUTPUTS is set: an unwritten element then fails."""
    if POISON_OUTPUTS:
        for x in outputs:
            if x is not None:
                x.fill_(float("nan"))


def dot_precision() -> str:
    """input_precision of the gdn and gsa chunk kernels' fp32 products. "tf32" (one TF32 pass: operands
    rounded to 10 mantissa bits) under CUDA autocast, where the caller already computes in 16 bits
    (training), or where torch.set_float32_matmul_precision allows TF32 ("high"/"medium");
    otherwise "tf32x3" (three TF32 passes, about fp32's accuracy), as PyTorch's default "highest"
    asks of its own matmuls. tf32x3's extra registers spill in the backward kernels at heads of
    128 (4x slower there: docs/kernels.md); plain fp32 FMA products ("ieee") spill kilobytes per
    thread on sm_90 (benchmarks/kernel_registers.py)."""
    if torch.is_autocast_enabled("cuda") or torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "tf32x3"


def state_tile(D: int, columns: int) -> tuple[int, int]:
    """(BD, BC) of the gsa and gdn chunk sweeps' [D, BC] fp32 state tile: the whole head dimension (at
    least 16: tl.dot's smallest side) and at most 4096 elements (64 columns at D 64, 32 at D 128), so
    the sweep's tiles stay in registers (benchmarks/kernel_registers.py)."""
    BD = max(16, triton.next_power_of_2(D))
    return BD, max(16, min(triton.next_power_of_2(columns), 4096 // BD))


def forward_tile(K: int, V: int) -> tuple[int, int]:
    """(block_v, num_warps) gla_fwd launches with by default: up to 128 value columns a program, 64
    at K 256 (hedgehog's 2D features: a [256, 128] fp32 state spills; 64 columns ran 0.589 against
    0.730 ms on an H200 at B4 T1024 H16, eleventh session, benchmarks/sweep_launch.py --layer
    hedgehog); 8 warps from a [128, 128] state up, else 4."""
    block_v = min(V, 128 if K <= 128 else 64)
    return block_v, 8 if K * block_v >= 128 * 128 else 4


# Launch settings for gla_fwd where its caller passes none, e.g. {"block_v": 32, "num_warps": 8}: lets a
# benchmark A/B them through a whole model (benchmarks/recover_throughput.py --gla-launch). Also split_window
# (0 keeps the window inside the sweep) and prefetch (0: each block loads its rows when it starts, rather than
# the block before loading them ahead of its own maths). Empty: the defaults.
FORWARD_LAUNCH: dict = {}


@triton.jit
def sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """(first row, end row) of sequence i_n: packed offsets, or i_n * T for a padded-free batch."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def logsigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))  # stable for either sign


@triton.jit
def softmax_rows(x):
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def rope_rows(x, x_swapped, c, s, sign):
    """RoPE (rotate-half convention) of rows x, given x with its two halves swapped and sign = -1
    on the first half, +1 on the second."""
    return x * c + sign[None, :] * x_swapped * s


@triton.jit
def liger_key_maps(b_k, gate_mult):
    """Liger's key side, in registers: (softmax(k) over the head dimension, logsigmoid(k) * gate_mult)."""
    return softmax_rows(b_k), logsigmoid(b_k) * gate_mult


@triton.jit
def block_gates(b_g, m_t, rows, MID: tl.constexpr):
    """A block's gates: the cumulative log-gate b (rows past the sequence end gate nothing), its
    last row, and the exponents b - m, m - b about the middle row m. Each spans at most BT/2 steps
    and is clamped at 60, so exp never overflows."""
    b_g = tl.where(m_t[:, None], b_g, 0.0)
    b_b = tl.cumsum(b_g, axis=0)
    b_m = tl.sum(tl.where(rows[:, None] == MID, b_b, 0.0), axis=0)
    return b_b, tl.sum(b_g, axis=0), tl.minimum(b_b - b_m[None, :], 60.0), tl.minimum(b_m[None, :] - b_b, 60.0)


@triton.jit
def load_rows(x, bos, t, m_t, i_h, cols, H: tl.constexpr, C: tl.constexpr, ENABLED: tl.constexpr):
    """Rows t of head i_h of x [.., H, C] at columns `cols`, as stored (zeros where not m_t); a zero
    placeholder if not ENABLED. The sweeps' loads, which PREFETCH issues a block ahead."""
    if ENABLED:
        rows = tl.load(x + ((bos + t) * H + i_h)[:, None] * C + cols[None, :], mask=m_t[:, None], other=0.0)
    else:
        rows = tl.zeros([t.shape[0], cols.shape[0]], dtype=x.dtype.element_ty)
    return rows


@triton.jit
def fwd_block_loads(q, k, v, o, bos, t, m_t, i_h, i_hk, ck, cv, HQ: tl.constexpr, HKV: tl.constexpr,
                    K: tl.constexpr, V: tl.constexpr, ADD_TO_OUT: tl.constexpr):
    """Rows t of raw q, k [BT, K], v [BT, BV] and, with ADD_TO_OUT, of o (zeros where not m_t), as stored."""
    return (load_rows(q, bos, t, m_t, i_h, ck, HQ, K, True), load_rows(k, bos, t, m_t, i_hk, ck, HKV, K, True),
            load_rows(v, bos, t, m_t, i_hk, cv, HKV, V, True), load_rows(o, bos, t, m_t, i_h, cv, HQ, V, ADD_TO_OUT))


@triton.jit
def gla_fwd_kernel(
    q, k, v, g, cos, sin, h0, ht, o, cu_seqlens, window_starts,
    T, scale, gate_mult, mix, win_scale, s_cos_b,
    HQ: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr, WINDOW: tl.constexpr,
    FEATURE_MAP: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
    IS_VARLEN: tl.constexpr, LOW_PRECISION: tl.constexpr, DIAG_F32: tl.constexpr,
    PRELOAD: tl.constexpr, ADD_TO_OUT: tl.constexpr, PREFETCH: tl.constexpr,
):
    i_v, i_h, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // (HQ // HKV)
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    i_b = 0 if IS_VARLEN else i_n
    L = (eos - bos).to(tl.int32)
    dot_t = q.dtype.element_ty if LOW_PRECISION else tl.float32
    # the diagonal block's factors reach exp(60): beyond fp16's range, so fp16 runs it in fp32
    diag_t = tl.float32 if DIAG_F32 else dot_t

    rows = tl.arange(0, BT)
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    ck_swap = (ck + K // 2) % K
    sign = tl.where(ck < K // 2, -1.0, 1.0)
    causal = rows[None, :] <= rows[:, None]
    MID: tl.constexpr = BT // 2 - 1
    NWB: tl.constexpr = (WINDOW + BT - 1) // BT

    p_state = (i_n * HQ + i_h).to(tl.int64) * K * V + ck[:, None] * V + cv[None, :]
    if USE_H0:
        S = tl.load(h0 + p_state).to(tl.float32)
    else:
        S = tl.zeros([K, BV], dtype=tl.float32)
    # rotated keys / values of the previous 4 blocks (oldest first), for the window
    kw0 = tl.zeros([BT, K], dtype=dot_t)
    kw1 = tl.zeros([BT, K], dtype=dot_t)
    kw2 = tl.zeros([BT, K], dtype=dot_t)
    kw3 = tl.zeros([BT, K], dtype=dot_t)
    vw0 = tl.zeros([BT, BV], dtype=dot_t)
    vw1 = tl.zeros([BT, BV], dtype=dot_t)
    vw2 = tl.zeros([BT, BV], dtype=dot_t)
    vw3 = tl.zeros([BT, BV], dtype=dot_t)
    # blocks already in the window's registers before the first one (> 0 only for a segment that
    # continues its sequence): the window masks below count them as earlier blocks
    n_pre = 0
    if PRELOAD and WINDOW > 0:
        n_pre = tl.minimum((bos - tl.load(window_starts + i_n).to(tl.int64)) // BT, NWB).to(tl.int32)
        for j in range(0, n_pre):  # oldest first, as the main loop pushes them
            t_pre = bos + (j - n_pre) * BT + rows
            p_k = k + (t_pre * HKV + i_hk)[:, None] * K
            b_k = tl.load(p_k + ck[None, :]).to(tl.float32)
            k_sw = tl.load(p_k + ck_swap[None, :]).to(tl.float32)
            c_t = tl.load(cos + t_pre[:, None] * K + ck[None, :]).to(tl.float32)
            s_t = tl.load(sin + t_pre[:, None] * K + ck[None, :]).to(tl.float32)
            b_v = tl.load(v + (t_pre * HKV + i_hk)[:, None] * V + cv[None, :]).to(dot_t)
            kw0, kw1, kw2, kw3 = kw1, kw2, kw3, rope_rows(b_k, k_sw, c_t, s_t, sign).to(dot_t)
            vw0, vw1, vw2, vw3 = vw1, vw2, vw3, b_v

    if PREFETCH:  # the first block's rows; each block then loads the next one's before its own maths
        next_q, next_k, next_v, next_o = fwd_block_loads(q, k, v, o, bos, rows, rows < L, i_h, i_hk, ck, cv, HQ, HKV,
                                                         K, V, ADD_TO_OUT)
    for i_c in range(0, tl.cdiv(L, BT)):
        t = i_c * BT + rows
        m_t = t < L
        if PREFETCH:
            b_q, b_k, b_v, o_prior = next_q, next_k, next_v, next_o
            next_q, next_k, next_v, next_o = fwd_block_loads(q, k, v, o, bos, t + BT, t + BT < L, i_h, i_hk, ck, cv,
                                                             HQ, HKV, K, V, ADD_TO_OUT)
        else:
            b_q, b_k, b_v, o_prior = fwd_block_loads(q, k, v, o, bos, t, m_t, i_h, i_hk, ck, cv, HQ, HKV, K, V,
                                                     ADD_TO_OUT)
        b_q = b_q.to(tl.float32)
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(dot_t)
        if FEATURE_MAP:
            b_g = logsigmoid(b_k) * gate_mult
            x_q = b_q - tl.max(b_q, axis=1)[:, None]
            x_k = b_k - tl.max(b_k, axis=1)[:, None]
            n_q = 1.0 / tl.sum(tl.exp(x_q), axis=1)
            n_k = 1.0 / tl.sum(tl.exp(x_k), axis=1)
        else:
            b_g = tl.load(g + ((bos + t) * HQ + i_h)[:, None] * K + ck[None, :], mask=m_t[:, None], other=0.0)
            b_g = b_g.to(tl.float32)
        b_b, b_last, d_q, d_k = block_gates(b_g, m_t, rows, MID)
        d_o = b_last[None, :] - b_b
        if FEATURE_MAP:
            q_in = tl.exp(x_q + b_b) * n_q[:, None]
            q_mid = tl.exp(x_q + d_q) * n_q[:, None]
            k_mid = tl.exp(x_k + d_k) * n_k[:, None]
            k_out = tl.exp(x_k + d_o) * n_k[:, None]
        else:
            q_in = b_q * scale * tl.exp(b_b)
            q_mid = b_q * scale * tl.exp(d_q)
            k_mid = b_k * tl.exp(d_k)
            k_out = b_k * tl.exp(d_o)
        k_mid = tl.where(m_t[:, None], k_mid, 0.0)
        k_out = tl.where(m_t[:, None], k_out, 0.0)

        b_o = tl.dot(q_in.to(dot_t), S.to(dot_t), input_precision="ieee")
        b_A = tl.dot(q_mid.to(diag_t), tl.trans(k_mid.to(diag_t)), input_precision="ieee")
        b_A = tl.where(causal, b_A, 0.0)
        b_o += tl.dot(b_A.to(dot_t), b_v, input_precision="ieee")
        S = S * tl.exp(b_last)[:, None] + tl.dot(tl.trans(k_out.to(dot_t)), b_v, input_precision="ieee")

        if WINDOW > 0:
            # rotary rows: packed position for varlen input, else position in the sequence
            pos = (bos + t) if IS_VARLEN else t
            c_t = tl.load(cos + i_b * s_cos_b + pos[:, None] * K + ck[None, :], mask=m_t[:, None], other=0.0)
            s_t = tl.load(sin + i_b * s_cos_b + pos[:, None] * K + ck[None, :], mask=m_t[:, None], other=0.0)
            c_t = c_t.to(tl.float32)
            s_t = s_t.to(tl.float32)
            q_sw = load_rows(q, bos, t, m_t, i_h, ck_swap, HQ, K, True).to(tl.float32)
            k_sw = load_rows(k, bos, t, m_t, i_hk, ck_swap, HKV, K, True).to(tl.float32)
            q_rot = (rope_rows(b_q, q_sw, c_t, s_t, sign) * (win_scale * 1.4426950408889634)).to(dot_t)
            k_rot = rope_rows(b_k, k_sw, c_t, s_t, sign).to(dot_t)
            # scores of this block against the 4 before it and itself; key position t - d
            s_c = tl.dot(q_rot, tl.trans(k_rot), input_precision="ieee")
            s_c = tl.where(causal & (rows[:, None] - rows[None, :] < WINDOW), s_c, -float("inf"))
            m_i = tl.max(s_c, axis=1)
            # earlier blocks: block 3 is the one just before, block 0 four back (only the
            # NWB = ceil(WINDOW / BT) most recent ones can hold keys inside the window)
            dist = rows[:, None] - rows[None, :]  # query row - key row (+ BT per block back)
            if NWB >= 4:
                s0 = tl.dot(q_rot, tl.trans(kw0), input_precision="ieee")
                s0 = tl.where((dist + 4 * BT < WINDOW) & (i_c + n_pre >= 4), s0, -float("inf"))
                m_i = tl.maximum(m_i, tl.max(s0, axis=1))
            if NWB >= 3:
                s1 = tl.dot(q_rot, tl.trans(kw1), input_precision="ieee")
                s1 = tl.where((dist + 3 * BT < WINDOW) & (i_c + n_pre >= 3), s1, -float("inf"))
                m_i = tl.maximum(m_i, tl.max(s1, axis=1))
            if NWB >= 2:
                s2 = tl.dot(q_rot, tl.trans(kw2), input_precision="ieee")
                s2 = tl.where((dist + 2 * BT < WINDOW) & (i_c + n_pre >= 2), s2, -float("inf"))
                m_i = tl.maximum(m_i, tl.max(s2, axis=1))
            if NWB >= 1:
                s3 = tl.dot(q_rot, tl.trans(kw3), input_precision="ieee")
                s3 = tl.where((dist + BT < WINDOW) & (i_c + n_pre >= 1), s3, -float("inf"))
                m_i = tl.maximum(m_i, tl.max(s3, axis=1))
            m_i = tl.where(m_t, m_i, 0.0)
            p_c = tl.exp2(s_c - m_i[:, None])
            l_i = tl.sum(p_c, axis=1)
            acc = tl.dot(p_c.to(dot_t), b_v, input_precision="ieee")
            if NWB >= 4:
                p0 = tl.exp2(s0 - m_i[:, None])
                l_i += tl.sum(p0, axis=1)
                acc += tl.dot(p0.to(dot_t), vw0, input_precision="ieee")
            if NWB >= 3:
                p1 = tl.exp2(s1 - m_i[:, None])
                l_i += tl.sum(p1, axis=1)
                acc += tl.dot(p1.to(dot_t), vw1, input_precision="ieee")
            if NWB >= 2:
                p2 = tl.exp2(s2 - m_i[:, None])
                l_i += tl.sum(p2, axis=1)
                acc += tl.dot(p2.to(dot_t), vw2, input_precision="ieee")
            if NWB >= 1:
                p3 = tl.exp2(s3 - m_i[:, None])
                l_i += tl.sum(p3, axis=1)
                acc += tl.dot(p3.to(dot_t), vw3, input_precision="ieee")
            o_win = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            b_o = mix * o_win + (1.0 - mix) * b_o
            kw0, kw1, kw2, kw3 = kw1, kw2, kw3, k_rot
            vw0, vw1, vw2, vw3 = vw1, vw2, vw3, b_v

        p_o = o + ((bos + t) * HQ + i_h)[:, None] * V + cv[None, :]
        if ADD_TO_OUT:  # the window's share, mix * o_win, is in o already (liger/window_fwd_triton.py)
            b_o = (1.0 - mix) * b_o + o_prior.to(tl.float32)
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_t[:, None])

    if STORE_HT:
        tl.store(ht + p_state, S)


def window_split_here(K: int, V: int) -> bool:
    """Whether gla_fwd runs Liger's window as liger/window_fwd_triton.py's kernel (then the sweep
    without it) rather than inside the sweep."""
    return bool(window_fwd.supported(K, V) and FORWARD_LAUNCH.get("split_window", 1))


def _next_pow2(x: int) -> int:
    return 1 << (max(int(x), 1) - 1).bit_length()


def supported(head_dim: int, value_dim: int | None = None) -> bool:
    """Shapes the kernel handles: power-of-two head sizes from 16 to 256."""
    dims = (head_dim, head_dim if value_dim is None else value_dim)
    return all(16 <= d <= 256 and d == _next_pow2(d) for d in dims)


def gla_fwd(
    q, k, v, g=None, *, scale=1.0, gate_mult=1.0, feature_map=False, window=0, mix=0.0,
    cos=None, sin=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    block_v: int | None = None, num_warps: int | None = None, num_stages: int = 1, block_t: int | None = None,
    window_starts=None, out=None,
):
    """Launch gla_fwd_kernel. q [B, T, Hq, K]; k [B, T, Hkv, K]; v [B, T, Hkv, V] (Hkv = Hq
    for plain chunk_gla); g [B, T, Hq, K] unless feature_map. Returns (o, final state).
    window_starts [N] int32, with cu_seqlens: the first row of each segment's sequence (segments
    start on a block boundary of their sequence; see the module docstring). out [B, T, Hq, V] (window 0,
    feature_map): holds mix times the window branch already, written by the caller with
    liger/window_fwd_triton.py; the sweep adds (1 - mix) times its own into it."""
    import torch  # noqa: PLC0415

    B, T, HQ, K = q.shape
    HKV, V = k.shape[2], v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if g is not None:
        g = g.contiguous()
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    if out is not None and (window > 0 or not feature_map):
        raise ValueError("gla_fwd adds into `out` only for the feature-map sweep with its window run already")
    o = out if out is not None else torch.empty(B, T, HQ, V, dtype=q.dtype, device=q.device)
    ht = torch.empty(N, HQ, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    poison(None if out is not None else o, ht)
    h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
    s_cos_b = 0
    if window > 0:
        cos, sin = cos.contiguous(), sin.contiguous()
        s_cos_b = 0 if cos.shape[0] == 1 else T * K
    if block_t is None:
        block_t = BT
    if window > 4 * block_t:
        raise ValueError(f"the Triton kernel handles windows up to {4 * block_t}, got {window}")
    if block_v is None:
        block_v = FORWARD_LAUNCH.get("block_v") or forward_tile(K, V)[0]
    if num_warps is None:
        num_warps = FORWARD_LAUNCH.get("num_warps") or forward_tile(K, block_v)[1]
    # Liger's window as a kernel of its own, parallel over blocks, then the sweep without it (see
    # liger/window_fwd_triton.py); FORWARD_LAUNCH {"split_window": 0} keeps it inside the sweep.
    split = window > 0 and feature_map and window_split_here(K, V)
    if split:
        window_fwd.window_fwd_into(o, q, k, v, cos, sin, window=window, mix=mix, cu_seqlens=cu_seqlens,
                                   window_starts=window_starts)
        window, window_starts = 0, None
    grid = (triton.cdiv(V, block_v), HQ, N)
    low = q.dtype in (torch.bfloat16, torch.float16)
    fast(gla_fwd_kernel)[grid](
        q, k, v, g if g is not None else q, cos if cos is not None else q, sin if sin is not None else q,
        h0 if h0 is not None else o, ht if ht is not None else o, o,
        cu_seqlens if cu_seqlens is not None else o, window_starts if window_starts is not None else o,
        T, float(scale), float(gate_mult), float(mix), float(K) ** -0.5, s_cos_b,
        HQ=HQ, HKV=HKV, K=K, V=V, BT=block_t, BV=block_v, WINDOW=int(window),
        FEATURE_MAP=feature_map, USE_H0=h0 is not None, STORE_HT=output_final_state,
        IS_VARLEN=cu_seqlens is not None, LOW_PRECISION=low, DIAG_F32=q.dtype == torch.float16,
        PRELOAD=window_starts is not None, ADD_TO_OUT=bool(split) or out is not None,
        PREFETCH=bool(FORWARD_LAUNCH.get("prefetch", 1)), num_warps=num_warps,
        num_stages=num_stages,
    )
    return o, ht
