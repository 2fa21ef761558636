"""One forward and backward of the fused Liger kernels at one shape, for Nsight Compute.

The timing scripts say how long each kernel takes; this one gives ncu something short to profile,
so its counters say why (stall reasons, pipe use, occupancy). Each kernel runs once, so ncu's
`--launch-count` picks them in launch order: forward, dq sweep, dk/dv sweep, window dq, window dk/dv.

    ncu --clock-control none --set full -k regex:'gla_|window_' -o prof \\
        python benchmarks/ncu_liger.py --B 8 --T 4096 --Hq 32 --Hkv 32 --D 128
    ncu -i prof.ncu-rep --page details > prof.txt

`--decode` instead runs one decode step (`liger_decode_kernel`, window 64, state per query head or,
with `--shared-state`, per kv head as the model's cache keeps it):

    ncu --clock-control none --set full -k regex:liger_decode -o dec \
        python benchmarks/ncu_liger.py --decode --B 8 --Hq 32 --Hkv 32 --D 128
"""

from __future__ import annotations

import argparse
import os

import torch

from linearize.kernels import liger_attention, liger_decode_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--Hq", type=int, default=32)
    ap.add_argument("--Hkv", type=int, default=32)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--segments", action="store_true", help="let liger_attention cut sequences into segments")
    ap.add_argument("--decode", action="store_true", help="one decode step instead of a forward and backward")
    ap.add_argument("--shared-state", action="store_true", help="decode: one state per kv head (the model's cache)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ncu_liger.py profiles CUDA kernels: no CUDA device here")
    if args.decode:
        return decode_step(args)
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


def decode_step(args: argparse.Namespace) -> None:
    dtype, W = getattr(torch, args.dtype), 64
    torch.manual_seed(0)
    q = torch.randn(args.B, 1, args.Hq, args.D, device="cuda", dtype=dtype)
    k, v = (torch.randn(args.B, 1, args.Hkv, args.D, device="cuda", dtype=dtype) for _ in range(2))
    state = torch.randn(args.B, args.Hkv if args.shared_state else args.Hq, args.D, args.D, device="cuda") * 0.01
    k_ring, v_ring = (torch.randn(args.B, args.Hkv, W, args.D, device="cuda", dtype=dtype) for _ in range(2))
    valid = torch.ones(args.B, W, dtype=torch.bool, device="cuda")
    ang = torch.full((1, 1, args.D), 0.5, device="cuda")
    liger_decode_step(q, k, v, state, k_ring, v_ring, valid, torch.tensor(5, device="cuda"), window=W, mix=0.5,
                      gate_normalizer=16.0, cos=ang.cos(), sin=ang.sin(), backend="triton")
    torch.cuda.synchronize()
    print(f"ran {torch.cuda.get_device_name()}: decode B{args.B} Hq{args.Hq} Hkv{args.Hkv} D{args.D} {args.dtype}, "
          f"state per {'kv' if args.shared_state else 'query'} head")


if __name__ == "__main__":
    main()
