"""One Liger decode step in a single Triton kernel (see liger_decode_step_torch for the maths).

The recurrent state depends only on keys, values and gates, so the query heads of a kv group
share one: the state may hold a head per query head (HS = HQ, the layout of liger_attention's
final_state) or per kv head (HS = HKV, what the model's cache keeps: a G-th of the bytes to
read and write each step). Program (value block, state head, batch row) loads its [K, BV] tile
of the fp32 state, the ring buffer's [W, K] rotated keys and [W, BV] values before it stores
anything, decays and updates the tile, and for each of the G = HQ / HS query heads it serves adds
that head's GLA output and window scores into one row of an accumulator. A state per query head
at heads of 128 is walked in blocks of BK key rows instead (default_tile), each block loaded before
the previous one is stored: a program's loads and stores then overlap, where the whole tile's
loads and then its stores are two phases one wave of programs goes through in step. The new
token's rotated key and value are written into ring slot position % W by the first program of
each kv group (and the first value block for the key); every program uses the new key/value
from registers for that slot, so no program depends on another program's write. ring_valid[b,
slot] is set by program (0, 0, b). The position may be a device tensor the kernel reads
(SLOT_IN_MEMORY), so a decode step recorded in a CUDA graph finds the current slot on every replay.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gla import chunk_triton
from ..gla.chunk_triton import logsigmoid
from ..launch import fast
from .naive import liger_decode_step_torch


@triton.jit
def served_query_map(b_q, is_g, q_max, q_sum):
    """phi(q) = softmax(q) of the served head is_g picks, from every served head's statistics."""
    return tl.exp(b_q - tl.sum(tl.where(is_g, q_max, 0.0), axis=0)) / tl.sum(tl.where(is_g, q_sum, 0.0), axis=0)


@triton.jit
def ring_scores(b_q, q_swap, c, s, sign, kr):
    """The RoPE'd query's unscaled scores [BW] against the ring's rotated keys kr [BW, K]."""
    return tl.sum(kr * (b_q * c + sign * q_swap * s)[None, :], axis=1)


