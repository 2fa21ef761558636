"""The gated delta rule's chunk-local terms as Triton kernels, beside their PyTorch reference.

One program per (16-step chunk, batch row and head), everything in registers, in fp32:

    b = cumsum(g), bp = b - g (log G_t, log G_{t-1}), b_end, mid = b at the middle row
    L  = strict  (k e^{bp}) . (k e^{-bp}) beta_j      M  = strict  (k e^{bp}) . (k e^{-b}) beta_j
    P1 = causal  (q e^{b})  . (k e^{-bp}) beta_j      P2 = causal  (q e^{b})  . (k e^{-b}) beta_j
    (I + L)^-1 = (I - L)(I + L^2)(I + L^4)(I + L^8)   (L is strictly lower: L^16 = 0)
    W = (I + L)^-1 (k e^{bp}),  U = (I + L)^-1 (M v)
    Qe = q e^{b} - P1 W,  Oe = P2 v - P1 U,  Kr = k e^{b_end - bp} beta_t,  Kw = k e^{b_end - b} beta_t,
    dec = e^{b_end}

(each decayed product formed about mid, its exponents clamped at 60, as the PyTorch form does).
The backward kernel recomputes those and applies the chain rule in reverse order; the inverse's
gradient is dA = -A^-T dW W^T - A^-T dU U^T on the strict lower triangle, the log-gates' gradient
a reverse cumulative sum inside the chunk, and `mid` is a constant (its gradient cancels exactly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..launch import fast

BT = 16  # chunk length, as chunk.py's CHUNK
MID = BT // 2 - 1


def _decayed_products(x, x_log, y, y_log, mid, mask):
    """where(mask, sum_d x_t[d] y_j[d] exp(x_log_t[d] - y_log_j[d]), 0) [..., C, C]: one product about
    the middle row (module docstring)."""
    a = x * (x_log - mid).clamp(max=60.0).exp()
    b = y * (mid - y_log).clamp(max=60.0).exp()
    return torch.where(mask, a @ b.transpose(-1, -2), 0.0)


def chunk_terms_torch(q, k, v, log_gate, beta):
    """chunk_triton's sweep inputs for every chunk at once (fp32, differentiable): Qe, Oe, W, U, Kr, Kw, v
    as [B H, N BT, X] and dec [B H, N, D]. Padded steps (beyond T) are identity steps. The
    reference of the kernels below (their tests compare against it)."""
    B, T, H, D = q.shape
    N = triton.cdiv(T, BT)

    def chunks(x):  # [B, T, H, X] -> [B, H, N, BT, X] fp32
        return F.pad(x.float(), (0, 0, 0, 0, 0, N * BT - T)).transpose(1, 2).unflatten(2, (N, BT))

    q, k, v, g = chunks(q), chunks(k), chunks(v), chunks(log_gate)
    beta_j = chunks(beta[..., None])[..., 0][..., None, :]  # [B, H, N, 1, BT]: scales column j
    b = g.cumsum(-2)  # log G_t, inclusive
    bp = b - g  # log G_{t-1}
    b_end, mid = b[..., -1:, :], b[..., MID : MID + 1, :]
    strict = torch.ones(BT, BT, dtype=torch.bool, device=q.device).tril(-1)
    causal = strict | torch.eye(BT, dtype=torch.bool, device=q.device)

    A = torch.eye(BT, device=q.device) + _decayed_products(k, bp, k, bp, mid, strict) * beta_j
    M = _decayed_products(k, bp, k, b, mid, strict) * beta_j
    W = torch.linalg.solve_triangular(A, k * bp.exp(), upper=False, unitriangular=True)
    U = torch.linalg.solve_triangular(A, M @ v, upper=False, unitriangular=True)
    P1 = _decayed_products(q, b, k, bp, mid, causal) * beta_j
    P2 = _decayed_products(q, b, k, b, mid, causal) * beta_j
    Qe = q * b.exp() - P1 @ W
    Oe = P2 @ v - P1 @ U
    beta_t = beta_j.transpose(-1, -2)  # [.., BT, 1]: scales row t
    Kr = k * (b_end - bp).exp() * beta_t
    Kw = k * (b_end - b).exp() * beta_t
    rows = [x.flatten(0, 1).flatten(1, 2) for x in (Qe, Oe, W, U, Kr, Kw, v)]
    return (*(x.contiguous() for x in rows), b_end[..., 0, :].exp().flatten(0, 1).contiguous())


@triton.jit
def chunk_rows(i_bh, n, NC, rd, cv, d_ok, v_ok, D: tl.constexpr, V: tl.constexpr, BT: tl.constexpr):
    """Chunk n's row offsets into [B H, N BT, D] and [B H, N BT, V] tensors, with their masks."""
    rr = (i_bh * NC + n).to(tl.int64) * BT + tl.arange(0, BT)
    return rr[:, None] * D + rd[None, :], rr[:, None] * V + cv[None, :], d_ok[None, :], v_ok[None, :]


