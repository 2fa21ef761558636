"""One forward and backward of the fused Liger kernels at one shape, for Nsight Compute.

The timing scripts say how long each kernel takes; this one gives ncu something short to profile,
so its counters say why (stall reasons, pipe use, occupancy). Each kernel runs once, so ncu's
`--launch-count` picks them in launch order: forward, dq sweep, dk/dv sweep, window dq, window dk/dv.

    ncu --clock-control none --set full -k regex:'gla_|window_' -o prof \\
        python benchmarks/ncu_liger.py --B 8 --T 4096 --Hq 32 --Hkv 32 --D 128
    ncu -i prof.ncu-rep --page details > prof.txt
"""

from __future__ import annotations

import argparse
import os

import torch

from linearize.kernels import liger_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--Hq", type=int, default=32)
    ap.add_argument("--Hkv", type=int, default=32)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--segments", action="store_true", help="let liger_attention cut sequences into segments")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ncu_liger.py profiles CUDA kernels: no CUDA device here")
    if not args.segments:  # one launch per kernel, whole sequences
        os.environ["LINEARIZE_SEGMENTS"] = "0"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    q = torch.randn(args.B, args.T, args.Hq, args.D, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(args.B, args.T, args.Hkv, args.D, device="cuda", dtype=dtype, requires_grad=True)
            for _ in range(2))
    inv = 1.0 / (10000 ** (torch.arange(0, args.D, 2, device="cuda", dtype=torch.float32) / args.D))
    ang = torch.arange(args.T, device="cuda", dtype=torch.float32)[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], -1)[None]
    o, _ = liger_attention(q, k, v, window=64, mix=0.5, cos=emb.cos(), sin=emb.sin(), backend="triton")
    o.backward(torch.randn_like(o))
    torch.cuda.synchronize()
    print(f"ran {torch.cuda.get_device_name()}: B{args.B} T{args.T} Hq{args.Hq} Hkv{args.Hkv} D{args.D} {args.dtype}")


if __name__ == "__main__":
    main()
