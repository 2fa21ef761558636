"""Triton kernels against the float64 references, run on the CPU by Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported, so the checks run in one
worker process (this file run as a script, with the variable set) and each pytest test reads
its own check's result. Shapes are tiny (the interpreter runs each program in numpy);
benchmarks/kernel_check.py runs the full table on a GPU. Outputs are filled with NaN before
every launch (chunk_triton.POISON_OUTPUTS), so an unwritten element fails its check.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from linearize.cache import CACHE_KWARG
from linearize.kernels.gla.naive import naive_recurrent_gla
from linearize.kernels.liger.naive import liger_decode_step_torch

F64 = torch.float64
CHECKS = {}  # name -> function(ops), filled by @check below


def check(name):
    def deco(fn):
        CHECKS[name] = fn
        return fn

    return deco


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite (unwritten?) output"
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def rope(B, T, D, offset=0):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=F64) / D))
    ang = (torch.arange(T, dtype=F64) + offset)[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], -1)[None].expand(B, T, D).contiguous()
    return emb.cos().float(), emb.sin().float()


def liger_grads(q, k, v, h0, do, dh, backend, **kw):
    cast = F64 if backend == "torch" else torch.float32
    xs = [x.detach().to(cast).requires_grad_() for x in (q, k, v, h0)]
    cos, sin = kw.pop("cos"), kw.pop("sin")
    o, s = kernels().liger_attention(*xs[:3], initial_state=xs[3], output_final_state=True, cos=cos.to(cast),
                             sin=sin.to(cast), backend=backend, **kw)
    loss = (o * do.to(cast)).sum() + (s * dh.to(s.dtype)).sum()
    return (o, s), torch.autograd.grad(loss, xs)


def assert_liger_matches_reference(q, k, v, h0, do, dh, **kw):
    """Triton (fp32) against the float64 PyTorch reference: o, final state, dq, dk, dv, dh0 within 1e-4."""
    (o, s), got = liger_grads(q, k, v, h0, do, dh, "triton", **dict(kw))
    (r, rs), ref = liger_grads(q, k, v, h0, do, dh, "torch", **dict(kw))
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert rel(o, r) < 1e-4 and rel(s, rs) < 1e-4
    for name, a, b in zip(("dq", "dk", "dv", "dh0"), got, ref, strict=True):
        assert rel(a, b) < 1e-4, name


CASES = [  # (T, Hq, Hkv, window, strong[, head_dim]); the window kernels run from head_dim 32 (at 16 the window
    # backward takes PyTorch and the forward keeps the window inside the sweep)
    (1, 2, 2, 64, False),
    (17, 4, 2, 64, True),
    (64, 2, 1, 64, False),
    (65, 2, 2, 64, True),
    (70, 4, 1, 5, False),
    (33, 2, 2, 0, False),
    (40, 2, 2, 100, False),  # window beyond the kernel's 64: PyTorch fallback
    (150, 8, 1, 64, False),  # GQA 8 (8 query heads' rows summed into one kv row), windows across 3 query blocks
    (150, 4, 2, 64, False, 32),  # the Triton window backward (dk/dv programs of 32 and 64 key rows)
    (70, 2, 2, 20, True, 32),
]


def liger_case(T, Hq, Hkv, window, strong, D=16):
    torch.manual_seed(T + 10 * Hq + window)
    B = 2
    q, v = torch.randn(B, T, Hq, D), torch.randn(B, T, Hkv, D)
    k = torch.randn(B, T, Hkv, D) * (3.0 if strong else 1.0)
    h0 = torch.randn(B, Hq, D, D) * 0.3
    do, dh = torch.randn(B, T, Hq, D), torch.randn(B, Hq, D, D)
    cos, sin = rope(B, T, D)
    kw = dict(window=window, mix=0.3, gate_normalizer=1.0 if strong else 16.0, cos=cos, sin=sin)
    assert_liger_matches_reference(q, k, v, h0, do, dh, **kw)


@check("liger_forward_split_value_columns")
def liger_split_value_columns():
    """The forward with its value columns split across programs (FORWARD_LAUNCH block_v < D, as
    benchmarks/recover_throughput.py --gla-launch tries): the same outputs, state and gradients."""
    from linearize.kernels.gla import chunk_triton  # noqa: PLC0415

    chunk_triton.FORWARD_LAUNCH = {"block_v": 16, "num_warps": 8}
    try:
        liger_case(70, 4, 2, 64, False, D=32)
    finally:
        chunk_triton.FORWARD_LAUNCH = {}


@check("liger_window_inside_the_sweep")
def liger_window_inside_the_sweep():
    """The forward with the window inside the GLA sweep (FORWARD_LAUNCH split_window 0; heads of 16
    and wider than 128 always take it): the same outputs, state and gradients as the split form,
    also for segments, whose window loads the rows before them."""
    from linearize.kernels.gla import chunk_triton  # noqa: PLC0415

    chunk_triton.FORWARD_LAUNCH = {"split_window": 0}
    try:
        liger_case(150, 4, 2, 64, False, D=32)
        segmented_case(150, 2, 2, 20, True, 32)
    finally:
        chunk_triton.FORWARD_LAUNCH = {}


@check("sweeps_without_prefetch")
def sweeps_without_prefetch():
    """The sweeps with each block loading its own rows when it starts (launch settings prefetch 0), the form
    the prefetching default is timed against: the same Liger and chunk_gla results, whole and in segments,
    packed sequences with an empty one included."""
    from linearize.kernels.gla import backward_triton, chunk_triton  # noqa: PLC0415

    chunk_triton.FORWARD_LAUNCH = {"prefetch": 0}
    backward_triton.BACKWARD_LAUNCH = {"dq_prefetch": 0, "dkv_prefetch": 0}
    try:
        liger_case(150, 4, 2, 64, False, D=32)
        segmented_case(150, 4, 2, 64, False, 48)
        chunk_gla_packed_empty()
    finally:
        chunk_triton.FORWARD_LAUNCH = {}
        backward_triton.BACKWARD_LAUNCH = {}


@contextmanager
def segments_of(rows: int):
    """Liger attention on the Triton path cuts every sequence into segments of `rows` (liger/segmented.py)."""
    from linearize.kernels.liger import segmented  # noqa: PLC0415

    segmented.SEGMENT_LEN = rows
    try:
        yield
    finally:
        segmented.SEGMENT_LEN = None


def segmented_case(T, Hq, Hkv, window, strong, rows):
    """Sequences cut into segments of `rows`: o, final state and every gradient as the float64
    reference, across boundaries where the window looks back 1 to 4 blocks."""
    with segments_of(rows):
        liger_case(T, Hq, Hkv, window, strong, D=32)


for _s in [(150, 4, 2, 64, False, 48), (150, 2, 2, 20, True, 32), (96, 2, 1, 0, False, 32), (64, 2, 2, 64, False, 16),
           (77, 2, 2, 5, False, 32)]:
    CHECKS["liger_segmented_T{}_Hq{}_Hkv{}_W{}_{}_rows{}".format(*_s[:4], "strong" if _s[4] else "weak", _s[5])] = (
        lambda c=_s: segmented_case(*c))


def segment_states_case(B, T, Hq, Hkv, D, rows, with_states, strong):
    """liger/segment_states_triton.py's kernels (boundary states forward, their gradients backward)
    against their float64 PyTorch references, within 1e-5."""
    from linearize.kernels.liger import segment_states_triton as st  # noqa: PLC0415

    torch.manual_seed(T + rows + D)
    q, do = torch.randn(B, T, Hq, D), torch.randn(B, T, Hq, D)
    k, v = torch.randn(B, T, Hkv, D) * (3.0 if strong else 1.0), torch.randn(B, T, Hkv, D)
    h0, dht = (torch.randn(B, Hq, D, D), torch.randn(B, Hq, D, D)) if with_states else (None, None)
    gate_mult = 1.0 if strong else 1 / 16
    got = st.segment_states(k, v, h0, rows, gate_mult, Hq)
    ref = st.segment_states_torch(k.double(), v.double(), h0 if h0 is None else h0.double(), rows, gate_mult, Hq)
    for name, a, b in zip(("entering", "leaving", "totals"), got, ref, strict=True):
        assert a.shape == b.shape and rel(a, b) < 1e-5, name
    grads = st.segment_state_grads(q, k, do, dht, got[2], rows, gate_mult)
    ref_grads = st.segment_state_grads_torch(q.double(), k.double(), do.double(), dht if dht is None else dht.double(),
                                             ref[2], rows, gate_mult)
    assert grads.shape == ref_grads.shape and rel(grads, ref_grads) < 1e-5


for _s in [(2, 150, 4, 2, 32, 64, True, False), (1, 70, 2, 2, 16, 32, False, True), (2, 96, 3, 1, 32, 48, True, True),
           (1, 130, 2, 1, 64, 64, False, False), (1, 100, 2, 2, 128, 64, True, False)]:
    CHECKS["segment_states_B{}_T{}_Hq{}_Hkv{}_D{}_rows{}_{}_{}".format(
        *_s[:6], "states" if _s[6] else "zeros", "strong" if _s[7] else "weak")] = lambda c=_s: segment_states_case(*c)


def fp16_case(seed, T, Hq, Hkv, segment_rows=None):
    """Half-precision I/O against float64 (one batch row, heads of 32). (fp16, not bf16: the
    interpreter's numpy has no bfloat16 maths, so bf16 runs are checked on the GPU by
    benchmarks/kernel_check.py.)"""
    torch.manual_seed(seed)
    B, D = 1, 32
    q, k, v = (torch.randn(B, T, h, D).to(torch.float16) for h in (Hq, Hkv, Hkv))
    cos, sin = rope(B, T, D)
    with segments_of(segment_rows) if segment_rows else nullcontext():
        o, s = kernels().liger_attention(q, k, v, cos=cos, sin=sin, output_final_state=True, backend="triton")
    r, rs = kernels().liger_attention(q.double(), k.double(), v.double(), cos=cos.double(), sin=sin.double(),
                                      output_final_state=True, backend="torch")
    assert o.dtype == torch.float16
    assert rel(o, r) < 5e-3 and rel(s, rs) < 5e-3


CHECKS["liger_fp16"] = lambda: fp16_case(12, 40, 2, 1)
CHECKS["liger_segmented_fp16"] = lambda: fp16_case(15, 90, 4, 2, segment_rows=32)  # T not a multiple of the segment


@check("liger_packed")
def liger_packed():
    torch.manual_seed(11)
    D, Hq, Hkv, lens = 32, 4, 2, [5, 33, 1, 20]
    T = sum(lens)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    q, k, v = torch.randn(1, T, Hq, D), torch.randn(1, T, Hkv, D), torch.randn(1, T, Hkv, D)
    cos, sin = torch.cat([rope(1, n, D)[0] for n in lens], 1), torch.cat([rope(1, n, D)[1] for n in lens], 1)
    h0 = torch.randn(len(lens), Hq, D, D) * 0.3
    do, dh = torch.randn(1, T, Hq, D), torch.randn(len(lens), Hq, D, D)
    kw = dict(window=64, cos=cos, sin=sin, cu_seqlens=cu)
    assert_liger_matches_reference(q, k, v, h0, do, dh, **kw)


@check("liger_fp16_strong_gates")
def liger_fp16_strong():
    """Strong gates put exp(60)-sized factors in the diagonal block: fp16 must not overflow."""
    torch.manual_seed(14)
    B, T, H, D = 1, 40, 2, 16
    q, v = torch.randn(B, T, H, D).half(), torch.randn(B, T, H, D).half()
    k = torch.randn(B, T, H, D).half()
    k[:, :, :, 0] = -40.0  # channel 0 decays by exp(-40) per step at gate_normalizer 1
    cos, sin = rope(B, T, D)
    kw = dict(cos=cos, sin=sin, gate_normalizer=1.0, output_final_state=True)
    o, s = kernels().liger_attention(q, k, v, backend="triton", **kw)
    r, rs = kernels().liger_attention(q.double(), k.double(), v.double(), backend="torch",
                                      **dict(kw, cos=cos.double(), sin=sin.double()))
    assert rel(o, r) < 5e-3 and rel(s, rs) < 5e-3


@check("liger_fp16_grads")
def liger_fp16_grads():
    """Half-precision gradients (products in fp16, the diagonal block in fp32) against float64:
    relative error < 1e-2 (fp16 keeps 11 bits; the forward's bound is 5e-3)."""
    torch.manual_seed(16)
    B, T, Hq, Hkv, D = 1, 70, 4, 2, 32
    q, k, v = (torch.randn(B, T, h, D) for h in (Hq, Hkv, Hkv))
    do = torch.randn(B, T, Hq, D)
    cos, sin = rope(B, T, D)

    def grads(cast, backend):
        xs = [x.to(cast).requires_grad_() for x in (q, k, v)]
        o, _ = kernels().liger_attention(*xs, cos=cos.to(cast), sin=sin.to(cast), gate_normalizer=4.0,
                                         backend=backend)
        return torch.autograd.grad((o.float() * do).sum(), xs)

    for name, a, b in zip(("dq", "dk", "dv"), grads(torch.float16, "triton"), grads(F64, "torch"), strict=True):
        assert a.dtype == torch.float16
        assert rel(a, b) < 1e-2, name


def composed_case(target, gate, D=16):
    """Other targets' maps and the gate ablations: PyTorch maps + Triton chunk_gla + the window (heads of 32
    and more: on the Liger window kernels, liger/window_triton.py; of 16: banded PyTorch)."""
    torch.manual_seed(18)
    B, T, Hq, Hkv = 2, 37, 4, 2
    q, k, v = (torch.randn(B, T, h, D) for h in (Hq, Hkv, Hkv))
    log_gate = F.logsigmoid(torch.randn(B, T, Hkv, D)) / 4 if gate else None
    h0, do, dh = torch.randn(B, Hq, D, D) * 0.3, torch.randn(B, T, Hq, D), torch.randn(B, Hq, D, D)
    cos, sin = rope(B, T, D)

    def run(backend, cast):
        xs = [x.detach().to(cast).requires_grad_() for x in (q, k, v, h0)]
        lg = None if log_gate is None else log_gate.to(cast)
        o, s = kernels().liger_attention(*xs[:3], window=8, cos=cos.to(cast), sin=sin.to(cast), initial_state=xs[3],
                                         output_final_state=True, log_gate=lg, target=target, backend=backend)
        return (o, s), torch.autograd.grad((o * do.to(cast)).sum() + (s * dh.to(cast)).sum(), xs)

    (o, s), got = run("triton", torch.float32)
    (r, rs), ref = run("torch", F64)
    assert rel(o, r) < 1e-4 and rel(s, rs) < 1e-4
    for name, a, b in zip(("dq", "dk", "dv", "dh0"), got, ref, strict=True):
        assert rel(a, b) < 1e-4, name


for _target, _gate in (("mamba2", False), ("hgrn2", False), ("gla", True)):
    CHECKS[f"composed_{_target}{'_log_gate' if _gate else ''}"] = lambda t=_target, g=_gate: composed_case(t, g)
CHECKS["composed_mamba2_triton_window_D32"] = lambda: composed_case("mamba2", False, D=32)


def hedgehog_case(window, resumed, D=16, T=37, padded=True):
    """hedgehog's chunked form with its linear part on the Triton chunk_gla (fp32) against the blocked
    PyTorch reference in float64: outputs, final (S, z), gradients of q, k, v and both feature maps.
    Unpadded and not resumed, at heads of 32 or more, the window runs on the Liger window kernels too
    (hedgehog/window_triton.py: its output and log-sum-exp, the lse's gradient in the backward)."""
    from helpers import hedgehog_inputs, hedgehog_outputs  # noqa: PLC0415 - the worker runs as a script, tests/ first on its path

    from linearize.kernels.hedgehog.chunk import hedgehog_attention_chunked  # noqa: PLC0415
    from linearize.kernels.hedgehog.naive import hedgehog_attention_torch  # noqa: PLC0415

    xs, kw = hedgehog_inputs(2, T, 4, 2, D, window, resumed, seed=7, padded=padded)
    d_o = torch.randn(2, T, 4, D, dtype=F64)
    got = hedgehog_outputs(lambda *a, **k: hedgehog_attention_chunked(*a, **k, backend="triton"), xs, kw, d_o,
                           torch.float32)
    ref = hedgehog_outputs(hedgehog_attention_torch, xs, kw, d_o, F64)
    for name, a, b in zip(("o", "S", "z", "dq", "dk", "dv", "dphi_q", "dphi_k"), got, ref, strict=True):
        assert rel(a, b) < 1e-4, name


for _w, _r in ((8, False), (0, False), (8, True)):
    CHECKS[f"hedgehog_chunked_W{_w}{'_resumed' if _r else ''}"] = lambda w=_w, r=_r: hedgehog_case(w, r)
# the window on the Triton window kernels: several 64-row query blocks, windows of 8 and the full 64
CHECKS["hedgehog_triton_window_W8_D32"] = lambda: hedgehog_case(8, False, D=32, T=150, padded=False)
CHECKS["hedgehog_triton_window_W64_D64"] = lambda: hedgehog_case(64, False, D=64, T=150, padded=False)


@check("liger_head_dim_256_grads")
def liger_wide_heads():
    """Heads wider than 128: the backward differentiates the maps in PyTorch around plain sweeps."""
    torch.manual_seed(19)
    B, T, Hq, Hkv, D = 1, 20, 2, 1, 256
    q, k, v = (torch.randn(B, T, h, D) for h in (Hq, Hkv, Hkv))
    h0, do, dh = torch.randn(B, Hq, D, D) * 0.1, torch.randn(B, T, Hq, D), torch.randn(B, Hq, D, D)
    cos, sin = rope(B, T, D)
    kw = dict(window=8, cos=cos, sin=sin)
    assert_liger_matches_reference(q, k, v, h0, do, dh, **kw)


def group_sums(rows: list[torch.Tensor], kv_heads: int = 2) -> list[torch.Tensor]:
    """dq as it is, and dk, dv [B, T, Hq, D] summed over each of the kv_heads groups."""
    dq, *kv = rows
    return [dq, *(x.view(*x.shape[:2], kv_heads, -1, x.shape[-1]).sum(3) for x in kv)]


@check("window_backward_kernel_equals_its_pytorch_form")
def window_fallback():
    """The window backward kernels and the PyTorch form (used where their tiles do not fit, and for
    heads below 32) agree: batched and packed, GQA 2, windows 64 and 20, dk/dv programs of 32 and 64
    key rows, written fresh, added to existing fp32 gradients, and added to per-query-head rows
    summed over each kv group in fp32 / bf16 (the Liger backward's form), with and without a
    gradient on the log-sum-exp (hedgehog's window)."""
    from linearize.kernels.liger.window_bwd_triton import window_bwd, window_bwd_torch  # noqa: PLC0415

    torch.manual_seed(20)
    packed = torch.tensor([0, 30, 31, 100, 150], dtype=torch.int32)
    for (B, T, cu), D, window, block_kv in itertools.product(((2, 150, None), (1, 150, packed)), (16, 32, 64), (64, 20),
                                                             (32, 64)):
        q, do = torch.randn(B, T, 4, D), torch.randn(B, T, 4, D)
        k, v = torch.randn(B, T, 2, D) * 2, torch.randn(B, T, 2, D)
        cos, sin = rope(B, T, D)
        kw = dict(window=window, mix=0.3, cu_seqlens=cu, dlse=torch.randn(B, T, 4) if block_kv == 32 else None)
        ref = window_bwd_torch(q, k, v, do, cos, sin, **kw)
        got = window_bwd(q, k, v, do, cos, sin, block_kv=block_kv, **kw)
        base = [torch.randn(x.shape) for x in ref]
        added = window_bwd(q, k, v, do, cos, sin, block_kv=block_kv, add_to=tuple(x.clone() for x in base), **kw)
        for name, a, b, c, b0 in zip(("dq", "dk", "dv"), got, ref, added, base, strict=True):
            assert rel(a, b) < 1e-5 and rel(c - b0, b) < 1e-5, (name, B, D, window, block_kv)
        rows = [torch.randn(B, T, 4, D) for _ in range(3)]  # dq, and dk, dv with a row per query head
        want = [r + b for r, b in zip(group_sums(rows), ref, strict=True)]
        for out_dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 8e-3)):
            summed = window_bwd(q, k, v, do, cos, sin, block_kv=block_kv, add_to=tuple(rows), out_dtype=out_dtype, **kw)
            for name, a, b in zip(("dq", "dk", "dv"), summed, want, strict=True):
                assert a.dtype == out_dtype and rel(a.float(), b) < tol, (name, out_dtype, B, D, window, block_kv)
    # and the Liger backward takes the fallback when a kernel cannot be built: the dq kernel (nothing
    # written yet) or the dk/dv kernel (after dq is in place)
    from triton.runtime.errors import OutOfResources  # noqa: PLC0415

    from linearize.kernels.liger import window_bwd_triton as wb  # noqa: PLC0415

    class NoRoom:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(300_000, 232_448, "shared memory")
            return launch

    for name in ("window_dq_kernel", "window_dkv_kernel"):
        real = getattr(wb, name)
        setattr(wb, name, NoRoom())
        try:
            liger_case(65, 4, 2, 64, False, D=32)
            for a, b in zip(window_bwd(q, k, v, do, cos, sin, **kw), ref, strict=True):  # fresh buffers too
                assert rel(a, b) < 1e-5, name
            summed = window_bwd(q, k, v, do, cos, sin, add_to=tuple(rows), out_dtype=torch.float32, **kw)
            for a, b in zip(summed, want, strict=True):  # and per-query-head rows summed into new tensors
                assert rel(a, b) < 1e-5, name
        finally:
            setattr(wb, name, real)