@triton.jit
def chunk_inputs(q, k, v, g, beta, i_b, i_h, n, T, rows, rd, cv,
                 H: tl.constexpr, D: tl.constexpr, V: tl.constexpr, BT: tl.constexpr):
    """Chunk n's q, k, log-gates [BT, BD], v [BT, BV] and beta [BT] in fp32 (zeros past T), the
    source row offsets and masks."""
    t = n * BT + rows
    m_t = t < T
    src = ((i_b * T + t) * H + i_h).to(tl.int64)
    m_d, m_v = m_t[:, None] & (rd < D)[None, :], m_t[:, None] & (cv < V)[None, :]
    b_q = tl.load(q + src[:, None] * D + rd[None, :], mask=m_d, other=0.0).to(tl.float32)
    b_k = tl.load(k + src[:, None] * D + rd[None, :], mask=m_d, other=0.0).to(tl.float32)
    b_g = tl.load(g + src[:, None] * D + rd[None, :], mask=m_d, other=0.0).to(tl.float32)
    b_v = tl.load(v + src[:, None] * V + cv[None, :], mask=m_v, other=0.0).to(tl.float32)
    b_beta = tl.load(beta + src, mask=m_t, other=0.0).to(tl.float32)
    return b_q, b_k, b_g, b_v, b_beta, src, m_t, m_d, m_v


@triton.jit
def chunk_forward(b_q, b_k, b_g, b_v, b_beta, rows, PRECISION: tl.constexpr, MID: tl.constexpr):
    """The chunk's forward quantities (module docstring), in registers."""
    b_b = tl.cumsum(b_g, axis=0)
    b_bp = b_b - b_g
    b_end = tl.sum(b_g, axis=0)
    mid = tl.sum(tl.where(rows[:, None] == MID, b_b, 0.0), axis=0)[None, :]
    k_bp = b_k * tl.exp(tl.minimum(b_bp - mid, 60.0))
    k_bpn = b_k * tl.exp(tl.minimum(mid - b_bp, 60.0))
    k_bn = b_k * tl.exp(tl.minimum(mid - b_b, 60.0))
    q_b = b_q * tl.exp(tl.minimum(b_b - mid, 60.0))
    strict = rows[None, :] < rows[:, None]
    causal = rows[None, :] <= rows[:, None]
    L_raw = tl.where(strict, tl.dot(k_bp, tl.trans(k_bpn), input_precision=PRECISION), 0.0)
    M_raw = tl.where(strict, tl.dot(k_bp, tl.trans(k_bn), input_precision=PRECISION), 0.0)
    P1_raw = tl.where(causal, tl.dot(q_b, tl.trans(k_bpn), input_precision=PRECISION), 0.0)
    P2_raw = tl.where(causal, tl.dot(q_b, tl.trans(k_bn), input_precision=PRECISION), 0.0)
    L = L_raw * b_beta[None, :]
    eye = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    L2 = tl.dot(L, L, input_precision=PRECISION)
    L4 = tl.dot(L2, L2, input_precision=PRECISION)
    L8 = tl.dot(L4, L4, input_precision=PRECISION)
    inv = tl.dot(eye - L, eye + L2, input_precision=PRECISION)
    inv = tl.dot(inv, eye + L4, input_precision=PRECISION)
    inv = tl.dot(inv, eye + L8, input_precision=PRECISION)
    X = b_k * tl.exp(b_bp)
    Y = tl.dot(M_raw * b_beta[None, :], b_v, input_precision=PRECISION)
    w = tl.dot(inv, X, input_precision=PRECISION)
    u = tl.dot(inv, Y, input_precision=PRECISION)
    return (b_b, b_bp, b_end, mid, k_bp, k_bpn, k_bn, q_b, L_raw, M_raw, P1_raw, P2_raw, inv, X, w, u)


