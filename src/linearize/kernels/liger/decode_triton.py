"""One Liger decode step in a single Triton kernel (see liger_decode_step_torch for the maths).

The recurrent state depends only on keys, values and gates, so the query heads of a kv group
share one: the state may hold a head per query head (HS = HQ, the layout of liger_attention's
final_state) or per kv head (HS = HKV, what the model's cache keeps: a G-th of the bytes to
read and write each step). Program (value block, state head, batch row) reads its [K, BV] tile
of the fp32 state once, decays and updates it, writes it back in place, and for each of the
G = HQ / HS query heads it serves reads the GLA output off the tile; with a window it also
attends over the ring buffer [W, K] of rotated keys, loaded once for those heads. The new
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
from .naive import liger_decode_step_torch


# slot changes every step: unspecialised, else Triton compiles a variant for slot == 1 and for
# slot % 16 == 0 in the middle of a timed generation
@triton.jit(do_not_specialize=["slot"])
def liger_decode_kernel(
    q, k, v, state, k_ring, v_ring, ring_valid, cos, sin, o,
    slot, position, gate_mult, mix, win_scale, s_cos_b, s_qb, s_kb, s_vb,
    HQ: tl.constexpr, HKV: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, BV: tl.constexpr,
    W: tl.constexpr, BW: tl.constexpr, SLOT_IN_MEMORY: tl.constexpr,
):
    i_v, i_s, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G: tl.constexpr = HQ // HKV  # query heads per kv head
    GP: tl.constexpr = HQ // HS  # query heads this program serves: 1, or G with a shared state
    i_hk = (i_s * GP) // G
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    # s_qb, s_kb, s_vb: elements between batch rows, so q/k/v may be column slices of one fused projection
    b_k = tl.load(k + i_b * s_kb + i_hk * K + ck).to(tl.float32)
    b_v = tl.load(v + i_b * s_vb + i_hk * K + cv).to(tl.float32)
    p_s = state + (i_b * HS + i_s).to(tl.int64) * K * K + ck[:, None] * K + cv[None, :]
    S = tl.load(p_s)
    e_k = tl.exp(b_k - tl.max(b_k, axis=0))
    f_k = e_k / tl.sum(e_k, axis=0)
    gate = tl.exp((tl.minimum(b_k, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(b_k)))) * gate_mult)
    S = S * gate[:, None] + f_k[:, None] * b_v[None, :]
    tl.store(p_s, S)

    if W > 0:  # the window's keys and values, shared by the query heads below
        if SLOT_IN_MEMORY:  # position: an int64 tensor of one element, tokens already cached
            slot = (tl.load(position) % W).to(tl.int32)
        ck_swap = (ck + K // 2) % K
        sign = tl.where(ck < K // 2, -1.0, 1.0)
        c = tl.load(cos + i_b * s_cos_b + ck).to(tl.float32)
        s = tl.load(sin + i_b * s_cos_b + ck).to(tl.float32)
        k_sw = tl.load(k + i_b * s_kb + i_hk * K + ck_swap).to(tl.float32)
        k_rot = b_k * c + sign * k_sw * s
        cw = tl.arange(0, BW)
        m_w = cw < W
        p_kr = k_ring + ((i_b * HKV + i_hk) * W + cw)[:, None].to(tl.int64) * K + ck[None, :]
        p_vr = v_ring + ((i_b * HKV + i_hk) * W + cw)[:, None].to(tl.int64) * K + cv[None, :]
        kr = tl.load(p_kr, mask=m_w[:, None], other=0.0)
        vr = tl.load(p_vr, mask=m_w[:, None], other=0.0)
        new = (cw == slot)[:, None]
        k_new = k_rot.to(kr.dtype)
        v_new = b_v.to(vr.dtype)
        kr = tl.where(new, k_new[None, :], kr).to(tl.float32)
        vr = tl.where(new, v_new[None, :], vr).to(tl.float32)
        valid = tl.load(ring_valid + i_b * W + cw, mask=m_w, other=0) != 0
        valid = (valid | (cw == slot)) & m_w

    for g in tl.static_range(GP):
        i_h = i_s * GP + g
        b_q = tl.load(q + i_b * s_qb + i_h * K + ck).to(tl.float32)
        e_q = tl.exp(b_q - tl.max(b_q, axis=0))
        f_q = e_q / tl.sum(e_q, axis=0)
        b_o = tl.sum(f_q[:, None] * S, axis=0)
        if W > 0:
            q_sw = tl.load(q + i_b * s_qb + i_h * K + ck_swap).to(tl.float32)
            q_rot = b_q * c + sign * q_sw * s
            sc = tl.sum(kr * q_rot[None, :], axis=1) * win_scale
            sc = tl.where(valid, sc, -float("inf"))
            p = tl.exp(sc - tl.max(sc, axis=0))
            p = p / tl.sum(p, axis=0)
            o_win = tl.sum(p[:, None] * vr, axis=0)
            b_o = mix * o_win + (1.0 - mix) * b_o
        tl.store(o + (i_b * HQ + i_h) * K + cv, b_o.to(o.dtype.element_ty))

    if W > 0:
        if (i_s * GP) % G == 0:  # the kv group's first program writes the new token's ring slot
            p_slot = (i_b * HKV + i_hk) * W + slot
            tl.store(v_ring + p_slot.to(tl.int64) * K + cv, v_new)
            if i_v == 0:
                tl.store(k_ring + p_slot.to(tl.int64) * K + ck, k_new)
                if i_s == 0:
                    tl.store(ring_valid + i_b * W + slot, 1)


def _packed_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, 1, H, K] as the kernel reads it: heads and channels packed within a row, any stride
    between rows. The column slices of a fused q/k/v projection (decoding.fuse_projections) already
    are, so they go in without a copy."""
    if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]:
        return x
    return x.contiguous()


