"""Backward of gated linear attention in Triton: two sequential sweeps over blocks of BT steps.

Notation as in chunk_triton.py: per block, b is the inclusive cumulative log-gate, b_L its last
row and m its middle row; S_0 and S_1 are the state before and after the block, dS_1 the
gradient reaching S_1 from later blocks (dht for the last). Every exponent is either <= 0 or a
half-block span clamped at 60, exactly as in the forward kernel.

- dq sweep, forward in time. It carries S [BK, V] like the forward kernel (one program per block
  of BK key channels, all value columns):
      dq_i = scale * (exp(b_i) * (do_i S_0^T) + exp(b_i - m) * (D (k exp(m - b)))_i),
      D_ij = do_i . v_j for j <= i.
- dk/dv sweep, backward in time. It carries dS [K, BV] (one program per block of BV value
  columns, all key channels):
      dv_j = (A^T do)_j + (k_j exp(b_L - b_j)) dS_1,   A_ij = scale q_i . (k_j exp(b_i - b_j)), j <= i
      dk_j = scale exp(m - b_j) * (D^T (q exp(b - m)))_j + exp(b_L - b_j) * (v_j dS_1^T)
      dS_0 = exp(b_L) * dS_1 + scale (q exp(b))^T do.
  dk is a partial sum over the program's value columns; the blocks are added afterwards.
- the gate, in PyTorch: with B the cumulative log-gate over a whole sequence, q and k enter only
  as q exp(B) and k exp(-B), and the final state carries a factor exp(B_T), so
      dB_t = q_t dq_t - k_t dk_t  (+ sum_v S_T dS_T at the last step),
  and dg is the reverse cumulative sum of dB within each sequence.

GQA: k, v and g have HKV heads, q and do HQ; the kernels write dq, dk, dv per query head and
the wrapper sums dk, dv and dg over each kv head's group.

With PREFETCH each sweep issues the next block's loads before the current block's maths
(default_prefetch says where that is faster).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..cumsum import blocked_cumsum
from ..launch import fast
from . import chunk_triton
from .chunk_triton import block_gates, liger_key_maps, load_rows, sequence_bounds, softmax_rows


@triton.jit
def bwd_block_loads(q, k, g, v, do, bos, t, m_t, i_h, i_hk, ck, cv, HQ: tl.constexpr, HKV: tl.constexpr,
                    K: tl.constexpr, V: tl.constexpr, LOAD_Q: tl.constexpr, LOAD_G: tl.constexpr):
    """Rows t of a sweep's inputs as stored (zeros where not m_t): q (with LOAD_Q) and k at columns ck, g (with
    LOAD_G: gates given, no feature map), v and do at columns cv."""
    b_q = load_rows(q, bos, t, m_t, i_h, ck, HQ, K, LOAD_Q)
    b_k = load_rows(k, bos, t, m_t, i_hk, ck, HKV, K, True)
    b_g = load_rows(g, bos, t, m_t, i_hk, ck, HKV, K, LOAD_G)
    b_v = load_rows(v, bos, t, m_t, i_hk, cv, HKV, V, True)
    b_do = load_rows(do, bos, t, m_t, i_h, cv, HQ, V, True)
    return b_q, b_k, b_g, b_v, b_do


@triton.jit
def gla_bwd_dq_kernel(
    q, k, v, g, do, h0, dq, qdq, cu_seqlens,
    T, scale, gate_mult,
    HQ: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, FEATURE_MAP: tl.constexpr,
    USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr, LOW_PRECISION: tl.constexpr, DIAG_F32: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    i_k, i_h, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // (HQ // HKV)
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    L = (eos - bos).to(tl.int32)
    dot_t = do.dtype.element_ty if LOW_PRECISION else tl.float32
    diag_t = tl.float32 if DIAG_F32 else dot_t

    rows = tl.arange(0, BT)
    ck = i_k * BK + tl.arange(0, BK)
    cv = tl.arange(0, V)
    causal = rows[None, :] <= rows[:, None]
    MID: tl.constexpr = BT // 2 - 1

    if USE_H0:
        p_h0 = h0 + (i_n * HQ + i_h).to(tl.int64) * K * V + ck[:, None] * V + cv[None, :]
        S = tl.load(p_h0).to(tl.float32)
    else:
        S = tl.zeros([BK, V], dtype=tl.float32)

    if PREFETCH:  # the first block's rows; each block then loads the next one's before its own maths
        next_q, next_k, next_g, next_v, next_do = bwd_block_loads(q, k, g, v, do, bos, rows, rows < L, i_h, i_hk, ck,
                                                                  cv, HQ, HKV, K, V, FEATURE_MAP, not FEATURE_MAP)
    for i_c in range(0, tl.cdiv(L, BT)):
        t = i_c * BT + rows
        m_t = t < L
        q_row = ((bos + t) * HQ + i_h)[:, None]
        if PREFETCH:
            raw_q, b_k, b_g, b_v, b_do = next_q, next_k, next_g, next_v, next_do
            next_q, next_k, next_g, next_v, next_do = bwd_block_loads(q, k, g, v, do, bos, t + BT, t + BT < L, i_h,
                                                                      i_hk, ck, cv, HQ, HKV, K, V, FEATURE_MAP,
                                                                      not FEATURE_MAP)
        else:
            raw_q, b_k, b_g, b_v, b_do = bwd_block_loads(q, k, g, v, do, bos, t, m_t, i_h, i_hk, ck, cv, HQ, HKV, K,
                                                         V, FEATURE_MAP, not FEATURE_MAP)
        b_k = b_k.to(tl.float32)
        if FEATURE_MAP:  # Liger: phi(k) = softmax(k), log-gate logsigmoid(k) * gate_mult (BK = K)
            b_k, b_g = liger_key_maps(b_k, gate_mult)
        else:
            b_g = b_g.to(tl.float32)
        b_v = b_v.to(dot_t)
        b_do = b_do.to(dot_t)
        b_b, b_last, d_q, d_k = block_gates(b_g, m_t, rows, MID)
        k_mid = tl.where(m_t[:, None], b_k * tl.exp(d_k), 0.0)
        k_out = tl.where(m_t[:, None], b_k * tl.exp(b_last[None, :] - b_b), 0.0)

        b_D = tl.dot(b_do, tl.trans(b_v), input_precision="ieee")
        b_D = tl.where(causal, b_D, 0.0)
        b_dq = tl.exp(b_b) * tl.dot(b_do, tl.trans(S.to(dot_t)), input_precision="ieee")
        b_dq += tl.exp(d_q) * tl.dot(b_D.to(diag_t), k_mid.to(diag_t), input_precision="ieee")
        b_dq = b_dq * scale
        if FEATURE_MAP:  # through phi(q) = softmax(q); phi(q) * dphi(q) also feeds the gate's gradient
            phi_q = softmax_rows(raw_q.to(tl.float32))
            b_qd = phi_q * b_dq
            tl.store(qdq + q_row * K + ck[None, :], b_qd, mask=m_t[:, None])
            b_dq = b_qd - phi_q * tl.sum(b_qd, axis=1)[:, None]
        tl.store(dq + q_row * K + ck[None, :], b_dq, mask=m_t[:, None])
        S = S * tl.exp(b_last)[:, None] + tl.dot(tl.trans(k_out.to(dot_t)), b_v, input_precision="ieee")


@triton.jit
def gla_bwd_dkv_kernel(
    q, k, v, g, do, ht, dht, dh0, qdq, dk, dv, cu_seqlens,
    T, TOTAL, scale, gate_mult,
    HQ: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr, FEATURE_MAP: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
    LOW_PRECISION: tl.constexpr, DIAG_F32: tl.constexpr, PREFETCH: tl.constexpr,
):
    i_v, i_h, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // (HQ // HKV)
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    L = (eos - bos).to(tl.int32)
    dot_t = do.dtype.element_ty if LOW_PRECISION else tl.float32
    diag_t = tl.float32 if DIAG_F32 else dot_t

    rows = tl.arange(0, BT)
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    causal = rows[None, :] <= rows[:, None]
    MID: tl.constexpr = BT // 2 - 1

    p_state = (i_n * HQ + i_h).to(tl.int64) * K * V + ck[:, None] * V + cv[None, :]
    # FEATURE_MAP: running sum of the gate's gradient over later steps, started with the final
    # state's share sum_v S_T dS_T (the program holds all V columns: BV = V)
    carry = tl.zeros([K], dtype=tl.float32)
    if USE_DHT:
        dS = tl.load(dht + p_state).to(tl.float32)
        if FEATURE_MAP:
            carry = tl.sum(tl.load(ht + p_state) * dS, axis=1)
    else:
        dS = tl.zeros([K, BV], dtype=tl.float32)
    dk_part = dk + i_v.to(tl.int64) * TOTAL * HQ * K  # this value block's partial dk

    n_blocks = tl.cdiv(L, BT)
    if PREFETCH:  # the last block's rows; each block then loads the one before it ahead of its own maths
        t_last = (n_blocks - 1) * BT + rows
        m_last = (t_last >= 0) & (t_last < L)  # an empty sequence has no last block
        next_q, next_k, next_g, next_v, next_do = bwd_block_loads(q, k, g, v, do, bos, t_last, m_last, i_h, i_hk, ck,
                                                                  cv, HQ, HKV, K, V, True, not FEATURE_MAP)
        next_qdq = load_rows(qdq, bos, t_last, m_last, i_h, ck, HQ, K, FEATURE_MAP)
    for i_r in range(0, n_blocks):
        i_c = n_blocks - 1 - i_r
        t = i_c * BT + rows
        m_t = t < L
        q_row = ((bos + t) * HQ + i_h)[:, None]
        if PREFETCH:
            b_q, b_k, b_g, b_v, b_do, b_qdq = next_q, next_k, next_g, next_v, next_do, next_qdq
            m_n = t >= BT  # rows of the block before (none before the first)
            next_q, next_k, next_g, next_v, next_do = bwd_block_loads(q, k, g, v, do, bos, t - BT, m_n, i_h, i_hk, ck,
                                                                      cv, HQ, HKV, K, V, True, not FEATURE_MAP)
            next_qdq = load_rows(qdq, bos, t - BT, m_n, i_h, ck, HQ, K, FEATURE_MAP)
        else:
            b_q, b_k, b_g, b_v, b_do = bwd_block_loads(q, k, g, v, do, bos, t, m_t, i_h, i_hk, ck, cv, HQ, HKV, K, V,
                                                       True, not FEATURE_MAP)
            b_qdq = load_rows(qdq, bos, t, m_t, i_h, ck, HQ, K, FEATURE_MAP)
        b_q = b_q.to(tl.float32)
        b_k = b_k.to(tl.float32)
        if FEATURE_MAP:
            raw_k = b_k
            b_k, b_g = liger_key_maps(b_k, gate_mult)
            b_q = tl.where(m_t[:, None], softmax_rows(b_q), 0.0)
        else:
            b_g = b_g.to(tl.float32)
        b_v = b_v.to(dot_t)
        b_do = b_do.to(dot_t)
        b_b, b_last, d_q, d_k = block_gates(b_g, m_t, rows, MID)
        e_k = tl.exp(d_k)
        e_o = tl.exp(b_last[None, :] - b_b)
        q_mid = b_q * (scale * tl.exp(d_q))
        k_mid = tl.where(m_t[:, None], b_k * e_k, 0.0)
        k_out = tl.where(m_t[:, None], b_k * e_o, 0.0)

        b_A = tl.dot(q_mid.to(diag_t), tl.trans(k_mid.to(diag_t)), input_precision="ieee")
        b_A = tl.where(causal, b_A, 0.0)  # [query i, key j]
        b_dv = tl.dot(tl.trans(b_A).to(dot_t), b_do, input_precision="ieee")
        b_dv += tl.dot(k_out.to(dot_t), dS.to(dot_t), input_precision="ieee")
        b_D = tl.dot(b_do, tl.trans(b_v), input_precision="ieee")
        b_D = tl.where(causal, b_D, 0.0)  # [query i, key j]
        b_dk = e_k * tl.dot(tl.trans(b_D).to(diag_t), q_mid.to(diag_t), input_precision="ieee")
        b_dk += e_o * tl.dot(b_v, tl.trans(dS.to(dot_t)), input_precision="ieee")
        if FEATURE_MAP:
            # the gate: dB = phi(q) dphi(q) - phi(k) dphi(k), summed over this and later steps;
            # then back through softmax and logsigmoid (d/dk logsigmoid(k) = sigmoid(-k)).
            b_kd = b_k * b_dk
            b_dB = b_qdq - b_kd
            b_dB = tl.where(m_t[:, None], b_dB, 0.0)
            total = tl.sum(b_dB, axis=0)
            b_dg = carry[None, :] + total[None, :] - tl.cumsum(b_dB, axis=0) + b_dB
            carry += total
            b_dk = b_kd - b_k * tl.sum(b_kd, axis=1)[:, None]
            b_dk += b_dg * gate_mult / (1.0 + tl.exp(raw_k))
        tl.store(dv + q_row * V + cv[None, :], b_dv, mask=m_t[:, None])
        tl.store(dk_part + q_row * K + ck[None, :], b_dk, mask=m_t[:, None])
        q_in = b_q * (scale * tl.exp(b_b))
        dS = dS * tl.exp(b_last)[:, None] + tl.dot(tl.trans(q_in.to(dot_t)), b_do, input_precision="ieee")

    if STORE_DH0:
        tl.store(dh0 + p_state, dS)


def _reverse_cumsum(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Sum over steps t' >= t of the same sequence, along dim 1 of [B, T, ...]."""
    total = blocked_cumsum(x, 1, reverse=True)
    if cu_seqlens is None:
        return total
    # packed: subtract what the later sequences contribute (the suffix sum at this sequence's end)
    ends = cu_seqlens.long()[1:]
    lengths = ends - cu_seqlens.long()[:-1]
    after = torch.cat([total[:, 1:], torch.zeros_like(total[:, :1])], 1)  # after[t] = suffix sum from t + 1
    end_of_step = torch.repeat_interleave(ends, lengths)  # [T] each step's sequence end (exclusive)
    return total - after[:, end_of_step - 1]


