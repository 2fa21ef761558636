"""PyTorch kernels (chunked GLA, sliding window, Liger) against float64 step-by-step references."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from linearize.kernels import chunk_gla, liger_attention, liger_decode_step
from linearize.kernels.cumsum import blocked_cumsum
from linearize.kernels.gla.chunk import chunk_gla_torch
from linearize.kernels.gla.naive import naive_recurrent_gla
from linearize.kernels.liger.naive import (
    apply_rope,
    liger_attention_torch,
    liger_decode_step_torch,
    repeat_heads,
    sliding_window_attention,
)
from linearize.modeling import TARGETS

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def rope_tables(B: int, T: int, D: int, offset: int = 0, dtype=F64):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=F64) / D))
    ang = (torch.arange(T, dtype=F64) + offset)[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], -1)[None].expand(B, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def brute_window(q, k, v, window, scale, valid=None):
    """Softmax attention over keys t - window + 1 .. t, one query at a time (float64)."""
    B, T, Hq, D = q.shape
    k, v = repeat_heads(k, Hq), repeat_heads(v, Hq)
    out = torch.empty_like(q)
    for t in range(T):
        lo = max(0, t - window + 1)
        s = torch.einsum("bhd,bshd->bhs", q[:, t], k[:, lo : t + 1]) * scale
        if valid is not None:
            ok = valid[:, lo : t + 1].clone()
            ok[:, -1] = True
            s = s.masked_fill(~ok[:, None, :], float("-inf"))
        out[:, t] = torch.einsum("bhs,bshd->bhd", s.softmax(-1), v[:, lo : t + 1])
    return out


def naive_liger(q, k, v, *, window, mix, gate_normalizer, cos, sin, initial_state=None):
    """Liger attention from its definition: recurrent GLA on feature maps + brute-force window."""
    Hq, D = q.shape[2], q.shape[3]
    phi_q, phi_k = q.softmax(-1), k.softmax(-1)
    g = F.logsigmoid(k) / gate_normalizer
    o, s = naive_recurrent_gla(
        phi_q, repeat_heads(phi_k, Hq), repeat_heads(v, Hq), repeat_heads(g, Hq), scale=1.0,
        initial_state=initial_state, output_final_state=True,
    )
    if window > 0:
        ow = brute_window(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, window, D**-0.5)
        o = mix * ow + (1 - mix) * o
    return o, s


def gates(shape, strength):
    x = torch.randn(shape, dtype=F64)
    return F.logsigmoid(x) / 16 if strength == "weak" else F.logsigmoid(3 * x) * 4  # down to ~ -40 per step


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("strength", ["weak", "strong"])
def test_chunk_gla_matches_recurrence(T, strength):
    torch.manual_seed(T)
    B, H, K, V = 2, 3, 8, 12
    q, k = torch.randn(B, T, H, K, dtype=F64), torch.randn(B, T, H, K, dtype=F64)
    v = torch.randn(B, T, H, V, dtype=F64)
    g = gates((B, T, H, K), strength)
    h0 = torch.randn(B, H, K, V, dtype=F64)
    o, s = chunk_gla_torch(q, k, v, g, scale=0.3, initial_state=h0, output_final_state=True)
    r, rs = naive_recurrent_gla(q, k, v, g, scale=0.3, initial_state=h0, output_final_state=True)
    assert torch.isfinite(o).all()
    assert rel(o, r) < 1e-12 and rel(s, rs) < 1e-12


def test_chunk_gla_float32_strong_gates_are_finite():
    torch.manual_seed(0)
    B, T, H, K = 1, 300, 2, 16
    q, k, v = (torch.randn(B, T, H, K) for _ in range(3))
    g = (F.logsigmoid(torch.randn(B, T, H, K) * 10) * 10).float()  # exp(sum) underflows, never overflows
    o, s = chunk_gla_torch(q, k, v, g, scale=1.0, output_final_state=True)
    r, rs = naive_recurrent_gla(q.double(), k.double(), v.double(), g.double(), scale=1.0, output_final_state=True)
    assert torch.isfinite(o).all() and rel(o, r) < 1e-4 and rel(s, rs) < 1e-4


@pytest.mark.parametrize("T,window", [(1, 4), (63, 64), (64, 64), (65, 64), (200, 64), (50, 7), (130, 100)])
def test_sliding_window_matches_brute_force(T, window):
    torch.manual_seed(T + window)
    B, Hq, Hkv, D = 2, 4, 2, 8
    q = torch.randn(B, T, Hq, D, dtype=F64)
    k, v = torch.randn(B, T, Hkv, D, dtype=F64), torch.randn(B, T, Hkv, D, dtype=F64)
    out = sliding_window_attention(q, k, v, window=window, scale=0.4)
    assert rel(out, brute_window(q, k, v, window, 0.4)) < 1e-12


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 1), (6, 2)])
@pytest.mark.parametrize("window", [0, 64])
def test_liger_torch_matches_definition(T, Hq, Hkv, window):
    torch.manual_seed(T * 7 + Hq)
    B, D = 2, 8
    q = torch.randn(B, T, Hq, D, dtype=F64)
    k, v = torch.randn(B, T, Hkv, D, dtype=F64) * 2, torch.randn(B, T, Hkv, D, dtype=F64)
    cos, sin = rope_tables(B, T, D)
    h0 = torch.randn(B, Hq, D, D, dtype=F64)
    kw = dict(window=window, mix=0.3, gate_normalizer=4.0, cos=cos, sin=sin, initial_state=h0)
    o, s = liger_attention_torch(q, k, v, output_final_state=True, **kw)
    r, rs = naive_liger(q, k, v, **kw)
    assert rel(o, r) < 1e-12 and rel(s, rs) < 1e-12


def test_liger_packed_matches_separate_sequences():
    torch.manual_seed(1)
    D, Hq, Hkv, lens = 8, 4, 2, [5, 64, 70, 1]
    T = sum(lens)
    cu = torch.tensor([0] + [sum(lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32)
    q = torch.randn(1, T, Hq, D, dtype=F64)
    k, v = torch.randn(1, T, Hkv, D, dtype=F64), torch.randn(1, T, Hkv, D, dtype=F64)
    cos, sin = torch.cat([rope_tables(1, n, D)[0] for n in lens], 1), torch.cat([rope_tables(1, n, D)[1] for n in lens], 1)
    h0 = torch.randn(len(lens), Hq, D, D, dtype=F64)
    o, s = liger_attention(q, k, v, cos=cos, sin=sin, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                           backend="torch")
    for i, n in enumerate(lens):
        lo = sum(lens[:i])
        sl = slice(lo, lo + n)
        r, rs = naive_liger(q[:, sl], k[:, sl], v[:, sl], window=64, mix=0.5, gate_normalizer=16.0,
                            cos=cos[:, sl], sin=sin[:, sl], initial_state=h0[i : i + 1])
        assert rel(o[:, sl], r) < 1e-12 and rel(s[i : i + 1], rs) < 1e-12


def test_liger_left_padding_matches_unpadded():
    torch.manual_seed(2)
    B, T, Hq, Hkv, D = 2, 70, 4, 2, 8
    pad = [0, 9]
    q = torch.randn(B, T, Hq, D, dtype=F64)
    k, v = torch.randn(B, T, Hkv, D, dtype=F64), torch.randn(B, T, Hkv, D, dtype=F64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, : pad[1]] = False
    # rotary positions count real tokens only
    pos = (mask.cumsum(1) - 1).clamp_min(0).to(F64)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=F64) / D))
    ang = pos[..., None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    o, s = liger_attention(q, k, v, cos=cos, sin=sin, attention_mask=mask, output_final_state=True, backend="torch")
    for b in range(B):
        sl = slice(pad[b], T)
        r, rs = naive_liger(q[b : b + 1, sl], k[b : b + 1, sl], v[b : b + 1, sl], window=64, mix=0.5,
                            gate_normalizer=16.0, cos=cos[b : b + 1, sl], sin=sin[b : b + 1, sl])
        assert rel(o[b : b + 1, sl], r) < 1e-12 and rel(s[b : b + 1], rs) < 1e-12


@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 2)])
def test_decode_steps_continue_prefill(Hq, Hkv):
    torch.manual_seed(3)
    B, T, D, W, extra = 2, 70, 8, 16, 5
    q = torch.randn(B, T + extra, Hq, D, dtype=F64)
    k, v = torch.randn(B, T + extra, Hkv, D, dtype=F64), torch.randn(B, T + extra, Hkv, D, dtype=F64)
    cos, sin = rope_tables(B, T + extra, D)
    kw = dict(window=W, mix=0.4, gate_normalizer=8.0)
    full, _ = liger_attention_torch(q, k, v, cos=cos, sin=sin, **kw)
    _, state = liger_attention_torch(q[:, :T], k[:, :T], v[:, :T], cos=cos[:, :T], sin=sin[:, :T],
                                     output_final_state=True, **kw)
    k_rot = apply_rope(k[:, :T], cos[:, :T], sin[:, :T])
    k_ring = torch.zeros(B, Hkv, W, D, dtype=F64)
    v_ring = torch.zeros(B, Hkv, W, D, dtype=F64)
    valid = torch.zeros(B, W, dtype=torch.bool)
    for t in range(T - W, T):
        k_ring[:, :, t % W], v_ring[:, :, t % W], valid[:, t % W] = k_rot[:, t], v[:, t], True
    for t in range(T, T + extra):
        sl = slice(t, t + 1)
        o = liger_decode_step(q[:, sl], k[:, sl], v[:, sl], state, k_ring, v_ring, valid, t,
                              cos=cos[:, sl], sin=sin[:, sl], backend="torch", **kw)
        assert rel(o, full[:, sl]) < 1e-12


def test_gradients_chunk_matches_recurrence():
    torch.manual_seed(4)
    B, T, H, K, V = 1, 37, 2, 4, 5
    q, k, v = (torch.randn(B, T, H, d, dtype=F64, requires_grad=True) for d in (K, K, V))
    g = gates((B, T, H, K), "strong").requires_grad_()
    h0 = torch.randn(B, H, K, V, dtype=F64, requires_grad=True)
    do, dh = torch.randn(B, T, H, V, dtype=F64), torch.randn(B, H, K, V, dtype=F64)

    def grads(fn):
        o, s = fn(q, k, v, g, scale=0.5, initial_state=h0, output_final_state=True)
        return torch.autograd.grad((o * do).sum() + (s * dh).sum(), (q, k, v, g, h0))

    for a, b in zip(grads(chunk_gla_torch), grads(naive_recurrent_gla), strict=True):
        assert rel(a, b) < 1e-10


def test_gradcheck_liger_torch():
    torch.manual_seed(5)
    B, T, Hq, Hkv, D = 1, 20, 2, 1, 4
    q = torch.randn(B, T, Hq, D, dtype=F64, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, dtype=F64, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, dtype=F64, requires_grad=True)
    h0 = torch.randn(B, Hq, D, D, dtype=F64, requires_grad=True)
    cos, sin = rope_tables(B, T, D)

    def fn(q, k, v, h0):
        o, s = liger_attention_torch(q, k, v, window=6, mix=0.5, gate_normalizer=2.0, cos=cos, sin=sin,
                                     initial_state=h0, output_final_state=True)
        return o, s

    assert torch.autograd.gradcheck(fn, (q, k, v, h0), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_dispatch_packed_chunk_gla():
    torch.manual_seed(6)
    lens, H, K = [3, 64, 66], 2, 8
    cu = torch.tensor([0, 3, 67, 133], dtype=torch.int32)
    q, k, v = (torch.randn(1, sum(lens), H, K, dtype=F64) for _ in range(3))
    g = gates((1, sum(lens), H, K), "weak")
    o, s = chunk_gla(q, k, v, g, scale=1 / math.sqrt(K), output_final_state=True, cu_seqlens=cu, backend="torch")
    for i in range(3):
        sl = slice(int(cu[i]), int(cu[i + 1]))
        r, rs = naive_recurrent_gla(q[:, sl], k[:, sl], v[:, sl], g[:, sl], scale=1 / math.sqrt(K),
                                    output_final_state=True)
        assert rel(o[:, sl], r) < 1e-12 and rel(s[i : i + 1], rs) < 1e-12


def test_decode_torch_reference_matches_prefill_one_token():
    """liger_decode_step_torch on an empty cache equals the one-token forward."""
    torch.manual_seed(7)
    B, Hq, Hkv, D, W = 2, 4, 2, 8, 4
    q, k, v = torch.randn(B, 1, Hq, D, dtype=F64), torch.randn(B, 1, Hkv, D, dtype=F64), torch.randn(B, 1, Hkv, D, dtype=F64)
    cos, sin = rope_tables(B, 1, D)
    state = torch.zeros(B, Hq, D, D, dtype=F64)
    kr, vr = torch.zeros(B, Hkv, W, D, dtype=F64), torch.zeros(B, Hkv, W, D, dtype=F64)
    valid = torch.zeros(B, W, dtype=torch.bool)
    o = liger_decode_step_torch(q, k, v, state, kr, vr, valid, 0, window=W, mix=0.5, gate_normalizer=16.0, cos=cos, sin=sin)
    r, rs = liger_attention_torch(q, k, v, window=W, cos=cos, sin=sin, output_final_state=True)
    assert rel(o, r) < 1e-12 and rel(state, rs) < 1e-12 and bool(valid[:, 0].all())


def test_packed_input_with_an_empty_segment_keeps_its_state():
    from linearize.kernels import chunk_gla

    q = torch.randn(1, 10, 2, 8, dtype=torch.float64)
    g = -torch.rand(1, 10, 2, 8, dtype=torch.float64)
    h0 = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    cu = torch.tensor([0, 4, 4, 10])
    o, state = chunk_gla(q, q, q, g, scale=1.0, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend="torch")
    assert o.shape == q.shape and torch.equal(state[1], h0[1])


@pytest.mark.parametrize("target", ["mamba2", "hgrn2"])
def test_target_feature_maps(target):
    from linearize.kernels.liger.naive import feature_maps

    q, k, v = (torch.randn(2, 5, 3, 8, dtype=torch.float64) for _ in range(3))
    phi_q, phi_k, _, log_gate = feature_maps(q, k, v, 16.0, None, target=target)
    torch.testing.assert_close(phi_q.sum(-1), torch.ones(2, 5, 3, dtype=torch.float64))
    assert (log_gate <= 0).all()
    if target == "mamba2":  # one decay per head: every channel of a head decays alike
        assert torch.equal(log_gate, log_gate[..., :1].expand_as(log_gate))
        torch.testing.assert_close(phi_k.sum(-1), torch.ones(2, 5, 3, dtype=torch.float64))
    else:  # hgrn2: the key is the input gate tied to the forget gate
        torch.testing.assert_close(phi_k, 1 - log_gate.exp())


@pytest.mark.parametrize("target", ["mamba2", "hgrn2"])
def test_target_chunked_form_matches_the_materialised_matrix(target):
    from linearize.kernels.liger.naive import liger_attention_torch, liger_mixing_matrix, repeat_heads

    B, T, Hq, Hkv, D = 2, 70, 4, 2, 8
    q, k = torch.randn(B, T, Hq, D, dtype=torch.float64) * 3, torch.randn(B, T, Hkv, D, dtype=torch.float64) * 3
    v = torch.randn(B, T, Hkv, D, dtype=torch.float64)
    ang = torch.randn(1, T, D // 2, dtype=torch.float64)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    mixing = liger_mixing_matrix(q, k, window=8, cos=cos, sin=sin, target=target)
    expected = torch.einsum("bhts,bshd->bthd", mixing, repeat_heads(v, Hq))
    got, _ = liger_attention_torch(q, k, v, window=8, cos=cos, sin=sin, target=target)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("window", [0, 8])
def test_hedgehog_matches_its_definition(window):
    """The blocked form against the dense formula: window softmax terms and linear terms of the tokens that
    left the window, over one shared normaliser; GQA, left padding."""
    from linearize.kernels.hedgehog.naive import HedgehogFeatureMap, hedgehog_attention_torch
    from linearize.kernels.liger.naive import apply_rope, repeat_heads

    torch.manual_seed(window)
    B, T, Hq, Hkv, D = 2, 37, 4, 2, 8
    q, k = torch.randn(B, T, Hq, D, dtype=torch.float64), torch.randn(B, T, Hkv, D, dtype=torch.float64)
    v = torch.randn(B, T, Hkv, D, dtype=torch.float64)
    fq, fk = HedgehogFeatureMap(Hq, D).double(), HedgehogFeatureMap(Hkv, D).double()
    with torch.no_grad():
        fq.weight.add_(0.3 * torch.randn_like(fq.weight))
        fk.weight.add_(0.3 * torch.randn_like(fk.weight))
        phi_q, phi_k = fq(q), fk(k)
    ang = torch.randn(1, T, D // 2, dtype=torch.float64)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :5] = False
    got, _ = hedgehog_attention_torch(q, k, v, phi_q, phi_k, window=window, cos=cos, sin=sin, attention_mask=valid)

    kr, vr, pk = repeat_heads(apply_rope(k, cos, sin), Hq), repeat_heads(v, Hq), repeat_heads(phi_k, Hq)
    qr = apply_rope(q, cos, sin)
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    in_window = (s <= t) & (s > t - window)
    linear = s <= t - window
    soft = torch.einsum("bthd,bshd->bhts", qr, kr).mul(D**-0.5).exp()
    lin = torch.einsum("bthf,bshf->bhts", phi_q, pk)
    seen = valid[:, None, None, :]
    weights = torch.where(in_window & seen, soft, 0.0) + torch.where(linear & seen, lin, 0.0)
    expected = torch.einsum("bhts,bshd->bthd", weights / weights.sum(-1, keepdim=True), vr)
    real = valid[:, :, None, None].expand_as(got)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [0, 8])
@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed"])
def test_hedgehog_chunked_equals_the_blocked_form(window, resumed):
    """The chunked form (linear part on chunk_gla, keys fed W steps late; window normaliser through its
    log-sum-exp) against the blocked reference in float64: outputs, final (S, z) and the gradients
    of q, k, v and both feature maps; with a cached state and window prefix too."""
    from linearize.kernels.hedgehog.chunk import hedgehog_attention_chunked
    from linearize.kernels.hedgehog.naive import hedgehog_attention_torch

    from .helpers import hedgehog_inputs, hedgehog_outputs

    xs, kw = hedgehog_inputs(2, 37, 4, 2, 8, window, resumed, seed=window + resumed)
    d_o = torch.randn(2, 37, 4, 8, dtype=torch.float64)
    got, ref = (hedgehog_outputs(fn, xs, kw, d_o, torch.float64) for fn in (hedgehog_attention_chunked, hedgehog_attention_torch))
    for name, a, b in zip(("o", "S", "z"), got[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    for name, a, b in zip(("dq", "dk", "dv", "dphi_q", "dphi_k"), got[3:], ref[3:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_gated_delta_rule_matches_its_matrix_form():
    """gdn's in-place step against S_t = diag(a_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T written with
    explicit matrices (float64, GQA, a left-padded row that must start from an empty state)."""
    import torch.nn.functional as F

    from linearize.kernels.gdn.naive import gdn_attention_torch

    torch.manual_seed(3)
    B, T, Hq, Hkv, D = 2, 12, 4, 2, 8
    q, k = torch.randn(B, T, Hq, D, dtype=torch.float64), torch.randn(B, T, Hkv, D, dtype=torch.float64) * 2
    v = torch.randn(B, T, Hkv, D, dtype=torch.float64)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :3] = False
    got, state = gdn_attention_torch(q, k, v, window=0, attention_mask=valid)
    eye = torch.eye(D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            S = torch.zeros(D, D, dtype=torch.float64)
            for t in range(T):
                if valid[b, t]:
                    kt = F.normalize(k[b, t, g], dim=0)
                    a = torch.exp(F.logsigmoid(k[b, t, g]) / 16)
                    beta = torch.sigmoid(k[b, t, g].mean())
                    S = torch.diag(a) @ (eye - beta * torch.outer(kt, kt)) @ S + beta * torch.outer(kt, v[b, t, g])
                    expected = F.normalize(q[b, t, h], dim=0) @ S
                    torch.testing.assert_close(got[b, t, h], expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(state[b, h], S, rtol=1e-12, atol=1e-12)


def test_gated_slot_attention_matches_its_definition():
    """gsa's in-place step against the slot recurrences written out per head (float64, GQA, left padding)."""
    import torch.nn.functional as F

    from linearize.kernels.gsa.naive import gsa_attention_torch

    torch.manual_seed(4)
    B, T, Hq, Hkv, D, m = 2, 10, 4, 2, 8, 4
    q, k = torch.randn(B, T, Hq, D, dtype=torch.float64), torch.randn(B, T, Hkv, D, dtype=torch.float64) * 2
    v = torch.randn(B, T, Hkv, D, dtype=torch.float64)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :2] = False
    got, (keys, values) = gsa_attention_torch(q, k, v, window=0, slots=m, attention_mask=valid)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            K, V = torch.zeros(m, D, dtype=torch.float64), torch.zeros(m, D, dtype=torch.float64)
            for t in range(T):
                if not valid[b, t]:
                    continue
                a = torch.exp(F.logsigmoid(k[b, t, g]).view(m, D // m).mean(-1) / 16)[:, None]
                K = a * K + (1 - a) * k[b, t, g].softmax(0)[None, :]
                V = a * V + (1 - a) * v[b, t, g][None, :]
                expected = V.T @ (K @ q[b, t, h].softmax(0)).softmax(0)
                torch.testing.assert_close(got[b, t, h], expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(keys[b, h], K)
            torch.testing.assert_close(values[b, h], V)


def recurrence_inputs(T: int, seed: int, padded: bool):
    """float64 q [2, T, 4, 16], k (strong: x3) and v [2, T, 2, 16] needing grad; validity with the
    first 5 steps of row 0 padded if asked."""
    torch.manual_seed(seed)
    B, Hq, Hkv, D = 2, 4, 2, 16
    q = torch.randn(B, T, Hq, D, dtype=torch.float64, requires_grad=True)
    k = (torch.randn(B, T, Hkv, D, dtype=torch.float64) * 3).requires_grad_()
    v = torch.randn(B, T, Hkv, D, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(B, T, dtype=torch.bool)
    if padded:
        valid[0, :5] = False
    return q, k, v, valid


@pytest.mark.parametrize("T, window, padded, resumed", [(1, 0, False, False), (37, 0, True, False), (40, 6, False, True)])
def test_chunked_gated_slot_attention_equals_the_step_by_step_reference(T, window, padded, resumed):
    """gsa's two-pass chunked form (scores pass + chunk_gla) against the step reference: outputs, slot
    memories and gradients, float64, GQA, strong gates, padding, a carried state."""
    from linearize.kernels.gsa.chunk import gsa_attention_chunked
    from linearize.kernels.gsa.naive import gsa_attention_torch

    B, Hq, D, m = 2, 4, 16, 4
    q, k, v, valid = recurrence_inputs(T, seed=T + window, padded=padded)
    state = (torch.randn(B, Hq, m, D, dtype=torch.float64), torch.randn(B, Hq, m, D, dtype=torch.float64))
    cos, sin = rope_tables(B, T, D)
    kw = dict(window=window, slots=m, gate_normalizer=2.0, cos=cos.double(), sin=sin.double(),
              attention_mask=valid if padded else None, initial_state=state if resumed else None)
    o, (keys, values) = gsa_attention_chunked(q, k, v, **kw)
    r, (rkeys, rvalues) = gsa_attention_torch(q, k, v, **kw)
    torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(keys, rkeys, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(values, rvalues, rtol=1e-10, atol=1e-10)
    do = torch.randn_like(o)
    got = torch.autograd.grad((o * do).sum() + keys.sum() + values.sum(), (q, k, v))
    ref = torch.autograd.grad((r * do).sum() + rkeys.sum() + rvalues.sum(), (q, k, v))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("T, window, padded, resumed", [(1, 0, False, False), (37, 0, True, False), (40, 6, False, True)])
def test_chunked_gated_deltanet_equals_the_step_by_step_reference(T, window, padded, resumed):
    """gdn's chunked form (per-channel gates: reads solved per chunk) against the step reference:
    outputs, final state and gradients, float64, GQA, strong gates, padding, a carried state."""
    from linearize.kernels.gdn.chunk import gdn_attention_chunked
    from linearize.kernels.gdn.naive import gdn_attention_torch

    B, Hq, D = 2, 4, 16
    q, k, v, valid = recurrence_inputs(T, seed=T + window + 1, padded=padded)
    state = torch.randn(B, Hq, D, D, dtype=torch.float64)
    cos, sin = rope_tables(B, T, D)
    kw = dict(window=window, gate_normalizer=2.0, cos=cos, sin=sin, attention_mask=valid if padded else None,
              initial_state=state if resumed else None)
    o, s = gdn_attention_chunked(q, k, v, **kw)
    r, rs = gdn_attention_torch(q, k, v, **kw)
    torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, rs, rtol=1e-10, atol=1e-10)
    do = torch.randn_like(o)
    got = torch.autograd.grad((o * do).sum() + s.sum(), (q, k, v))
    ref = torch.autograd.grad((r * do).sum() + rs.sum(), (q, k, v))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_segment_length_follows_the_rounds_of_programs_the_sms_hold(monkeypatch):
    """liger/segmented.py's choice, on a pretend 132-SM GPU (two sweeps an SM at heads of 64, one at 128):
    near-equal segments that fit the grid in as few rounds of as few rows as it can, kept whole where
    splitting would not pay for itself, and the choices the seventeenth session measured."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from linearize.kernels.liger import segmented

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    gpu = torch.device("cuda")
    # SmolLM2 at 4096 (36 programs): 7 segments of 592 fill 252 of 264 in one round; 640 rows would
    # also take one round but of 640 rows, 512 rows two rounds (288 programs)
    assert segmented.segment_length(4, 4096, 9, 64, gpu) == 592
    assert segmented._rounds(36, 4096, 592, 264) == 592
    assert segmented._rounds(36, 4096, 640, 264) == 640
    assert segmented._rounds(36, 4096, 512, 264) == 1024
    assert segmented.segment_length(8, 2048, 9, 64, gpu) == 192  # 792 programs, 3 rounds of 192 rows
    assert segmented.segment_length(8, 1024, 9, 64, gpu) == 160  # 504 programs, 2 rounds of 160
    assert segmented.segment_length(16, 1024, 9, 64, gpu) is None  # 144 programs: 624 rows split, not worth it
    with segmented.recording():  # ... unless a CUDA graph replays the pass: then the launches cost no host time
        assert segmented.segment_length(16, 1024, 9, 64, gpu) == 208  # 720 programs, 3 rounds of 208 rows
    assert not segmented.RECORDING
    assert segmented.segment_length(4, 2048, 16, 64, gpu) == 512  # 256 programs, one round
    assert segmented.segment_length(1, 4096, 32, 128, gpu) == 1024  # 128 of 132, one round
    assert segmented.segment_length(1, 32768, 32, 128, gpu) == 2048  # no longer than MAX_ROWS
    assert segmented.segment_length(4, 4096, 32, 128, gpu) is None  # 128 of 132 already
    assert segmented.segment_length(8, 1024, 32, 128, gpu) is None  # two full rounds already
    for batch, length, heads, dim in [(4, 4096, 9, 64), (8, 1024, 9, 64), (1, 32768, 32, 128), (2, 2000, 4, 64)]:
        rows = segmented.segment_length(batch, length, heads, dim, gpu)
        pieces = -(-length // rows)
        assert rows % 16 == 0 and segmented.MIN_ROWS <= rows <= segmented.MAX_ROWS
        assert length - (pieces - 1) * rows > rows - 16 * pieces  # near equal: the last one is not a stub
    assert segmented.segment_length(1, 4096, 8, 256, gpu) is None  # heads over 128 stay whole
    assert segmented.segment_length(4, 500, 9, 64, gpu) is None  # short sequences stay whole
    assert segmented.segment_length(4, 4096, 9, 64, torch.device("cpu")) is None
    monkeypatch.setenv("LINEARIZE_SEGMENTS", "0")
    assert segmented.segment_length(4, 4096, 9, 64, gpu) is None
    monkeypatch.setattr(segmented, "SEGMENT_LEN", 48)
    assert segmented.segment_length(4, 4096, 9, 64, torch.device("cpu")) == 48


def test_cached_launch_key_separates_what_triton_specialises():
    """kernels/launch.py reuses a compiled kernel only under an equal key: tensors differ by dtype and by
    16-byte alignment, integers by width class, by being 1 and by dividing by 16, bools from integers;
    an argument of another kind is refused (that launch takes Triton's own path)."""
    pytest.importorskip("triton")
    from linearize.kernels.launch import _arg_key

    x = torch.zeros(64, dtype=torch.bfloat16)
    assert x.data_ptr() % 16 == 0
    assert _arg_key(x) == _arg_key(torch.zeros(8, dtype=torch.bfloat16))
    assert len({_arg_key(x), _arg_key(x[1:]), _arg_key(x[8:]), _arg_key(x.half())}) == 3  # x[8:] is 16 bytes on
    ints = (1, 16, 17, 2**31, 2**31 + 1, 2**63)
    assert len({_arg_key(i) for i in ints}) == len(ints)
    assert _arg_key(17) == _arg_key(33) and _arg_key(16) == _arg_key(48)
    assert _arg_key(True) != _arg_key(1) and _arg_key(None) is None and _arg_key(0.5) == _arg_key(2.0)
    with pytest.raises(TypeError):
        _arg_key("a string")


def test_chunk_kernels_follow_the_float32_matmul_precision():
    """gdn/gsa chunk kernels' fp32 products: three TF32 passes under PyTorch's default "highest", one
    where set_float32_matmul_precision allows TF32 (CUDA autocast, which also gives one, needs a GPU)."""
    pytest.importorskip("triton")
    from linearize.kernels.gla.chunk_triton import dot_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_precision() == "tf32x3"
        torch.set_float32_matmul_precision("high")
        assert dot_precision() == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


NO_TRITON = """
import sys
from pathlib import Path

sys.modules["triton"] = None  # as on a machine without it: `import triton` raises ImportError
import torch
from transformers import AutoModelForCausalLM

from linearize.convert import convert
from linearize.modeling import TARGETS

for target in TARGETS:
    out = convert(sys.argv[1], Path(sys.argv[2]) / target, target=target, slots=4)  # heads of 8
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    model(ids, labels=ids).loss.backward()
    print(target)
"""


def test_every_target_converts_and_trains_without_triton(tmp_path):
    """Triton is an optional extra (`[cuda]`): without it `linearize` still imports, converts to every
    target and trains on the CPU (a top-level import of a Triton module in hedgehog's layer once broke that)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    proc = subprocess.run([sys.executable, "-c", NO_TRITON, str(root / "tests" / "fixtures" / "stories260k"),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == list(TARGETS)


@pytest.mark.parametrize("T", [0, 1, 63, 64, 65, 200])
@pytest.mark.parametrize("reverse", [False, True])
def test_blocked_cumsum_equals_torch_cumsum(T, reverse):
    """The two-level scan against torch.cumsum along a middle dimension, forward and from the end,
    in float64 and summed into float32 from bf16, with its gradient."""
    x = torch.randn(2, T, 3, 5, dtype=F64, requires_grad=True)
    expected = x.flip(1).cumsum(1).flip(1) if reverse else x.cumsum(1)
    got = blocked_cumsum(x, 1, reverse=reverse)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if T:
        w = torch.randn_like(expected)
        torch.testing.assert_close(torch.autograd.grad((got * w).sum(), x)[0],
                                   torch.autograd.grad((expected * w).sum(), x)[0], rtol=1e-12, atol=1e-12)
    low = x.detach().to(torch.bfloat16)
    summed = blocked_cumsum(low, -3, reverse=reverse, dtype=torch.float32)
    assert summed.dtype == torch.float32
    torch.testing.assert_close(summed, (low.flip(1).cumsum(1, dtype=torch.float32).flip(1) if reverse
                                        else low.cumsum(1, dtype=torch.float32)), rtol=1e-5, atol=1e-5)