# slot changes every step: unspecialised, else Triton compiles a variant for slot == 1 and for
# slot % 16 == 0 in the middle of a timed generation
@triton.jit(do_not_specialize=["slot"])
def liger_decode_kernel(
    q, k, v, state, k_ring, v_ring, ring_valid, cos, sin, o,
    slot, position, gate_mult, mix, win_scale, s_cos_b, s_qb, s_kb, s_vb,
    HQ: tl.constexpr, HKV: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GB: tl.constexpr, W: tl.constexpr, BW: tl.constexpr, SLOT_IN_MEMORY: tl.constexpr,
):
    i_v, i_s, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G: tl.constexpr = HQ // HKV  # query heads per kv head
    GP: tl.constexpr = HQ // HS  # query heads this program serves: 1, or G with a shared state
    i_hk = (i_s * GP) // G
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    rows = tl.arange(0, GB)
    # s_qb, s_kb, s_vb: elements between batch rows, so q/k/v may be column slices of one fused projection
    p_k = k + i_b * s_kb + i_hk * K
    p_q = q + i_b * s_qb + (i_s * GP) * K
    b_v = tl.load(v + i_b * s_vb + i_hk * K + cv).to(tl.float32)
    b_k = tl.load(p_k + ck).to(tl.float32)
    k_max = tl.max(b_k, axis=0)
    e_k = tl.exp(b_k - k_max)
    k_sum = tl.sum(e_k, axis=0)
    f_k = e_k / k_sum
    # every served query head's softmax statistics at once (each head's row is picked out below)
    q_all = tl.load(p_q + rows[:, None] * K + ck[None, :], mask=(rows < GP)[:, None], other=0.0).to(tl.float32)
    q_max = tl.max(q_all, axis=1)
    q_sum = tl.sum(tl.exp(q_all - q_max[:, None]), axis=1)
    # phi(k) and the gate over the whole head serve the whole-tile branch only (the blocked one
    # takes its rows per block; the compiler drops these there). Computed here, not in that branch:
    # moved, they cost it 8-11 registers (sm_90, Triton 3.6: 203 -> 211 at B8 Hkv8's shared state)
    gate = tl.exp(logsigmoid(b_k) * gate_mult)
    # one accumulator row per served query head (GLA output, window scores): the group's window
    # softmax and outputs run after the state tile is stored
    o_lin = tl.zeros([GB, BV], dtype=tl.float32)
    if W > 0:
        if SLOT_IN_MEMORY:  # position: an int64 tensor of one element, tokens already cached
            slot = (tl.load(position) % W).to(tl.int32)
        cw = tl.arange(0, BW)
        m_w = cw < W
        new = (cw == slot)[:, None]
        first_of_group = (i_s * GP) % G == 0  # writes the new token's ring slot
        p_ring = ((i_b * HKV + i_hk) * W + cw)[:, None].to(tl.int64) * K
        scores = tl.zeros([GB, BW], dtype=tl.float32)
        # the ring's loads are issued before the first store: the compiler cannot move a load past
        # a store to another pointer it may alias, so a late load would wait on a round trip
        vr = tl.load(v_ring + p_ring + cv[None, :], mask=m_w[:, None], other=0.0)
        valid = tl.load(ring_valid + i_b * W + cw, mask=m_w, other=0) != 0
    # the state tile: whole (BK = K), or in blocks of BK key rows whose first is loaded with the ring
    if BK == K:
        p_s = state + (i_b * HS + i_s).to(tl.int64) * K * K + ck[:, None] * K + cv[None, :]
        S = tl.load(p_s)
    else:
        p_s = state + (i_b * HS + i_s).to(tl.int64) * K * K + cv[None, :]
        cb = tl.arange(0, BK)
        S = tl.load(p_s + cb[:, None] * K)
    if W > 0:  # the ring's rotated keys, and the new token's for its slot
        kr = tl.load(k_ring + p_ring + ck[None, :], mask=m_w[:, None], other=0.0)
        ck_swap = (ck + K // 2) % K
        sign = tl.where(ck < K // 2, -1.0, 1.0)
        c = tl.load(cos + i_b * s_cos_b + ck).to(tl.float32)
        s = tl.load(sin + i_b * s_cos_b + ck).to(tl.float32)
        k_rot = b_k * c + sign * tl.load(p_k + ck_swap).to(tl.float32) * s
        k_new = k_rot.to(kr.dtype)
        kr = tl.where(new, k_new[None, :], kr).to(tl.float32)
    if BK == K:  # kept as written before blocks existed: reordering it cost registers (spills at D 64)
        S = S * gate[:, None] + f_k[:, None] * b_v[None, :]
        for g in tl.static_range(GP):
            b_q = tl.load(p_q + g * K + ck).to(tl.float32)
            is_g = rows == g
            f_q = served_query_map(b_q, is_g, q_max, q_sum)
            o_lin += tl.where(is_g[:, None], tl.sum(f_q[:, None] * S, axis=0)[None, :], 0.0)
            if W > 0:
                q_swap = tl.load(p_q + g * K + ck_swap).to(tl.float32)
                scores += tl.where(is_g[:, None], ring_scores(b_q, q_swap, c, s, sign, kr)[None, :], 0.0)
        tl.store(p_s, S)
    else:
        # blocks of key rows, software-pipelined: each block is loaded before the previous one is
        # stored, so the program reads and writes its state at once rather than in two phases
        # (the whole tile's loads, then its stores)
        if W > 0:
            for g in tl.static_range(GP):
                b_q = tl.load(p_q + g * K + ck).to(tl.float32)
                q_swap = tl.load(p_q + g * K + ck_swap).to(tl.float32)
                scores += tl.where((rows == g)[:, None], ring_scores(b_q, q_swap, c, s, sign, kr)[None, :], 0.0)
        for i_blk in tl.static_range(K // BK):
            rk = i_blk * BK + cb
            if i_blk + 1 < K // BK:
                S_next = tl.load(p_s + (rk + BK)[:, None] * K)
            bk = tl.load(p_k + rk).to(tl.float32)  # this block's rows of phi(k) and of the gate
            gate_blk = tl.exp(logsigmoid(bk) * gate_mult)
            S = S * gate_blk[:, None] + (tl.exp(bk - k_max) / k_sum)[:, None] * b_v[None, :]
            for g in tl.static_range(GP):
                is_g = rows == g
                f_q = served_query_map(tl.load(p_q + g * K + rk).to(tl.float32), is_g, q_max, q_sum)
                o_lin += tl.where(is_g[:, None], tl.sum(f_q[:, None] * S, axis=0)[None, :], 0.0)
            tl.store(p_s + rk[:, None] * K, S)
            if i_blk + 1 < K // BK:
                S = S_next
    if W > 0:
        if first_of_group:
            if i_v == 0:
                tl.store(k_ring + ((i_b * HKV + i_hk) * W + slot).to(tl.int64) * K + ck, k_new)
        # the window's softmax over the ring's valid slots, against its values
        v_new = b_v.to(vr.dtype)
        vr = tl.where(new, v_new[None, :], vr).to(tl.float32)
        valid = (valid | (cw == slot)) & m_w
        scores = tl.where(valid[None, :], scores * win_scale, -float("inf"))
        p = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
    for g in tl.static_range(GP):
        is_g = rows == g
        b_o = tl.sum(tl.where(is_g[:, None], o_lin, 0.0), axis=0)
        if W > 0:
            p_g = tl.sum(tl.where(is_g[:, None], p, 0.0), axis=0)
            b_o = mix * tl.sum(p_g[:, None] * vr, axis=0) + (1.0 - mix) * b_o
        tl.store(o + (i_b * HQ + i_s * GP + g) * K + cv, b_o.to(o.dtype.element_ty))

    if W > 0:
        if first_of_group:
            tl.store(v_ring + ((i_b * HKV + i_hk) * W + slot).to(tl.int64) * K + cv, v_new)
            if i_v == 0:
                if i_s == 0:
                    tl.store(ring_valid + i_b * W + slot, 1)


def _packed_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, 1, H, K] as the kernel reads it: heads and channels packed within a row, any stride
    between rows. The column slices of a fused q/k/v projection (decoding.fuse_projections) already
    are, so they go in without a copy."""
    if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]:
        return x
    return x.contiguous()


def accumulator_rows(served: int) -> int:
    """GB: the kernel's accumulator rows for `served` query heads a program, a power of two, at least 2."""
    return max(1 << (served - 1).bit_length(), 2)


def default_tile(K: int, HQ: int, HS: int, B: int, device: torch.device) -> tuple[int, int]:
    """(key rows per state block, value columns) a decode program takes. Measured on H200s, graph
    replay, window 64 (docs/kernels.md, twelfth and thirteenth sessions):
    - a state per query head (HS = HQ: liger_attention's final_state, and the model's cache when
      the model has as many kv heads as query heads), heads of 128: 64 columns in blocks of 32 key
      rows, each block loaded before the previous one is stored. B8 Hkv32 15.9 us and B64 100.6
      against 19.7 and 121.3 for the whole [128, 128] tile at once; blocks of 16 took 17.4 and
      115.8, of 8 21.4 and 149.3, and 32 columns were slower at every block size. Other head
      sizes take the whole head at once (heads of 64, SmolLM2's: B8 5.4 us against 6.5 in blocks
      of 32);
    - a state shared by a kv group (the model's cache; G query heads a program): the whole column
      at once, 64 columns (B64 Hkv8 55.8 us; 76.8 at 32, 66.3 at 128), unless that leaves fewer
      programs than SMs, then 32 (B8 Hkv8: 128 programs at 64 columns on 132 SMs, 12.3 us; 11.1
      at 32). Blocks of key rows were slower here (B8 Hkv8 13.5 us in blocks of 32 against 11.2).
    Heads of 256 take 32 columns: a [256, 64] tile spills 2.4 KB (kernel_registers.py)."""
    if K > 128:
        return K, 32
    if HS == HQ:
        return (32, 64) if K == 128 else (K, K)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return K, min(K, 64 if triton.cdiv(K, 64) * HS * B >= sms else 32)


def liger_decode_step(q, k, v, state, k_ring, v_ring, ring_valid, position: int | torch.Tensor, *, window, mix,
                      gate_normalizer, cos=None, sin=None, block_k: int | None = None, block_v: int | None = None,
                      num_warps: int = 4):
    """Triton form of liger_decode_step_torch (same arguments; updates state and ring in place).
    `position` is an int or an int64 device tensor of one element (read by the kernel: no sync).
    block_k, block_v: key rows per state block and value columns a program takes (default_tile)."""
    B, _, HQ, K = q.shape
    HKV, HS = k.shape[2], state.shape[1]
    W = int(window)
    rings_ok = W == 0 or (k_ring.is_contiguous() and v_ring.is_contiguous() and ring_valid.is_contiguous())
    if (state.dtype != torch.float32 or not state.is_contiguous() or not rings_ok or K != 1 << (K - 1).bit_length()
            or not 16 <= K <= 256 or HQ % HKV != 0 or HS not in (HQ, HKV)):
        # shapes/layouts the kernel does not take (it updates state and rings in place, so they
        # must be contiguous, state fp32; power-of-two head size): the PyTorch step
        return liger_decode_step_torch(q, k, v, state, k_ring, v_ring, ring_valid, position, window=window, mix=mix,
                                       gate_normalizer=gate_normalizer, cos=cos, sin=sin)
    q, k, v = _packed_rows(q), _packed_rows(k), _packed_rows(v)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    chunk_triton.poison(o)
    s_cos_b = 0
    if W > 0:
        cos, sin = cos.reshape(cos.shape[0], -1)[:, -K:].contiguous(), sin.reshape(sin.shape[0], -1)[:, -K:].contiguous()
        s_cos_b = 0 if cos.shape[0] == 1 else K
        valid_u8 = ring_valid.view(torch.uint8)
    default_k, default_v = default_tile(K, HQ, HS, B, q.device)
    block_k, block_v = min(K, block_k or default_k), min(K, block_v or default_v)
    if block_k & (block_k - 1) or block_v & (block_v - 1):
        raise ValueError(f"decode tiles must be powers of two (block_k={block_k}, block_v={block_v})")
    BW = 1 << max(W - 1, 0).bit_length() if W > 0 else 1
    in_memory = isinstance(position, torch.Tensor)
    grid = (triton.cdiv(K, block_v), HS, B)
    fast(liger_decode_kernel)[grid](
        q, k, v, state,
        k_ring if W > 0 else q, v_ring if W > 0 else q, valid_u8 if W > 0 else q,
        cos if W > 0 else q, sin if W > 0 else q, o,
        0 if in_memory or W == 0 else position % W, position if in_memory else q,
        1.0 / gate_normalizer, float(mix), float(K) ** -0.5, s_cos_b, q.stride(0), k.stride(0), v.stride(0),
        HQ=HQ, HKV=HKV, HS=HS, K=K, BK=block_k, BV=block_v, GB=accumulator_rows(HQ // HS), W=W,
        BW=max(BW, 16), SLOT_IN_MEMORY=in_memory, num_warps=num_warps,
    )
    return o