# Launch settings for the two sweeps where the caller passes none: lets a benchmark A/B them through
# a whole model (benchmarks/recover_throughput.py --bwd-launch, benchmarks/sweep_launch.py), as
# chunk_triton.FORWARD_LAUNCH does the forward's. Keys: num_warps (both sweeps), dq_warps, dkv_warps,
# dq_maxnreg, dkv_maxnreg (a register cap per thread: two programs share an SM below 128 at 8 warps),
# block_k, block_v (the plain sweeps' tiles, without feature maps), dq_prefetch, dkv_prefetch (0: each block
# loads its own rows when it starts, rather than the block before loading them ahead of its maths).
# Empty: default_warps(), no cap, 64, default_prefetch().
BACKWARD_LAUNCH: dict = {}


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def default_warps(sweep: str, feature_map: bool, K: int, programs: int, device: torch.device) -> int:
    """Warps per program of one backward sweep (H200; benchmarks/sweep_launch.py).

    Feature-map sweeps (Liger): 8, except at heads of 64 or less (ninth session, SmolLM2's shape,
    B16 T1024: 144 programs). There the dq sweep runs 0.364 -> 0.300 ms at 4 warps. The dk/dv sweep
    holds 182 registers a thread, so at 8 warps an SM takes one program and 144 programs on 132 SMs
    run in two rounds (1.052 ms); at 4 warps two fit an SM and it runs in one (0.629 ms). With fewer
    programs than SMs 8 warps stay faster (B4 T4096 in 3 segments, 108 programs: 0.744 against
    0.783 ms). 4 warps spill at D 128.

    Plain sweeps (mamba2, hgrn2, gsa, hedgehog; eleventh session, `--layer gla` and `--layer
    hedgehog`): the dq sweep's [64, V] state tile fits 4 warps (hedgehog, 2D features: 0.474 ->
    0.292 ms at B4 T1024 H16 D128, 0.565 -> 0.296 at SmolLM2's shape; gla at D 128 0.242 -> 0.249).
    The dk/dv sweep's [K, 64] tile fits 4 warps up to K 128 (gla 0.416 -> 0.356, 0.499 -> 0.282,
    hedgehog at K 128 0.798 -> 0.455 ms); at K 256 it spills (0.770 -> 0.931 ms) and keeps 8."""
    if not feature_map:
        return 4 if sweep == "dq" or K <= 128 else 8
    if K > 64:
        return 8
    if sweep == "dq":
        return 4
    return 4 if programs > _sm_count(device) else 8


