"""Correctness table of the Triton kernels on the GPU against the float64 PyTorch reference.

    python benchmarks/kernel_check.py [--quick] [--jobs 8] [--json out.json]

Forward of liger_attention for T in {1, 63, 64, 65, 1000, 4096}, D in {64, 128}, group size
Hq/Hkv in {1, 4, 8}, bf16/fp16/fp32, weak and strong gates, plus packed sequences, chunk_gla,
gradients (q, k, v, initial_state) and the decode step. Outputs are poisoned with NaN first
(chunk_triton.POISON_OUTPUTS), so an element a kernel fails to write fails its check.
Relative error ||out - ref|| / ||ref||: fp32 < 1e-4 (TF32 off), bf16/fp16 < 5e-3.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

from linearize.kernels import chunk_gla, liger_attention, liger_decode_step
from linearize.kernels.gla import chunk_triton
from linearize.kernels.gla.naive import naive_recurrent_gla
from linearize.kernels.liger.naive import liger_decode_step_torch

TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-3, torch.float16: 5e-3}
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def poison():
    """Kernels fill their outputs with NaN before launching (POISON_OUTPUTS)."""
    chunk_triton.POISON_OUTPUTS = True


def rope_tables(B, T, D, device):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=device, dtype=torch.float64) / D))
    ang = torch.arange(T, device=device, dtype=torch.float64)[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], -1)[None].expand(B, T, D)
    return emb.cos().float().contiguous(), emb.sin().float().contiguous()


def make(B, T, Hq, Hkv, D, dtype, strong, device="cuda"):
    q = torch.randn(B, T, Hq, D, device=device)
    k = torch.randn(B, T, Hkv, D, device=device) * (3.0 if strong else 1.0)
    v = torch.randn(B, T, Hkv, D, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def check_forward(rows, T, D, G, dtype, strong, packed=False):
    Hkv = 2
    Hq = Hkv * G
    B = 1 if packed else 2
    gn = 1.0 if strong else 16.0
    if packed:
        lens = [max(1, T // 3), T, max(1, T - T // 3)]
        Ttot = sum(lens)
        cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device="cuda")
    else:
        Ttot, cu = T, None
    q, k, v = make(B, Ttot, Hq, Hkv, D, dtype, strong)
    cos, sin = rope_tables(1, Ttot, D, "cuda")
    N = B if cu is None else len(lens)
    h0 = torch.randn(N, Hq, D, D, device="cuda") * 0.1
    poison()
    o, ht = liger_attention(q, k, v, window=64, mix=0.5, gate_normalizer=gn, cos=cos, sin=sin, initial_state=h0,
                            output_final_state=True, cu_seqlens=cu, backend="triton")
    torch.cuda.synchronize()
    r, rh = liger_attention(q.double(), k.double(), v.double(), window=64, mix=0.5, gate_normalizer=gn,
                            cos=cos.double(), sin=sin.double(), initial_state=h0.double(), output_final_state=True,
                            cu_seqlens=cu, backend="torch")
    e_o, e_h = rel(o, r), rel(ht, rh)
    ok = e_o < TOL[dtype] and e_h < TOL[dtype]
    rows.append(dict(test="liger_fwd", T=T, D=D, G=G, dtype=NAMES[dtype], gates="strong" if strong else "weak",
                     packed=packed, err_o=e_o, err_state=e_h, ok=ok))


def check_chunk_gla(rows, T, D, dtype):
    B, H = 2, 4
    q, k, v = (torch.randn(B, T, H, D, device="cuda").to(dtype) for _ in range(3))
    g = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, device="cuda")) / 8).to(dtype)
    h0 = torch.randn(B, H, D, D, device="cuda")
    poison()
    o, ht = chunk_gla(q, k, v, g, scale=D**-0.5, initial_state=h0, output_final_state=True, backend="triton")
    torch.cuda.synchronize()
    r, rh = naive_recurrent_gla(q.double(), k.double(), v.double(), g.double(), scale=D**-0.5,
                                initial_state=h0.double(), output_final_state=True)
    e_o, e_h = rel(o, r), rel(ht, rh)
    rows.append(dict(test="chunk_gla_fwd", T=T, D=D, G=1, dtype=NAMES[dtype], gates="weak", packed=False,
                     err_o=e_o, err_state=e_h, ok=e_o < TOL[dtype] and e_h < TOL[dtype]))


def check_grad(rows, T, D, G, dtype, packed=False):
    Hkv, B = 2, (1 if packed else 2)
    Hq = Hkv * G
    cu = None
    if packed:
        lens = [T // 2, T, 7]
        cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device="cuda")
        T = sum(lens)
    q, k, v = make(B, T, Hq, Hkv, D, dtype, False)
    cos, sin = rope_tables(1, T, D, "cuda")
    N = B if cu is None else cu.numel() - 1
    h0 = torch.randn(N, Hq, D, D, device="cuda") * 0.1
    do = torch.randn(B, T, Hq, D, device="cuda")
    dh = torch.randn(N, Hq, D, D, device="cuda")

    def grads(backend, cast):
        hi = cast if cast == torch.float64 else torch.float32
        xs = [x.detach().to(cast).requires_grad_() for x in (q, k, v)] + [h0.to(hi).requires_grad_()]
        o, ht = liger_attention(*xs[:3], window=64, cos=cos.to(cast if cast == torch.float64 else torch.float32),
                                sin=sin.to(cast if cast == torch.float64 else torch.float32), initial_state=xs[3],
                                output_final_state=True, cu_seqlens=cu, backend=backend)
        loss = (o.to(do.dtype) * do).sum() + (ht.to(dh.dtype) * dh).sum()
        return torch.autograd.grad(loss, xs)

    poison()
    got = grads("triton", dtype)
    torch.cuda.synchronize()
    ref = grads("torch", torch.float64)
    errs = [rel(a, b) for a, b in zip(got, ref, strict=True)]
    tol = TOL[dtype] * (2 if dtype != torch.float32 else 1)
    rows.append(dict(test="liger_grad", T=T, D=D, G=G, dtype=NAMES[dtype], gates="weak", packed=packed,
                     err_o=max(errs[:3]), err_state=errs[3], ok=all(e < tol for e in errs),
                     errs=dict(zip(("dq", "dk", "dv", "dh0"), errs, strict=True))))


def check_decode(rows, D, G, dtype, W=64, shared=False):
    """shared: one state per kv head (the model's cache); the reference runs on it repeated per query head."""
    B, Hkv = 3, 2
    Hq = Hkv * G
    q, k, v = make(B, 1, Hq, Hkv, D, dtype, False)
    state = torch.randn(B, Hkv if shared else Hq, D, D, device="cuda") * 0.1
    kr = torch.randn(B, Hkv, W, D, device="cuda").to(dtype)
    vr = torch.randn(B, Hkv, W, D, device="cuda").to(dtype)
    valid = torch.rand(B, W, device="cuda") > 0.3
    cos, sin = rope_tables(B, 1, D, "cuda")
    ref_state, ref_kr, ref_vr, ref_valid = state.double(), kr.double(), vr.double(), valid.clone()
    if shared:
        ref_state = ref_state.repeat_interleave(G, dim=1)
    r = liger_decode_step_torch(q.double(), k.double(), v.double(), ref_state, ref_kr, ref_vr, ref_valid, 77,
                                window=W, mix=0.5, gate_normalizer=16.0, cos=cos.double(), sin=sin.double())
    poison()
    o = liger_decode_step(q, k, v, state, kr, vr, valid, 77, window=W, mix=0.5, gate_normalizer=16.0, cos=cos,
                          sin=sin, backend="triton")
    torch.cuda.synchronize()
    e_o, e_s = rel(o, r), rel(state, ref_state[:, ::G] if shared else ref_state)
    e_ring = max(rel(kr, ref_kr), rel(vr, ref_vr))
    ok = e_o < TOL[dtype] and e_s < TOL[dtype] and e_ring < TOL[dtype] and bool((valid == ref_valid).all())
    rows.append(dict(test="decode shared" if shared else "decode", T=1, D=D, G=G, dtype=NAMES[dtype], gates="weak", packed=False,
                     err_o=e_o, err_state=e_s, ok=ok))


class Rows(list):
    """Prints each result as it is added (a long run that is cut off still shows its rows)."""

    def append(self, r):
        super().append(r)
        print(f"{r['test']:14s} {r['T']:5d} {r['D']:4d} {r['G']:2d} {r['dtype']:5s} {r['gates']:6s} {str(r['packed']):6s} "
              f"{r['err_o']:9.2e} {r['err_state']:9.2e} {'ok' if r['ok'] else 'FAIL'}", flush=True)


def tasks(args) -> list[tuple[str, tuple, dict]]:
    """(check function name, args, kwargs) for every row of the table, in the order they print."""
    Ts = args.T or ([1, 63, 64, 65, 1000] if args.quick else [1, 63, 64, 65, 1000, 4096])
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    if args.only:
        dtypes = [d for d in dtypes if NAMES[d] in args.only]
    out = []
    if not args.grad_only:
        for T, D, G, dtype, strong in itertools.product(Ts, (64, 128), (1, 4, 8), dtypes, (False, True)):
            out.append(("check_forward", (T, D, G, dtype, strong), {}))
    if not (args.only or args.grad_only):
        for T, D, dtype in itertools.product((65, 1000), (64, 128), dtypes):
            out.append(("check_forward", (T, D, 4, dtype, False), {"packed": True}))
            out.append(("check_chunk_gla", (T, D, dtype), {}))
        for D, G, dtype in itertools.product((64, 128), (1, 4, 8), dtypes):
            out.append(("check_decode", (D, G, dtype), {}))
            if G > 1:
                out.append(("check_decode", (D, G, dtype), {"shared": True}))
    if not args.no_grad and not args.only:
        for T, D, G, dtype in itertools.product(args.grad_T, (64, 128), (1, 4), dtypes):
            out.append(("check_grad", (T, D, G, dtype), {}))
        out.append(("check_grad", (100, 128, 4, torch.bfloat16), {"packed": True}))
        out.append(("check_grad", (100, 64, 1, torch.float32), {"packed": True}))
    return out


def run_task(index: int, name: str, task_args: tuple, kwargs: dict) -> list[dict]:
    """One row, in this process or a worker (each worker compiles its own kernels: in parallel)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(index)
    rows = []
    try:
        globals()[name](rows, *task_args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a row that cannot run (compile error, OOM) is a failed row
        dtype = next((NAMES[x] for x in task_args if isinstance(x, torch.dtype)), "?")
        rows.append(dict(test=name.removeprefix("check_"), T=0, D=0, G=0, dtype=dtype, gates="-",
                         packed=bool(kwargs.get("packed")), err_o=float("nan"), err_state=float("nan"), ok=False,
                         error=f"{task_args}: {type(e).__name__}: {e}"[:500]))
        print(f"{name}{task_args} raised {type(e).__name__}: {str(e)[:300]}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-grad", action="store_true")
    ap.add_argument("--only", nargs="+", default=None, metavar="DTYPE",
                    help="forward checks of these dtypes only (fp32, bf16, fp16), no packed/decode/grad")
    ap.add_argument("--T", type=int, nargs="+", default=None)
    ap.add_argument("--grad-T", type=int, nargs="+", default=[65, 300, 4096], help="sequence lengths of the gradient rows")
    ap.add_argument("--grad-only", action="store_true",
                    help="only the gradient rows (Triton compiles each forward configuration on first use: minutes)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="worker processes sharing the GPU: most of the run is Triton compiling each configuration "
                         "on first use (~35 s a row on the device machine), which parallelises across CPU cores")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernel_check.py checks the kernels on a GPU: no CUDA device here "
                         "(tests/test_kernels_triton.py runs them on the CPU under TRITON_INTERPRET=1)")
    todo = tasks(args)
    rows = Rows()
    t0 = time.time()
    print(f"{'test':14s} {'T':>5s} {'D':>4s} {'G':>2s} {'dtype':5s} {'gates':6s} {'packed':6s} {'err_o':>9s} {'err_S':>9s} ok")
    if args.jobs <= 1:
        for i, (name, task_args, kwargs) in enumerate(todo):
            for r in run_task(i, name, task_args, kwargs):
                rows.append(r)
    else:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            futures = [pool.submit(run_task, i, *task) for i, task in enumerate(todo)]
            for future in as_completed(futures):
                for r in future.result():
                    rows.append(r)
    elapsed = time.time() - t0
    worst = {}
    for r in rows:
        key = (r["test"], r["dtype"])
        e = max(r["err_o"], r["err_state"]) if r["err_o"] == r["err_o"] else float("inf")
        worst[key] = max(worst.get(key, 0.0), e)
    n_fail = sum(not r["ok"] for r in rows)
    print(f"\n{len(rows)} checks, {n_fail} failed, {elapsed:.1f} s on {torch.cuda.get_device_name()}")
    for (test, dt), e in sorted(worst.items()):
        print(f"  worst {test:14s} {dt}: {e:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows, failed=n_fail, seconds=elapsed), f, indent=1)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