@triton.jit
def chunk_terms_fwd_kernel(
    q, k, v, g, beta, Qe, Oe, W, U, Kr, Kw, vc, dec, T, NC,
    H: tl.constexpr, D: tl.constexpr, V: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    MID: tl.constexpr, PRECISION: tl.constexpr,
):
    """The terms of chunk n of (batch, head) i_bh, written as rows of [B H, N BT, X] (all BT rows:
    a padded step's are zeros) and dec as [B H, N, D]."""
    n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rows, rd, cv = tl.arange(0, BT), tl.arange(0, BD), tl.arange(0, BV)
    b_q, b_k, b_g, b_v, b_beta, src, m_t, m_d, m_v = chunk_inputs(q, k, v, g, beta, i_b, i_h, n, T, rows, rd, cv,
                                                                  H, D, V, BT)
    (b_b, b_bp, b_end, mid, k_bp, k_bpn, k_bn, q_b, L_raw, M_raw, P1_raw, P2_raw, inv, X, w, u) = chunk_forward(
        b_q, b_k, b_g, b_v, b_beta, rows, PRECISION, MID)
    P1 = P1_raw * b_beta[None, :]
    qe = b_q * tl.exp(b_b) - tl.dot(P1, w, input_precision=PRECISION)
    oe = tl.dot(P2_raw * b_beta[None, :], b_v, input_precision=PRECISION) - tl.dot(P1, u, input_precision=PRECISION)
    kr = b_k * tl.exp(b_end[None, :] - b_bp) * b_beta[:, None]
    kw = b_k * tl.exp(b_end[None, :] - b_b) * b_beta[:, None]
    p_d, p_v, d_ok, v_ok = chunk_rows(i_bh, n, NC, rd, cv, rd < D, cv < V, D, V, BT)
    tl.store(Qe + p_d, qe, mask=d_ok)
    tl.store(W + p_d, w, mask=d_ok)
    tl.store(Kr + p_d, kr, mask=d_ok)
    tl.store(Kw + p_d, kw, mask=d_ok)
    tl.store(Oe + p_v, oe, mask=v_ok)
    tl.store(U + p_v, u, mask=v_ok)
    tl.store(vc + p_v, b_v, mask=v_ok)
    tl.store(dec + (i_bh * NC + n).to(tl.int64) * D + rd, tl.exp(b_end), mask=rd < D)


@triton.jit
def pair_grads(dP, mask, b_beta, x_rows, y_cols, PRECISION: tl.constexpr):
    """P = mask (x_rows . y_cols) beta_j given dP: (d x_rows, d y_cols, the G = mask dP beta_j used)."""
    G = tl.where(mask, dP, 0.0) * b_beta[None, :]
    return (tl.dot(G, y_cols, input_precision=PRECISION), tl.dot(tl.trans(G), x_rows, input_precision=PRECISION))