def default_prefetch(sweep: str, feature_map: bool, K: int, programs: int, device: torch.device) -> bool:
    """Whether a sweep ("dq" or "dkv") loads the next block's rows before the current block's maths (its
    PREFETCH), unless BACKWARD_LAUNCH sets dq_prefetch / dkv_prefetch.

    One H200, nineteenth session (`sweep_launch.py`, ms of GPU a layer's forward+backward, prefetch on / off).
    Liger (feature maps): B16 T1024 H9/3 D64 dq 0.255 / 0.279, dk/dv 0.350 / 0.377 (segments of 208 rows:
    0.166 / 0.180, 0.229 / 0.260); B8 T4096 H32 D128 dq 3.210 / 3.335 but dk/dv 4.893 / 4.717: there its five
    prefetched tiles (qdq in fp32) spill (kernel_registers.py), so its dk/dv sweep prefetches at heads of 64
    and less. Plain sweeps (`--layer gla`, `--layer hedgehog`): dq 0.210 / 0.253 at B16 T1024 H9 K64, 0.173 /
    0.253 at B4 T1024 H16 K128 (128 programs), 0.651 / 0.836 at B4 T4096 H16 K64, 0.229 / 0.299 hedgehog B4
    T1024 H16 K256 (256 programs); but hedgehog at SmolLM2's shape, K 128 in two 64-column blocks, 288
    programs, 0.395 / 0.299: the prefetch's registers there leave an SM two programs and the grid a second
    round, so a plain dq sweep with more than two programs an SM and K over 64 does not prefetch. Plain dk/dv
    0.253 / 0.285 at K 64, 0.791 / 0.909 at B4 T4096 K 64, but 0.360 / 0.359 at K 128 and hedgehog's 0.457 /
    0.457 (K 128) and 0.773 / 0.772 (K 256), where it spills (kernel_registers.py): no dk/dv sweep prefetches
    over more than 64 key channels."""
    if sweep == "dkv":
        return K <= 64
    return feature_map or K <= 64 or programs <= 2 * _sm_count(device)


