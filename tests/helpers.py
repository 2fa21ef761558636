"""Small helpers shared by tests."""

from __future__ import annotations

import sys

import pytest


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run `linearize ARGS` in-process, as the console script would; returns (exit code, stdout, stderr)."""
    from linearize.cli import main

    argv = sys.argv
    sys.argv = ["linearize", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def relative_error(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def hedgehog_inputs(B, T, Hq, Hkv, D, W, resumed, dtype=None, seed=0, padded=True):
    """Random hedgehog inputs (GQA, a left-padded row unless not padded: then no attention mask) and,
    when resumed, a state and window prefix."""
    import torch

    from linearize.kernels.hedgehog.naive import HedgehogFeatureMap

    dtype = dtype or torch.float64
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, Hq, D, generator=g, dtype=dtype), torch.randn(B, T, Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(B, T, Hkv, D, generator=g, dtype=dtype)
    fq, fk = HedgehogFeatureMap(Hq, D).to(dtype), HedgehogFeatureMap(Hkv, D).to(dtype)
    with torch.no_grad():
        fq.weight.add_(0.3 * torch.randn(fq.weight.shape, generator=g, dtype=dtype))
        fk.weight.add_(0.3 * torch.randn(fk.weight.shape, generator=g, dtype=dtype))
        phi_q, phi_k = fq(q), fk(k)
    ang = torch.randn(1, T, D // 2, generator=g, dtype=dtype)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :5] = False
    extra = {}
    if resumed:
        F2 = 2 * D
        extra["initial_state"] = (torch.rand(B, Hq, F2, D, generator=g, dtype=dtype) - 0.3,
                                  torch.rand(B, Hq, F2, generator=g, dtype=dtype) * 3)
        if W:
            pphi = torch.rand(B, W, Hkv, F2, generator=g, dtype=dtype).softmax(-1)
            extra["window_prefix"] = (torch.randn(B, W, Hkv, D, generator=g, dtype=dtype),
                                      torch.randn(B, W, Hkv, D, generator=g, dtype=dtype), pphi,
                                      torch.rand(B, W, generator=g) > 0.3)
    return [q, k, v, phi_q, phi_k], dict(window=W, cos=cos, sin=sin, attention_mask=valid if padded else None, **extra)


def hedgehog_outputs(fn, xs, kw, d_o, dtype, device="cpu"):
    """fn (a hedgehog attention form) on hedgehog_inputs' tensors cast to `dtype` on `device`: [o (padded
    rows zeroed), S, z, then the gradients of q, k, v, phi_q, phi_k] of o . d_o + sum S + sum z (zeros
    for an input fn does not read: window 0 reads no raw q, k)."""
    import torch

    def cast(t):
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    leaves = [cast(x).requires_grad_() for x in xs]
    args = {n: tuple(map(cast, a)) if isinstance(a, tuple) else cast(a) if torch.is_tensor(a) else a for n, a in kw.items()}
    o, (S, z) = fn(*leaves, **args)
    if args["attention_mask"] is not None:
        o = torch.where(args["attention_mask"][:, :, None, None], o, 0.0)
    grads = torch.autograd.grad((o * cast(d_o)).sum() + S.sum() + z.sum(), leaves, allow_unused=True)
    return [o, S, z, *(torch.zeros_like(x) if d is None else d for x, d in zip(leaves, grads, strict=True))]