@triton.jit
def chunk_terms_bwd_kernel(
    q, k, v, g, beta, dQe, dOe, dW, dU, dKr, dKw, dvc, ddec, dq, dk, dv, dg, dbeta, T, NC,
    H: tl.constexpr, D: tl.constexpr, V: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    MID: tl.constexpr, PRECISION: tl.constexpr,
):
    """Gradients of q, k, v, log-gates and beta from the terms' gradients (chunk n of i_bh)."""
    n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rows, rd, cv = tl.arange(0, BT), tl.arange(0, BD), tl.arange(0, BV)
    b_q, b_k, b_g, b_v, b_beta, src, m_t, m_d, m_v = chunk_inputs(q, k, v, g, beta, i_b, i_h, n, T, rows, rd, cv,
                                                                  H, D, V, BT)
    (b_b, b_bp, b_end, mid, k_bp, k_bpn, k_bn, q_b, L_raw, M_raw, P1_raw, P2_raw, inv, X, w, u) = chunk_forward(
        b_q, b_k, b_g, b_v, b_beta, rows, PRECISION, MID)
    p_d, p_v, d_ok, v_ok = chunk_rows(i_bh, n, NC, rd, cv, rd < D, cv < V, D, V, BT)
    d_qe = tl.load(dQe + p_d, mask=d_ok, other=0.0)
    d_oe = tl.load(dOe + p_v, mask=v_ok, other=0.0)
    strict = rows[None, :] < rows[:, None]
    causal = rows[None, :] <= rows[:, None]
    P1 = P1_raw * b_beta[None, :]

    # Qe = q e^b - P1 W,  Oe = P2 v - P1 U
    e_b = tl.exp(b_b)
    d_q = d_qe * e_b
    d_b = d_qe * b_q * e_b
    dP1 = -tl.dot(d_qe, tl.trans(w), input_precision=PRECISION) - tl.dot(d_oe, tl.trans(u), input_precision=PRECISION)
    d_w = tl.load(dW + p_d, mask=d_ok, other=0.0) - tl.dot(tl.trans(P1), d_qe, input_precision=PRECISION)
    d_u = tl.load(dU + p_v, mask=v_ok, other=0.0) - tl.dot(tl.trans(P1), d_oe, input_precision=PRECISION)
    dP2 = tl.dot(d_oe, tl.trans(b_v), input_precision=PRECISION)
    d_v = tl.load(dvc + p_v, mask=v_ok, other=0.0)
    d_v += tl.dot(tl.trans(P2_raw * b_beta[None, :]), d_oe, input_precision=PRECISION)
    # W = A^-1 X,  U = A^-1 Y,  Y = M v,  X = k e^bp
    d_X = tl.dot(tl.trans(inv), d_w, input_precision=PRECISION)
    d_Y = tl.dot(tl.trans(inv), d_u, input_precision=PRECISION)
    dL = -tl.dot(d_X, tl.trans(w), input_precision=PRECISION) - tl.dot(d_Y, tl.trans(u), input_precision=PRECISION)
    dM = tl.dot(d_Y, tl.trans(b_v), input_precision=PRECISION)
    d_v += tl.dot(tl.trans(M_raw * b_beta[None, :]), d_Y, input_precision=PRECISION)
    d_bp = d_X * X
    # the four decayed products, and beta's share through their columns
    d_beta = tl.sum(tl.where(strict, dL, 0.0) * L_raw + tl.where(strict, dM, 0.0) * M_raw, axis=0)
    d_beta += tl.sum(tl.where(causal, dP1, 0.0) * P1_raw + tl.where(causal, dP2, 0.0) * P2_raw, axis=0)
    dx_L, dy_L = pair_grads(dL, strict, b_beta, k_bp, k_bpn, PRECISION)
    dx_M, dy_M = pair_grads(dM, strict, b_beta, k_bp, k_bn, PRECISION)
    dx_P1, dy_P1 = pair_grads(dP1, causal, b_beta, q_b, k_bpn, PRECISION)
    dx_P2, dy_P2 = pair_grads(dP2, causal, b_beta, q_b, k_bn, PRECISION)
    d_kbp, d_kbpn, d_kbn, d_qb = dx_L + dx_M, dy_L + dy_P1, dy_M + dy_P2, dx_P1 + dx_P2
    # k_bp = k e^{bp - mid}, k_bpn = k e^{mid - bp}, k_bn = k e^{mid - b}, q_b = q e^{b - mid}
    d_k = d_X * tl.exp(b_bp) + d_kbp * tl.exp(tl.minimum(b_bp - mid, 60.0))
    d_k += d_kbpn * tl.exp(tl.minimum(mid - b_bp, 60.0)) + d_kbn * tl.exp(tl.minimum(mid - b_b, 60.0))
    d_q += d_qb * tl.exp(tl.minimum(b_b - mid, 60.0))
    d_bp += d_kbp * k_bp - d_kbpn * k_bpn
    d_b += d_qb * q_b - d_kbn * k_bn
    # Kr = k e^{b_end - bp} beta_t,  Kw = k e^{b_end - b} beta_t,  dec = e^{b_end}
    e_r, e_w = tl.exp(b_end[None, :] - b_bp), tl.exp(b_end[None, :] - b_b)
    d_kr = tl.load(dKr + p_d, mask=d_ok, other=0.0)
    d_kw = tl.load(dKw + p_d, mask=d_ok, other=0.0)
    d_k += (d_kr * e_r + d_kw * e_w) * b_beta[:, None]
    t_r, t_w = d_kr * b_k * e_r, d_kw * b_k * e_w
    d_beta += tl.sum(t_r + t_w, axis=1)
    t_r, t_w = t_r * b_beta[:, None], t_w * b_beta[:, None]
    d_end = tl.sum(t_r + t_w, axis=0) + tl.load(ddec + (i_bh * NC + n).to(tl.int64) * D + rd, mask=rd < D,
                                                 other=0.0) * tl.exp(b_end)
    d_bp -= t_r
    d_b -= t_w
    # b_end = b at the last row; bp = b - g; b = cumsum(g)
    d_b += tl.where(rows[:, None] == BT - 1, d_end[None, :], 0.0)
    d_b += d_bp
    d_g = tl.sum(d_b, axis=0)[None, :] - tl.cumsum(d_b, axis=0) + d_b - d_bp
    tl.store(dq + src[:, None] * D + rd[None, :], d_q, mask=m_d)
    tl.store(dk + src[:, None] * D + rd[None, :], d_k, mask=m_d)
    tl.store(dg + src[:, None] * D + rd[None, :], d_g, mask=m_d)
    tl.store(dv + src[:, None] * V + cv[None, :], d_v, mask=m_v)
    tl.store(dbeta + src, d_beta, mask=m_t)