@check("chunk_gla_packed_with_empty_sequence")
def chunk_gla_packed_empty():
    torch.manual_seed(17)
    H, D, lens = 2, 16, [7, 0, 23, 1]
    T = sum(lens)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    q, k, v = (torch.randn(1, T, H, D) for _ in range(3))
    g = F.logsigmoid(torch.randn(1, T, H, D) * 2)
    h0, dh = torch.randn(len(lens), H, D, D), torch.randn(len(lens), H, D, D)
    do = torch.randn(1, T, H, D)

    def run(backend, cast):
        xs = [x.detach().to(cast).requires_grad_() for x in (q, k, v, g, h0)]
        o, s = kernels().chunk_gla(*xs[:4], scale=1.0, initial_state=xs[4], output_final_state=True, cu_seqlens=cu,
                                   backend=backend)
        return torch.autograd.grad((o * do.to(cast)).sum() + (s * dh.to(cast)).sum(), xs)

    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), run("triton", torch.float32), run("torch", F64),
                          strict=True):
        assert rel(a, b) < 1e-4, name


@check("unsupported_head_size_falls_back")
def unsupported_head_size():
    torch.manual_seed(15)
    B, T, H, D = 1, 9, 2, 24  # not a power of two: PyTorch path, same results
    q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
    cos, sin = rope(B, T, D)
    o, _ = kernels().liger_attention(q, k, v, cos=cos, sin=sin, backend="triton")
    r, _ = kernels().liger_attention(q, k, v, cos=cos, sin=sin, backend="torch")
    assert rel(o, r) < 1e-6
    state = torch.zeros(B, H, D, D)
    kr, vr, valid = torch.zeros(B, H, 4, D), torch.zeros(B, H, 4, D), torch.zeros(B, 4, dtype=torch.bool)
    o = kernels().liger_decode_step(q[:, :1], k[:, :1], v[:, :1], state, kr, vr, valid, 0, window=4,
                                    cos=cos[:, :1], sin=sin[:, :1], backend="triton")
    assert rel(o, r[:, :1]) < 1e-6 and bool(valid[:, 0].all())