def _sweep_launch(sweep: str, num_warps: int | None, default: int) -> dict:
    """num_warps (and maxnreg, if set) for one sweep ("dq" or "dkv")."""
    launch = {"num_warps": num_warps or BACKWARD_LAUNCH.get(f"{sweep}_warps") or BACKWARD_LAUNCH.get("num_warps")
              or default}
    if BACKWARD_LAUNCH.get(f"{sweep}_maxnreg"):
        launch["maxnreg"] = int(BACKWARD_LAUNCH[f"{sweep}_maxnreg"])
    return launch


def gla_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    do: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    dht: torch.Tensor | None = None,
    final_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    need_dh0: bool = False,
    need_dg: bool = True,
    feature_map: bool = False,
    gate_mult: float = 1.0,
    low_precision: bool | None = None,
    block_k: int | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
    sum_groups: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of o = GLA(q, k, v, g) (and of the final state, via dht).

    q [B, T, HQ, K]; k, g [B, T, HKV, K]; v [B, T, HKV, V]; do [B, T, HQ, V]; dht, final_state
    (the forward's final state; needed with dht) [N, HQ, K, V]. Returns float32 dq [B, T, HQ, K],
    dk, dg [B, T, HKV, K], dv [B, T, HKV, V] and dh0 [N, HQ, K, V] (None unless need_dh0). dg is
    None unless need_dg: constant gates (hedgehog's zeros) skip its two passes over [B, T, HQ, K].

    feature_map: q, k are Liger's raw projections; the kernels form phi = softmax and the
    log-gate logsigmoid(k) * gate_mult themselves (g unused), take the gate's reverse sum in the
    dk/dv sweep, and return dq, dk with respect to the raw q, k (dg None). One program then holds
    a whole head (K and V at most 128, say; the forward kernel keeps the same state tile).
    `low_precision` (default: do is bf16/fp16) runs the matrix products in do's dtype.
    sum_groups=False returns dk, dv with a row per query head ([B, T, HQ, .]), for a caller that
    sums each kv group in a pass it makes anyway (the Liger window backward, window_bwd's add_to).
    """
    B, T, HQ, K = q.shape
    HKV, V = k.shape[2], v.shape[-1]
    G = HQ // HKV
    q, k, v, do = (x.contiguous() for x in (q, k, v, do))
    g = g.contiguous() if g is not None else None
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    if low_precision is None:
        low_precision = do.dtype in (torch.bfloat16, torch.float16)
    if dht is not None and final_state is None:
        raise ValueError("gla_bwd needs the forward's final_state to take a gradient through dht")
    fp16 = do.dtype == torch.float16
    BT = chunk_triton.BT
    # softmax over K and the gate's sum need whole rows
    BK = K if feature_map else (block_k or BACKWARD_LAUNCH.get("block_k") or min(K, 64))
    BV = V if feature_map else (block_v or BACKWARD_LAUNCH.get("block_v") or min(V, 64))
    NV = triton.cdiv(V, BV)
    f32 = dict(dtype=torch.float32, device=q.device)
    dq = torch.empty(B, T, HQ, K, **f32)
    # rows per query head, a kv group's summed afterwards: atomic adds into the kv head's rows were
    # slower (dk/dv sweep 0.63 against 0.45 ms at SmolLM2's shape, 7.36 against 5.70 at B8 T4096
    # Hq32 Hkv8 D128; H200, thirteenth session)
    qdq = torch.empty(B, T, HQ, K, **f32) if feature_map else dq
    dk = torch.empty(NV, B, T, HQ, K, **f32)
    dv = torch.empty(B, T, HQ, V, **f32)
    dh0 = torch.empty(N, HQ, K, V, **f32) if need_dh0 else None
    chunk_triton.poison(dq, qdq, dk, dv, dh0)
    h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
    dht = dht.to(torch.float32).contiguous() if dht is not None else None
    ht = final_state.to(torch.float32).contiguous() if dht is not None else None
    cu = cu_seqlens if cu_seqlens is not None else dq
    common = dict(HQ=HQ, HKV=HKV, K=K, V=V, BT=BT, FEATURE_MAP=feature_map, IS_VARLEN=cu_seqlens is not None,
                  LOW_PRECISION=bool(low_precision), DIAG_F32=fp16, num_stages=1)
    programs = {"dq": triton.cdiv(K, BK) * HQ * N, "dkv": NV * HQ * N}
    prefetch = {sweep: bool(BACKWARD_LAUNCH.get(f"{sweep}_prefetch", default_prefetch(sweep, feature_map, K, n, q.device)))
                for sweep, n in programs.items()}
    fast(gla_bwd_dq_kernel)[(triton.cdiv(K, BK), HQ, N)](
        q, k, v, g if g is not None else q, do, h0 if h0 is not None else dq, dq, qdq, cu,
        T, float(scale), float(gate_mult), BK=BK, USE_H0=h0 is not None, PREFETCH=prefetch["dq"], **common,
        **_sweep_launch("dq", num_warps, default_warps("dq", feature_map, K, programs["dq"], q.device)),
    )
    fast(gla_bwd_dkv_kernel)[(NV, HQ, N)](
        q, k, v, g if g is not None else q, do, ht if ht is not None else dq, dht if dht is not None else dq,
        dh0 if dh0 is not None else dq, qdq, dk, dv, cu,
        T, B * T, float(scale), float(gate_mult), BV=BV, USE_DHT=dht is not None, STORE_DH0=need_dh0,
        PREFETCH=prefetch["dkv"], **common,
        **_sweep_launch("dkv", num_warps, default_warps("dkv", feature_map, K, programs["dkv"], q.device)),
    )
    dk = dk.sum(0) if NV > 1 else dk[0]
    dg = _gate_gradient(q, k, dq, dk, G, dht, ht, cu_seqlens, N, T) if need_dg and not feature_map else None
    if G > 1:
        dg = dg.view(B, T, HKV, G, K).sum(3) if dg is not None else None
        if sum_groups:
            dk = dk.view(B, T, HKV, G, K).sum(3)
            dv = dv.view(B, T, HKV, G, V).sum(3)
    return dq, dk, dv, dg, dh0


def _gate_gradient(q, k, dq, dk, G, dht, ht, cu_seqlens, N, T) -> torch.Tensor:
    """dg [B, T, HQ, K] of the plain (no feature map) sweeps: the reverse cumulative sum of
    q dq - k dk (the final state's term on each sequence's last step)."""
    B, _, HQ, K = q.shape
    k_rep = k.float().repeat_interleave(G, dim=2) if G > 1 else k.float()
    d_cum = q.float() * dq - k_rep * dk
    if dht is not None:  # the final state's factor exp(B_T): its gradient lands on each sequence's last step
        last = (torch.arange(1, N + 1, device=q.device) * T if cu_seqlens is None else cu_seqlens[1:].long()) - 1
        lengths = torch.full((N,), T, device=q.device) if cu_seqlens is None else cu_seqlens.diff()
        term = (ht * dht).sum(-1)  # [N, HQ, K]
        keep = lengths > 0  # an empty sequence has no step to carry it (and no gate)
        flat = d_cum.view(B * T, HQ, K)
        flat.index_add_(0, last[keep], term[keep])
    return _reverse_cumsum(d_cum, cu_seqlens)