def _launch_shape(q: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int, int, int]:
    B, T, H, D = q.shape
    V = v.shape[-1]
    return B, T, H, D, V, triton.cdiv(T, BT), max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(V))


def chunk_terms_fwd(q, k, v, log_gate, beta, precision: str) -> tuple[torch.Tensor, ...]:
    """(Qe, Oe, W, U, Kr, Kw, v as [B H, N BT, X] fp32, dec [B H, N, D]): chunk_terms_torch's outputs."""
    B, T, H, D, V, NC, BD, BV = _launch_shape(q, v)
    rows = NC * BT
    Qe, W, Kr, Kw = (q.new_empty(B * H, rows, D, dtype=torch.float32) for _ in range(4))
    Oe, U, vc = (q.new_empty(B * H, rows, V, dtype=torch.float32) for _ in range(3))
    dec = q.new_empty(B * H, NC, D, dtype=torch.float32)
    fast(chunk_terms_fwd_kernel)[(NC, B * H)](
        q, k, v, log_gate, beta, Qe, Oe, W, U, Kr, Kw, vc, dec, T, NC,
        H=H, D=D, V=V, BD=BD, BV=BV, BT=BT, MID=MID, PRECISION=precision, num_warps=4,
    )
    return Qe, Oe, W, U, Kr, Kw, vc, dec


def chunk_terms_bwd(q, k, v, log_gate, beta, d_terms, precision: str) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk, dv, dlog_gate, dbeta) in fp32, from the terms' gradients (chunk_terms_fwd's order)."""
    B, T, H, D, V, NC, BD, BV = _launch_shape(q, v)
    dq, dk, dg = (torch.empty(q.shape, dtype=torch.float32, device=q.device) for _ in range(3))
    dv = torch.empty(v.shape, dtype=torch.float32, device=q.device)
    dbeta = torch.empty(beta.shape, dtype=torch.float32, device=q.device)
    fast(chunk_terms_bwd_kernel)[(NC, B * H)](
        q, k, v, log_gate, beta, *(x.contiguous() for x in d_terms), dq, dk, dv, dg, dbeta, T, NC,
        H=H, D=D, V=V, BD=BD, BV=BV, BT=BT, MID=MID, PRECISION=precision,
        num_warps=8,  # about twenty [16, D] tiles live: 4 warps spill more (kernel_registers.py)
    )
    return dq, dk, dv, dg, dbeta