@check("liger_left_padding_falls_back")
def liger_left_padding():
    torch.manual_seed(13)
    B, T, H, D = 2, 20, 2, 16
    q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :6] = False
    cos, sin = rope(B, T, D)
    o, _ = kernels().liger_attention(q, k, v, cos=cos, sin=sin, attention_mask=mask, backend="triton")
    r, _ = kernels().liger_attention(q.double(), k.double(), v.double(), cos=cos.double(), sin=sin.double(),
                             attention_mask=mask, backend="torch")
    assert rel(o, r) < 1e-4


@check("model_decode_matches_parallel_gqa3")
def model_through_triton():
    """A converted model (GQA ratio 3, like SmolLM2) forced onto the Triton kernels: its prefill +
    decode agrees with the PyTorch path's parallel pass."""
    from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: PLC0415

    from linearize.families import family_for  # noqa: PLC0415
    from linearize.modeling import default_settings, linearize_model  # noqa: PLC0415

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    linearize_model(model, family_for("llama"), default_settings(family="llama", window=16))
    ids = torch.randint(0, 128, (2, 50))
    with torch.no_grad():
        os.environ["LINEARIZE_KERNELS"] = "torch"
        reference = model(ids, use_cache=False).logits
        os.environ["LINEARIZE_KERNELS"] = "triton"
        try:
            parallel = model(ids, use_cache=False).logits
            out = model(ids[:, :30], use_cache=True)
            steps = [out.logits]
            # a multi-token step on the cache (the recurrence on Triton, the window with the cached prefix)
            steps.append(model(ids[:, 30:40], **{CACHE_KWARG: getattr(out, CACHE_KWARG)}, use_cache=True).logits)
            for t in range(40, 50):
                steps.append(model(ids[:, t : t + 1], **{CACHE_KWARG: getattr(out, CACHE_KWARG)}, use_cache=True).logits)
        finally:
            del os.environ["LINEARIZE_KERNELS"]
    assert rel(parallel, reference) < 1e-4
    assert rel(torch.cat(steps, 1), reference) < 1e-4