def liger_decode_step(q, k, v, state, k_ring, v_ring, ring_valid, position: int | torch.Tensor, *, window, mix,
                      gate_normalizer, cos=None, sin=None, block_v: int | None = None, num_warps: int = 4):
    """Triton form of liger_decode_step_torch (same arguments; updates state and ring in place).
    `position` is an int or an int64 device tensor of one element (read by the kernel: no sync)."""
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
    if block_v is None:
        # 64 value columns a program: each program re-reads its head's ring keys, so fewer, wider
        # programs move less. Measured on an H100 (graph replay, heads of 128, docs/kernels.md):
        # 32 -> 64 took B8 from 68% to 73% of copy bandwidth and B64 from 89% to 93%. At 4 warps
        # the [128, 64] tile spills 424 B (kernel_registers.py), yet 8 warps, spill-free, measured
        # slower in every shape (B8 62%, B64 77%). Heads of 256 keep 32 columns: a [256, 64] tile
        # spills 2.4 KB, a [256, 32] tile 136 B.
        block_v = min(K, 64 if K <= 128 else 32)
    BW = 1 << max(W - 1, 0).bit_length() if W > 0 else 1
    in_memory = isinstance(position, torch.Tensor)
    grid = (triton.cdiv(K, block_v), HS, B)
    liger_decode_kernel[grid](
        q, k, v, state,
        k_ring if W > 0 else q, v_ring if W > 0 else q, valid_u8 if W > 0 else q,
        cos if W > 0 else q, sin if W > 0 else q, o,
        0 if in_memory or W == 0 else position % W, position if in_memory else q,
        1.0 / gate_normalizer, float(mix), float(K) ** -0.5, s_cos_b, q.stride(0), k.stride(0), v.stride(0),
        HQ=HQ, HKV=HKV, HS=HS, K=K, BV=block_v, W=W, BW=max(BW, 16), SLOT_IN_MEMORY=in_memory, num_warps=num_warps,
    )
    return o
