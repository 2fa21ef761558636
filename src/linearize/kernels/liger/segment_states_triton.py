"""The states at segment boundaries for liger/segmented.py, in three small Triton kernels.

A sequence cut into S segments of `rows` rows runs its segments side by side, each from the
state entering it. These kernels find those states (forward) and the gradients reaching each
segment's final state (backward) without walking the whole sequence in one program:

- segment_local_states_kernel, one program per (segment, kv head, block of value columns):
  the segment's own contribution L_j = sum_t exp(G_j - C_t) phi(k_t) v_t^T, from a zero state,
  and its total log-gate G_j, walking the segment in blocks of BT rows (C_t is the cumulative
  log-gate within the segment, phi = softmax over the head dimension; every exponent is <= 0);
- segment_local_grads_kernel, one program per (segment, query head, block of value columns):
  M_j = sum_t exp(C_t) phi(q_t) do_t^T, what the segment's outputs send back to the state
  entering it;
- segment_scan_kernel, one program per (sequence, query head, block of value columns): the S
  steps S_in[j+1] = exp(G_j) S_in[j] + L_j forward, or dS_out[j-1] = exp(G_j) dS_out[j] + M_j
  backward, writing each step's state.

They replace a PyTorch prologue of some 40 small launches a layer's forward and 49 its backward
(gates, their blocked cumulative sums, pads, einsum, the scan's steps): at SmolLM2's B4 T4096
the layer waited on the host, 4.49 ms of wall for 2.43 ms of GPU work (docs/kernels.md,
fourteenth session). `segment_states_torch` and `segment_state_grads_torch` are the references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..cumsum import blocked_cumsum
from ..gla import chunk_triton
from ..gla.chunk_triton import logsigmoid, softmax_rows
from ..launch import fast

# Launch overrides for benchmarks/sweep_launch.py (keys block_t, block_v, num_warps, num_stages); empty: the defaults.
LAUNCH: dict[str, int] = {}


def tile(K: int, V: int) -> tuple[int, int]:
    """(BT, BV): rows a step and value columns a program (see _launch for the 32 rows)."""
    return LAUNCH.get("block_t", 32), min(V, LAUNCH.get("block_v", 64))


def _launch(kernel: str, K: int) -> dict[str, int]:
    """4 warps, except the states' kernel at heads over 64 (8). One H200, `sweep_launch.py`, ms of
    (states, gradients). Twenty-second session, at heads of 64, 64 rows a step and 8 warps -> 32 rows
    and 4: B16 T1024 H9/3 in segments of 128, 208, 320, 416 and 592 rows (0.026, 0.072) -> (0.022,
    0.062), (0.032, 0.090) -> (0.027, 0.074), (0.040, 0.082) -> (0.036, 0.067), (0.053, 0.093) ->
    (0.045, 0.082), (0.042, 0.102) -> (0.045, 0.093); B4 T4096 by the rule (592) (0.042, 0.078) ->
    (0.045, 0.072). At heads of 128 (32 rows already), the states' kernel at 4 warps instead of 8:
    B2 T4096 H32/8 0.257 -> 0.336. Fifteenth session, 64 rows, 4 -> 8 warps: B4 T4096 H9/3 D64 in
    segments of 1408, (0.154, 0.152) -> (0.096, 0.102); B1 T16384 H32/8 D128 in segments of 2560,
    (0.436, 0.913) -> (0.343, 1.152)."""
    warps = 8 if kernel == "states" and K > 64 else 4
    return dict(num_warps=LAUNCH.get("num_warps", warps), num_stages=LAUNCH.get("num_stages", 3))


@triton.jit
def segment_local_states_kernel(
    k, v, local, totals, T, rows, pieces, gate_mult,
    HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    i_v, i_h, i_bs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_s = i_bs // pieces, i_bs % pieces
    first = i_s * rows
    end = tl.minimum(first + rows, T)
    r, ck, cv = tl.arange(0, BT), tl.arange(0, K), i_v * BV + tl.arange(0, BV)
    S = tl.zeros([K, BV], dtype=tl.float32)
    G = tl.zeros([K], dtype=tl.float32)
    for t0 in range(first, end, BT):
        t = t0 + r
        m = t < end
        p = (i_b * T + t).to(tl.int64) * HKV + i_h
        b_k = tl.load(k + p[:, None] * K + ck[None, :], mask=m[:, None], other=0.0).to(tl.float32)
        b_v = tl.load(v + p[:, None] * V + cv[None, :], mask=m[:, None], other=0.0).to(tl.float32)
        g = tl.where(m[:, None], logsigmoid(b_k) * gate_mult, 0.0)
        c = tl.cumsum(g, axis=0)
        last = tl.sum(g, axis=0)
        k_out = softmax_rows(b_k) * tl.exp(last[None, :] - c)  # rows past the end meet v = 0
        S = S * tl.exp(last)[:, None] + tl.dot(tl.trans(k_out), b_v, input_precision=PRECISION)
        G += last
    base = (i_bs * HKV + i_h).to(tl.int64)
    tl.store(local + base * K * V + ck[:, None] * V + cv[None, :], S)
    if i_v == 0:
        tl.store(totals + base * K + ck, G)


@triton.jit
def segment_local_grads_kernel(
    q, k, do, local, T, rows, pieces, gate_mult,
    HQ: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_v, i_h, i_bs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // (HQ // HKV)
    i_b, i_s = i_bs // pieces, i_bs % pieces
    first = i_s * rows
    end = tl.minimum(first + rows, T)
    r, ck, cv = tl.arange(0, BT), tl.arange(0, K), i_v * BV + tl.arange(0, BV)
    M = tl.zeros([K, BV], dtype=tl.float32)
    before = tl.zeros([K], dtype=tl.float32)  # the segment's log-gate up to this block
    for t0 in range(first, end, BT):
        t = t0 + r
        m = t < end
        row = (i_b * T + t).to(tl.int64)
        b_q = tl.load(q + (row * HQ + i_h)[:, None] * K + ck[None, :], mask=m[:, None], other=0.0).to(tl.float32)
        b_k = tl.load(k + (row * HKV + i_hk)[:, None] * K + ck[None, :], mask=m[:, None], other=0.0).to(tl.float32)
        b_do = tl.load(do + (row * HQ + i_h)[:, None] * V + cv[None, :], mask=m[:, None], other=0.0).to(tl.float32)
        g = tl.where(m[:, None], logsigmoid(b_k) * gate_mult, 0.0)
        c = before[None, :] + tl.cumsum(g, axis=0)
        before += tl.sum(g, axis=0)
        q_in = softmax_rows(b_q) * tl.exp(c)  # rows past the end meet do = 0
        M += tl.dot(tl.trans(q_in), b_do, input_precision=PRECISION)
    base = (i_bs * HQ + i_h).to(tl.int64)
    tl.store(local + base * K * V + ck[:, None] * V + cv[None, :], M)


@triton.jit
def segment_scan_kernel(
    local, totals, start, before, after, pieces,
    HQ: tl.constexpr, LOCAL_H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    USE_START: tl.constexpr, REVERSE: tl.constexpr, STORE_AFTER: tl.constexpr,
):
    i_v, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_l, i_hk = i_h // (HQ // LOCAL_H), i_h // (HQ // HKV)
    ck, cv = tl.arange(0, K), i_v * BV + tl.arange(0, BV)
    tile = ck[:, None] * V + cv[None, :]
    if USE_START:
        S = tl.load(start + (i_b * HQ + i_h).to(tl.int64) * K * V + tile).to(tl.float32)
    else:
        S = tl.zeros([K, BV], dtype=tl.float32)
    for n in range(0, pieces):
        j = pieces - 1 - n if REVERSE else n
        seg = (i_b * pieces + j).to(tl.int64)
        p_out = (seg * HQ + i_h) * K * V + tile
        tl.store(before + p_out, S)
        decay = tl.exp(tl.load(totals + (seg * HKV + i_hk) * K + ck))
        S = decay[:, None] * S + tl.load(local + (seg * LOCAL_H + i_l) * K * V + tile)
        if STORE_AFTER:
            tl.store(after + p_out, S)


def _precision(dtype: torch.dtype) -> str:
    # 16-bit inputs: one TF32 pass is finer than the sweeps' own bf16 products; fp32 asks for fp32
    return "tf32" if dtype in (torch.bfloat16, torch.float16) else chunk_triton.dot_precision()


def segment_states(
    k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None, rows: int, gate_mult: float, q_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The state entering and leaving every segment of `rows` rows, and each segment's total log-gate.

    k [B, T, Hkv, K], v [B, T, Hkv, V] (raw projections, contiguous); initial_state [B, Hq, K, V] or
    None (zeros). Returns entering, leaving [B, S, Hq, K, V] fp32 and totals [B, S, Hkv, K] fp32."""
    B, T, HKV, K = k.shape
    V = v.shape[-1]
    k, v = k.contiguous(), v.contiguous()
    pieces = -(-T // rows)
    BT, BV = tile(K, V)
    f32 = dict(dtype=torch.float32, device=k.device)
    local, totals = torch.empty(B, pieces, HKV, K, V, **f32), torch.empty(B, pieces, HKV, K, **f32)
    entering, leaving = torch.empty(2, B, pieces, q_heads, K, V, **f32).unbind(0)
    chunk_triton.poison(local, totals, entering, leaving)
    NV = V // BV
    fast(segment_local_states_kernel)[(NV, HKV, B * pieces)](
        k, v, local, totals, T, rows, pieces, float(gate_mult), HKV=HKV, K=K, V=V, BT=BT, BV=BV,
        PRECISION=_precision(k.dtype), **_launch("states", K),
    )
    _scan(local, totals, initial_state, entering, leaving, BV)
    return entering, leaving, totals


def segment_state_grads(
    q: torch.Tensor, k: torch.Tensor, do: torch.Tensor, dht: torch.Tensor | None, totals: torch.Tensor, rows: int,
    gate_mult: float,
) -> torch.Tensor:
    """The gradient reaching every segment's final state [B, S, Hq, K, V] fp32.

    q, do [B, T, Hq, K or V] (do: the linear branch's share of the output gradient); k [B, T, Hkv, K];
    dht [B, Hq, K, V] (the final state's gradient) or None; totals from segment_states."""
    B, T, HQ, K = q.shape
    HKV, V = k.shape[2], do.shape[-1]
    q, k, do = q.contiguous(), k.contiguous(), do.contiguous()
    pieces = -(-T // rows)
    BT, BV = tile(K, V)
    f32 = dict(dtype=torch.float32, device=q.device)
    local, leaving_grads = torch.empty(2, B, pieces, HQ, K, V, **f32).unbind(0)
    chunk_triton.poison(local, leaving_grads)
    NV = V // BV
    fast(segment_local_grads_kernel)[(NV, HQ, B * pieces)](
        q, k, do, local, T, rows, pieces, float(gate_mult), HQ=HQ, HKV=HKV, K=K, V=V, BT=BT, BV=BV,
        PRECISION=_precision(do.dtype), **_launch("grads", K),
    )
    _scan(local, totals, dht, leaving_grads, None, BV)
    return leaving_grads


def _scan(local: torch.Tensor, totals: torch.Tensor, start: torch.Tensor | None, before: torch.Tensor,
          after: torch.Tensor | None, BV: int) -> None:
    """segment_scan_kernel over `before` [B, S, Hq, K, V]: forward from `start` (also writing `after`),
    or, without `after`, backward (the gradients' direction). local [B, S, Hkv or Hq, K, V]."""
    B, pieces, HQ, K, V = before.shape
    fast(segment_scan_kernel)[(V // BV, HQ, B)](
        local, totals, start.float().contiguous() if start is not None else local, before,
        after if after is not None else before, pieces, HQ=HQ, LOCAL_H=local.shape[2], HKV=totals.shape[2], K=K, V=V,
        BV=BV, USE_START=start is not None, REVERSE=after is None, STORE_AFTER=after is not None, num_warps=4,
    )


# ---- plain-PyTorch references (the prologue these kernels replaced) ----

def _segments(x: torch.Tensor, pieces: int, rows: int) -> torch.Tensor:
    """[B, T, H, D] -> [B, S, rows, H, D] in fp32, the last segment padded with zero rows."""
    x = x.float()
    if pieces * rows != x.shape[1]:
        x = F.pad(x, (0, 0, 0, 0, 0, pieces * rows - x.shape[1]))
    return x.view(x.shape[0], pieces, rows, *x.shape[2:])


def _gates(k: torch.Tensor, pieces: int, rows: int, gate_mult: float) -> torch.Tensor:
    """The cumulative log-gate within each segment [B, S, rows, Hkv, K] (padding rows add nothing)."""
    return blocked_cumsum(_segments(F.logsigmoid(k.float()) * gate_mult, pieces, rows), 2)


def segment_states_torch(
    k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None, rows: int, gate_mult: float, q_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """segment_states in PyTorch (batched products, then the scan step by step)."""
    B, T, HKV, K = k.shape
    pieces, group = -(-T // rows), q_heads // HKV
    cum = _gates(k, pieces, rows, gate_mult)
    total = cum[:, :, -1]
    phi_k = _segments(k, pieces, rows).softmax(-1) * torch.exp(total[:, :, None] - cum)
    local = torch.einsum("bslhk,bslhv->bshkv", phi_k, _segments(v, pieces, rows))
    local = local.repeat_interleave(group, dim=2)
    decay = torch.exp(total).repeat_interleave(group, dim=2)[..., None]
    state = torch.zeros_like(local[:, 0]) if initial_state is None else initial_state.float()
    entering, leaving = [], []
    for j in range(pieces):
        entering.append(state)
        state = decay[:, j] * state + local[:, j]
        leaving.append(state)
    return torch.stack(entering, 1), torch.stack(leaving, 1), total


def segment_state_grads_torch(
    q: torch.Tensor, k: torch.Tensor, do: torch.Tensor, dht: torch.Tensor | None, totals: torch.Tensor, rows: int,
    gate_mult: float,
) -> torch.Tensor:
    """segment_state_grads in PyTorch."""
    B, T, HQ, K = q.shape
    pieces, group = -(-T // rows), HQ // k.shape[2]
    cum = _gates(k, pieces, rows, gate_mult).repeat_interleave(group, dim=3)
    phi_q = _segments(q, pieces, rows).softmax(-1) * torch.exp(cum)
    local = torch.einsum("bslhk,bslhv->bshkv", phi_q, _segments(do, pieces, rows))
    decay = torch.exp(totals).repeat_interleave(group, dim=2)[..., None]
    grad = torch.zeros_like(local[:, 0]) if dht is None else dht.float()
    grads = []
    for j in reversed(range(pieces)):
        grads.append(grad)
        grad = decay[:, j] * grad + local[:, j]
    return torch.stack(grads[::-1], 1)