@check("model_training_gradients_gqa3")
def model_gradients_through_triton():
    """A converted model's LM-loss weight gradients (q, k, v projections) through the Triton backward
    equal the PyTorch path's: the kernels' gradients wired into training."""
    from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: PLC0415

    from linearize.families import family_for  # noqa: PLC0415
    from linearize.modeling import default_settings, linearize_model  # noqa: PLC0415

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # spread q, k so feature maps and gates differ across channels
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    linearize_model(model, family_for("llama"), default_settings(family="llama", window=16))
    ids = torch.randint(0, 128, (2, 100))

    def grads(kernels):
        os.environ["LINEARIZE_KERNELS"] = kernels
        try:
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()
        finally:
            del os.environ["LINEARIZE_KERNELS"]
        return {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith(("q_proj.weight",
                                                                                       "k_proj.weight", "v_proj.weight"))}

    got, ref = grads("triton"), grads("torch")
    assert len(got) == 6
    for name, g in got.items():
        assert rel(g, ref[name]) < 1e-4, name


def chunk_gla_case(T, packed):
    torch.manual_seed(T + packed)
    H, Dk, Dv = 2, 16, 32
    B, cu = (1, torch.tensor([0, max(T // 3, 1), T + 1], dtype=torch.int32)) if packed else (2, None)
    T = T + 1 if packed else T  # packed: two non-empty sequences
    q, k = torch.randn(B, T, H, Dk), torch.randn(B, T, H, Dk)
    v = torch.randn(B, T, H, Dv)
    g = F.logsigmoid(torch.randn(B, T, H, Dk) * 3)
    h0 = torch.randn(2, H, Dk, Dv)
    do, dh = torch.randn(B, T, H, Dv), torch.randn(2, H, Dk, Dv)

    def run(backend, cast):
        xs = [x.detach().to(cast).requires_grad_() for x in (q, k, v, g, h0)]
        o, s = kernels().chunk_gla(*xs[:4], scale=0.5, initial_state=xs[4], output_final_state=True, cu_seqlens=cu,
                           backend=backend)
        return (o, s), torch.autograd.grad((o * do.to(cast)).sum() + (s * dh.to(cast)).sum(), xs)

    (o, s), got = run("triton", torch.float32)
    (r, rs), ref = run("torch", F64)
    if not packed:
        r2, rs2 = naive_recurrent_gla(q.double(), k.double(), v.double(), g.double(), scale=0.5,
                                      initial_state=h0.double(), output_final_state=True)
        assert rel(r, r2) < 1e-12
    assert rel(o, r) < 1e-4 and rel(s, rs) < 1e-4
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), got, ref, strict=True):
        assert rel(a, b) < 1e-4, name


def decode_case(Hq, Hkv, W, position, as_tensor=False, fused=False, shared=False, block_v=None, block_k=None, D=16):
    """The Triton decode step against the PyTorch one in float64. shared: the state holds one head
    per kv head (the model cache's layout); the reference then runs on it repeated per query head.
    block_v, block_k: value columns a program takes, key rows per state block (default: the
    kernel's own choice)."""
    torch.manual_seed(Hq + W)
    B = 3
    q, k, v = torch.randn(B, 1, Hq, D), torch.randn(B, 1, Hkv, D), torch.randn(B, 1, Hkv, D)
    if fused:  # column slices of one [B, 1, (Hq + 2 Hkv) D] projection, as fuse_projections makes them
        rows = torch.cat([t.flatten(2) for t in (q, k, v)], -1)
        q, k, v = (t.unflatten(-1, (-1, D)) for t in rows.split([Hq * D, Hkv * D, Hkv * D], -1))
        assert not q.is_contiguous()
    state = torch.randn(B, Hkv if shared else Hq, D, D)
    kr, vr = torch.randn(B, Hkv, max(W, 1), D), torch.randn(B, Hkv, max(W, 1), D)
    valid = torch.rand(B, max(W, 1)) > 0.5
    cos, sin = rope(B, 1, D, offset=position)
    s2, kr2, vr2, valid2 = state.double(), kr.double(), vr.double(), valid.clone()
    if shared:
        s2 = s2.repeat_interleave(Hq // Hkv, dim=1)
    kw = dict(window=W, mix=0.4, gate_normalizer=16.0)
    # as_tensor: the position as a device tensor the kernel reads, as a CUDA-graph replay passes it
    at = torch.tensor([position]) if as_tensor else position
    if block_v is None and block_k is None:
        o = kernels().liger_decode_step(q, k, v, state, kr if W else None, vr if W else None, valid if W else None, at,
                                        cos=cos, sin=sin, backend="triton", **kw)
    else:
        from linearize.kernels.liger.decode_triton import liger_decode_step as triton_decode_step  # noqa: PLC0415

        o = triton_decode_step(q, k, v, state, kr if W else None, vr if W else None, valid if W else None, at,
                               cos=cos, sin=sin, block_v=block_v, block_k=block_k, **kw)
    r = liger_decode_step_torch(q.double(), k.double(), v.double(), s2, kr2 if W else None, vr2 if W else None,
                                valid2 if W else None, position, cos=cos.double(), sin=sin.double(), **kw)
    assert o.shape == (B, 1, Hq, D)
    assert rel(o, r) < 1e-4 and rel(state, s2[:, :: Hq // Hkv] if shared else s2) < 1e-5
    if W:
        assert rel(kr, kr2) < 1e-5 and rel(vr, vr2) < 1e-6 and bool((valid == valid2).all())


def gsa_scores_case(T, H, D, m, strong):
    """gsa's chunked slot-scores kernels (gsa/chunk_triton.py) against the chunked PyTorch pass in
    float64: scores, final slot keys and the gradients of all five inputs (the gates' by a reverse
    cumsum)."""
    from linearize.kernels.gsa.chunk import slot_scores  # noqa: PLC0415
    from linearize.kernels.gsa.chunk_triton import slot_scores_chunked_triton  # noqa: PLC0415

    torch.manual_seed(T + m)
    B = 2
    fq, fk = torch.randn(B, T, H, D).softmax(-1), torch.randn(B, T, H, D).softmax(-1)
    log_gate = F.logsigmoid(torch.randn(B, T, H, m) * (4 if strong else 1)) / (1 if strong else 8)
    write, keys0 = -torch.expm1(log_gate), torch.randn(B, H, m, D)
    d_scores, d_keys = torch.randn(B, T, H, m), torch.randn(B, H, m, D)

    def run(fn, dtype):
        xs = [x.to(dtype).requires_grad_() for x in (fq, fk, write, log_gate, keys0)]
        scores, keys = fn(*xs)
        loss = (scores * d_scores.to(dtype)).sum() + (keys * d_keys.to(dtype)).sum()
        return (scores, keys), torch.autograd.grad(loss, xs)

    (s, h), got = run(slot_scores_chunked_triton, torch.float32)
    (rs, rh), ref = run(slot_scores, F64)
    assert rel(s, rs) < 1e-5 and rel(h, rh) < 1e-5
    for name, a, b in zip(("dq", "dk", "du", "dlog_gate", "dkeys0"), got, ref, strict=True):
        assert rel(a, b) < 1e-5, name


def gdn_delta_case(T, H, D, V, strong):
    """The gated delta rule's chunk kernels (gdn/terms_triton.py, then gdn/chunk_triton.py's sweep)
    against the chunked PyTorch form in float64: outputs, final state and the gradients of q, k, v,
    log-gates, write strengths, state."""
    from linearize.kernels.gdn.chunk import gated_delta_chunked  # noqa: PLC0415
    from linearize.kernels.gdn.chunk_triton import gated_delta_chunked_triton  # noqa: PLC0415

    torch.manual_seed(T + D)
    B = 2
    q, k = (F.normalize(torch.randn(B, T, H, D), dim=-1) for _ in range(2))
    v, state = torch.randn(B, T, H, V), torch.randn(B, H, D, V)
    log_gate = F.logsigmoid(torch.randn(B, T, H, D) * (4 if strong else 1)) / (1 if strong else 8)
    beta = torch.sigmoid(torch.randn(B, T, H) * 2)
    do, dh = torch.randn(B, T, H, V), torch.randn(B, H, D, V)

    def run(fn, dtype):
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v, log_gate, beta, state)]
        o, s = fn(*xs)
        return (o, s), torch.autograd.grad((o * do.to(dtype)).sum() + (s * dh.to(dtype)).sum(), xs)

    (o, s), got = run(gated_delta_chunked_triton, torch.float32)
    (r, rs), ref = run(gated_delta_chunked, F64)
    assert rel(o, r) < 1e-5 and rel(s, rs) < 1e-5
    for name, a, b in zip(("dq", "dk", "dv", "dlog_gate", "dbeta", "dstate"), got, ref, strict=True):
        assert rel(a, b) < 1e-5, name


def gdn_terms_case(T, D, V):
    """gdn/terms_triton.py's chunk terms and their backward against its chunk_terms_torch in
    float64 (autograd): the eight terms and the gradients of q, k, v, log-gates and beta."""
    from linearize.kernels.gdn import terms_triton  # noqa: PLC0415

    torch.manual_seed(T + V)
    B, H = 2, 2
    q, k = (F.normalize(torch.randn(B, T, H, D), dim=-1) for _ in range(2))
    v, beta = torch.randn(B, T, H, V), torch.sigmoid(torch.randn(B, T, H) * 2)
    log_gate = F.logsigmoid(torch.randn(B, T, H, D) * 4) / 2
    xs = [x.double().requires_grad_() for x in (q, k, v, log_gate, beta)]
    ref = terms_triton.chunk_terms_torch(*xs)
    got = terms_triton.chunk_terms_fwd(q, k, v, log_gate, beta, "ieee")
    for name, a, b in zip(("Qe", "Oe", "W", "U", "Kr", "Kw", "v", "dec"), got, ref, strict=True):
        assert a.shape == b.shape and rel(a, b) < 1e-5, name
    d_terms = [torch.randn_like(r) for r in ref]
    ref_grads = torch.autograd.grad(sum((r * d).sum() for r, d in zip(ref, d_terms, strict=True)), xs)
    grads = terms_triton.chunk_terms_bwd(q, k, v, log_gate, beta, [d.float() for d in d_terms], "ieee")
    for name, a, b in zip(("dq", "dk", "dv", "dlog_gate", "dbeta"), grads, ref_grads, strict=True):
        assert rel(a, b) < 1e-5, name


for _g in [(5, 16, 16), (37, 32, 24)]:
    CHECKS["gdn_terms_T{}_D{}_V{}".format(*_g)] = lambda g=_g: gdn_terms_case(*g)
# value blocks of 4096 / D columns (V 80 at D 32: 2, the second part-masked; 2 at D 128); T 37:
# three chunks, the last part-padded
for _g in [(1, 1, 16, 16, False), (37, 2, 16, 24, True), (21, 1, 32, 80, False), (16, 1, 128, 64, True)]:
    CHECKS["gdn_delta_T{}_H{}_D{}_V{}_".format(*_g) + ("strong" if _g[4] else "weak")] = lambda g=_g: gdn_delta_case(*g)


def triton_layer_case(target, D=16):
    """The model's gdn or gsa layer with its recurrence on Triton (gsa: the slot scores, then chunk_gla)
    against the step reference in float64: output, final state(s), gradients of q, k, v and the
    carried state(s). Heads of 32: the window on the Liger window kernels too."""
    from linearize.kernels.gdn.chunk import gdn_attention_chunked  # noqa: PLC0415
    from linearize.kernels.gdn.naive import gdn_attention_torch  # noqa: PLC0415
    from linearize.kernels.gsa.chunk import gsa_attention_chunked  # noqa: PLC0415
    from linearize.kernels.gsa.naive import gsa_attention_torch  # noqa: PLC0415

    B, T, Hq, Hkv, m = 2, 23, 4, 2, 4
    torch.manual_seed(20 if target == "gdn" else 19)
    q, k, v = (torch.randn(B, T, h, D) for h in (Hq, Hkv, Hkv))
    states = [torch.randn(B, Hq, D, D)] if target == "gdn" else [torch.randn(B, Hq, m, D) for _ in range(2)]
    cos, sin = rope(B, T, D)
    chunked, reference, extra = {"gdn": (gdn_attention_chunked, gdn_attention_torch, {}),
                                 "gsa": (gsa_attention_chunked, gsa_attention_torch, dict(slots=m))}[target]

    def run(fn, cast):
        xs = [x.to(cast).requires_grad_() for x in (q, k, v, *states)]
        o, final = fn(*xs[:3], window=8, gate_normalizer=4.0, cos=cos.to(cast), sin=sin.to(cast),
                      initial_state=xs[3] if target == "gdn" else tuple(xs[3:]), **extra)
        outs = (o, *(final if isinstance(final, tuple) else (final,)))
        return outs, torch.autograd.grad(sum((x * torch.ones_like(x).cumsum(-1)).sum() for x in outs), xs)

    with mock.patch.dict(os.environ, {"LINEARIZE_KERNELS": "triton"}):
        got_out, got = run(chunked, torch.float32)
    ref_out, ref = run(reference, F64)
    for i, (a, b) in enumerate(zip(got_out + got, ref_out + ref, strict=True)):
        assert rel(a, b) < 1e-4, f"output/gradient {i}"


CHECKS["gdn_attention_on_triton"] = lambda: triton_layer_case("gdn")
CHECKS["gsa_attention_on_triton"] = lambda: triton_layer_case("gsa")
CHECKS["gdn_attention_on_triton_window_D32"] = lambda: triton_layer_case("gdn", D=32)
CHECKS["gsa_attention_on_triton_window_D32"] = lambda: triton_layer_case("gsa", D=32)


# slot blocks of 4096 / D columns (m 80 at D 32: 2 blocks, the second part-masked; 2 at D 128); T 37:
# three blocks of 16, the last part-masked
for _g in [(1, 1, 16, 4, False), (37, 2, 16, 6, True), (21, 1, 32, 80, False), (16, 1, 128, 64, True)]:
    CHECKS["gsa_scores_T{}_H{}_D{}_m{}_".format(*_g) + ("strong" if _g[4] else "weak")] = lambda g=_g: gsa_scores_case(*g)

for _c in CASES:
    CHECKS["liger_T{}_Hq{}_Hkv{}_W{}_{}".format(*_c[:4], "strong" if _c[4] else "weak") + (f"_D{_c[5]}" if len(_c) > 5 else "")] = (
        lambda c=_c: liger_case(*c))
for _T, _p in itertools.product((1, 17, 65), (False, True)):
    CHECKS[f"chunk_gla_T{_T}_{'packed' if _p else 'batched'}"] = lambda T=_T, p=_p: chunk_gla_case(T, p)
for _d in [(2, 2, 8, 13), (4, 1, 6, 2), (4, 2, 0, 5), (4, 2, 8, 13, True)]:
    CHECKS["decode_Hq{}_Hkv{}_W{}_pos{}".format(*_d) + ("_in_memory" if len(_d) > 4 else "")] = lambda d=_d: decode_case(*d)
CHECKS["decode_fused_qkv_rows"] = lambda: decode_case(4, 2, 8, 13, fused=True)
for _d in [(4, 2, 8, 13), (4, 1, 0, 5), (2, 2, 6, 3)]:  # the last: no groups, shared = per query head
    CHECKS["decode_shared_state_Hq{}_Hkv{}_W{}_pos{}".format(*_d)] = lambda d=_d: decode_case(*d, as_tensor=True, shared=True)
# two value blocks a head: per query head, shared by a group of three (accumulator rows padded to
# four), no window; D 32 so each block's ring keys and rotation halves are whole rows
for _d in [(4, 4, 8, 13, False), (6, 2, 6, 3, True), (4, 2, 0, 5, True)]:
    CHECKS["decode_value_blocks_Hq{}_Hkv{}_W{}_pos{}_{}".format(*_d[:4], "shared" if _d[4] else "per_query_head")] = (
        lambda d=_d: decode_case(*d[:4], as_tensor=True, shared=d[4], block_v=16, D=32))
# the state in blocks of 8 key rows (four a head, each loaded before the previous one's store),
# with two value blocks, per query head and shared by a group of two
for _d in [(4, 4, 8, 13, False), (4, 2, 6, 3, True)]:
    CHECKS["decode_key_blocks_Hq{}_Hkv{}_W{}_pos{}_{}".format(*_d[:4], "shared" if _d[4] else "per_query_head")] = (
        lambda d=_d: decode_case(*d[:4], as_tensor=True, shared=d[4], block_v=16, block_k=8, D=32))


def kernels():
    import linearize.kernels as k  # noqa: PLC0415

    return k


def worker(out_path: str) -> None:
    """Run every check under the interpreter; write {name: "ok" | error text} as JSON."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import linearize.kernels.triton_ops  # noqa: F401, PLC0415 - must import: the checks exercise it
    from linearize.kernels.gla import chunk_triton  # noqa: PLC0415

    chunk_triton.POISON_OUTPUTS = True
    results = {}
    for name, fn in CHECKS.items():
        try:
            fn()
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - recorded and asserted by the pytest side
            results[name] = traceback.format_exc(limit=4)
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("triton_interp") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_interpreter(results, name):
    assert results[name] == "ok", results[name]


def test_decode_tile_defaults_follow_the_measured_rule():
    """default_tile (docs/kernels.md, thirteenth session): a state per query head at heads of 128 in
    blocks of 32 key rows, 64 columns; other heads whole; a shared state whole columns, 64 of them
    unless that leaves fewer programs than SMs, then 32; heads of 256 32 columns."""
    pytest.importorskip("triton")
    from types import SimpleNamespace  # noqa: PLC0415

    from linearize.kernels.liger.decode_triton import default_tile  # noqa: PLC0415

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert default_tile(128, 32, 32, 8, cpu) == (32, 64)
    assert default_tile(64, 9, 9, 1, cpu) == (64, 64)
    assert default_tile(256, 32, 32, 8, cpu) == (256, 32)
    assert default_tile(16, 4, 2, 3, cpu) == (16, 16)  # never wider than the head
    with mock.patch("torch.cuda.get_device_properties", return_value=SimpleNamespace(multi_processor_count=132)):
        assert default_tile(128, 32, 8, 8, gpu) == (128, 32)  # 2 x 8 x 8 = 128 programs at 64 columns
        assert default_tile(128, 32, 8, 64, gpu) == (128, 64)


def test_decode_tiles_must_be_powers_of_two():
    pytest.importorskip("triton")
    from linearize.kernels.liger.decode_triton import liger_decode_step as triton_decode_step  # noqa: PLC0415

    B, H, D, W = 1, 2, 64, 4
    q, k, v = (torch.randn(B, 1, H, D) for _ in range(3))
    cos, sin = rope(B, 1, D)
    with pytest.raises(ValueError, match="powers of two"):
        triton_decode_step(q, k, v, torch.zeros(B, H, D, D), torch.zeros(B, H, W, D), torch.zeros(B, H, W, D),
                           torch.zeros(B, W, dtype=torch.bool), 0, window=W, mix=0.5, gate_normalizer=16.0,
                           cos=cos, sin=sin, block_k=48)


def test_sweep_prefetch_defaults_follow_the_measured_rule():
    """default_prefetch (backward_triton, nineteenth session): the dq sweep loads ahead except a plain sweep over
    more than 64 key channels whose programs would need a second round; the dk/dv sweep up to 64 key channels
    (it spills above)."""
    pytest.importorskip("triton")
    from linearize.kernels.gla.backward_triton import default_prefetch  # noqa: PLC0415

    cpu = torch.device("cpu")  # one "SM"
    assert default_prefetch("dq", True, 128, 1000, cpu)
    assert default_prefetch("dq", False, 64, 1000, cpu)
    assert default_prefetch("dq", False, 128, 2, cpu) and not default_prefetch("dq", False, 128, 3, cpu)
    assert default_prefetch("dkv", True, 64, 1000, cpu) and not default_prefetch("dkv", True, 128, 1, cpu)
    assert default_prefetch("dkv", False, 64, 1000, cpu) and not default_prefetch("dkv", False, 128, 1, cpu)


if __name__ == "__main__":
    worker(sys.argv[1])
