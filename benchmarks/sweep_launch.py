"""Each Liger kernel's GPU time per forward+backward, under other launch settings.

The sweeps run one program per (sequence, head) at ~180-255 registers a thread, so an SM holds one
or two of them and a grid of 144 programs on 132 SMs takes two rounds (Nsight Compute, ninth GPU
session: the dk/dv sweep at SmolLM2's shape ran 1.09 waves). This times each kernel on its own
(torch.profiler, summed over the iterations) for settings of chunk_triton.FORWARD_LAUNCH (keys
fwd_warps, fwd_block_v, fwd_split_window), backward_triton.BACKWARD_LAUNCH (num_warps, dq_warps, dkv_warps,
dq_maxnreg, dkv_maxnreg, block_k, block_v) and the window kernels' (win_fwd_warps, win_fwd_stages, win_dq_warps,
win_dkv_warps, win_dq_stages, win_dkv_stages, win_dkv_block), rows per segment (segments: liger/segmented.py's
SEGMENT_LEN, 0 = whole sequences) and the segment-state kernels' (seg_warps, seg_stages, seg_block_t, seg_block_v;
they count in "other"), so a setting that helps one kernel and hurts another shows as such.

    python benchmarks/sweep_launch.py --shapes 16,1024,9,3,64 8,4096,32,32,128 \\
        --variants default dkv_warps=4 dkv_maxnreg=128 --json sweep_launch.json

`--layer gla` times chunk_gla with PyTorch maps and per-channel gates (the plain sweeps, as mamba2,
hgrn2 and gsa run them; Hkv must equal Hq); `--layer hedgehog` hedgehog's layer (hedgehog/chunk.py at
window 64: chunk_gla with 2D features and zero gates on the plain sweeps, whose tiles block_k and
block_v set, then the window kernels):

    python benchmarks/sweep_launch.py --layer hedgehog --shapes 4,1024,16,16,128 \\
        --variants default fwd_block_v=64 fwd_block_v=32 block_k=128 block_v=128
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from contextlib import ExitStack
from unittest import mock

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from triton.testing import do_bench

from linearize.kernels import chunk_gla, liger_attention
from linearize.kernels.gla import backward_triton, chunk_triton
from linearize.kernels.hedgehog.chunk import hedgehog_attention_chunked
from linearize.kernels.liger import segment_states_triton, segmented, window_bwd_triton, window_fwd_triton

KERNELS = ("window_fwd_kernel", "gla_fwd_kernel", "gla_bwd_dq_kernel", "gla_bwd_dkv_kernel", "window_dq_kernel", "window_dkv_kernel")
FORWARD_KEYS = {"fwd_warps": "num_warps", "fwd_block_v": "block_v", "fwd_split_window": "split_window",
                "fwd_prefetch": "prefetch"}
# the window kernels' launch overrides (liger/window_fwd_triton.LAUNCH, liger/window_bwd_triton.LAUNCH)
WINDOW_FORWARD_KEYS = {"win_fwd_warps": "num_warps", "win_fwd_stages": "num_stages"}
WINDOW_BACKWARD_KEYS = {"win_dq_warps": "dq_warps", "win_dkv_warps": "dkv_warps", "win_dq_stages": "dq_stages",
                        "win_dkv_stages": "dkv_stages", "win_dkv_block": "block_kv"}
SEGMENT_STATE_KEYS = {"seg_warps": "num_warps", "seg_stages": "num_stages", "seg_block_t": "block_t",
                      "seg_block_v": "block_v"}


def launch_settings(text: str) -> dict:
    """"dkv_warps=4+dkv_maxnreg=128" -> {"dkv_warps": 4, "dkv_maxnreg": 128}; "default" -> {}."""
    if text == "default":
        return {}
    return {key: int(value) for key, value in (part.split("=") for part in text.split("+"))}


def patched(settings: dict) -> ExitStack:
    """The kernels' launch dicts set from one variant's settings, for the `with` block: keys of
    FORWARD_KEYS and the WINDOW_* maps renamed into their module's dict, the rest to BACKWARD_LAUNCH."""
    keyed = {chunk_triton: ("FORWARD_LAUNCH", FORWARD_KEYS), window_fwd_triton: ("LAUNCH", WINDOW_FORWARD_KEYS),
             window_bwd_triton: ("LAUNCH", WINDOW_BACKWARD_KEYS),
             segment_states_triton: ("LAUNCH", SEGMENT_STATE_KEYS)}
    stack = ExitStack()
    if "segments" in settings:
        stack.enter_context(mock.patch.object(segmented, "SEGMENT_LEN", settings["segments"]))
    for module, (name, keys) in keyed.items():
        stack.enter_context(mock.patch.object(module, name, {keys[k]: v for k, v in settings.items() if k in keys}))
    claimed = {"segments", *(k for _, keys in keyed.values() for k in keys)}
    stack.enter_context(mock.patch.object(backward_triton, "BACKWARD_LAUNCH",
                                          {k: v for k, v in settings.items() if k not in claimed}))
    return stack


def inputs(B: int, T: int, Hq: int, Hkv: int, D: int):
    torch.manual_seed(0)
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D))
    emb = torch.cat([torch.arange(T, device="cuda", dtype=torch.float32)[:, None] * inv[None, :]] * 2, -1)[None]
    return q, k, v, emb.cos(), emb.sin(), torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16)


def forward_backward(layer, q, k, v, cos, sin, do):
    def step():
        if layer == "liger":
            o, _ = liger_attention(q, k, v, window=64, mix=0.5, cos=cos, sin=sin, backend="triton")
        elif layer == "gla":  # the plain sweeps as mamba2, hgrn2 and gsa run them: maps and gates from PyTorch
            phi_q, phi_k = q.float().softmax(-1).to(q.dtype), k.float().softmax(-1).to(q.dtype)
            o, _ = chunk_gla(phi_q, phi_k, v, F.logsigmoid(k.float()) / 16, scale=1.0, backend="triton")
        else:  # hedgehog's maps at conversion (W = I) on each head's query and key, shared across the group
            phi_q, phi_k = (torch.cat([x.float().softmax(-1), (-x.float()).softmax(-1)], -1).to(x.dtype) for x in (q, k))
            o, _ = hedgehog_attention_chunked(q, k, v, phi_q, phi_k, window=64, cos=cos, sin=sin, backend="triton")
        torch.autograd.grad(o, (q, k, v), do)
    return step


def kernel_times(step, iterations: int) -> dict:
    """ms per iteration of each kernel in KERNELS (and "other": every other GPU kernel) over `iterations` calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            step()
        torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    others = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = next((k for k in KERNELS if event.key.startswith(k)), "other")
            times[name] += us / 1000 / iterations
            if name == "other":
                others.append((round(us / 1000 / iterations, 4), event.key[:80]))
    # the largest of the rest (PyTorch's elementwise kernels, copies): what "other" is made of
    return dict(times, other_top=sorted(others, reverse=True)[:6])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=None,
                    help="B,T,Hq,Hkv,D each (default: SmolLM2's heads at T 1024 and 4096 and Llama-3-8B's at 4096; "
                         "for --layer gla, whose heads are one per query head, the same with Hkv = Hq)")
    ap.add_argument("--variants", nargs="+", default=["default", "dkv_warps=4", "dkv_maxnreg=128"])
    ap.add_argument("--layer", choices=["liger", "hedgehog", "gla"], default="liger",
                    help="gla: chunk_gla on PyTorch maps and gates (Hq = Hkv), the plain sweeps")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--json", default="sweep_launch.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sweep_launch.py times CUDA kernels: no CUDA device here")
    device = torch.cuda.get_device_name()
    rows = []
    shapes = args.shapes or ["16,1024,9,3,64", "4,4096,9,3,64", "8,4096,32,32,128"]
    if args.layer == "gla" and args.shapes is None:
        shapes = ["16,1024,9,9,64", "4,1024,16,16,128", "4,4096,16,16,64"]  # the eleventh session's rows
    for shape in shapes:
        B, T, Hq, Hkv, D = map(int, shape.split(","))
        if args.layer == "gla" and Hq != Hkv:
            raise SystemExit(f"--layer gla runs chunk_gla, whose heads are one per query head: give Hkv = Hq ({shape})")
        step = forward_backward(args.layer, *inputs(B, T, Hq, Hkv, D))
        for variant in args.variants:
            with patched(launch_settings(variant)):
                try:
                    step()  # compiles this launch setting
                    times = kernel_times(step, args.iterations)
                    wall = do_bench(step, warmup=3, rep=20, return_mode="median")
                except Exception as e:  # noqa: BLE001 - an impossible setting (OutOfResources, ptxas) is a row, not an end
                    print(f"{shape} {variant}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
                    continue
            gpu = sum(t for key, t in times.items() if key != "other_top")
            row = {"shape": shape, "variant": variant, "wall_ms": wall, "gpu_ms": gpu, **times}
            rows.append(row)
            print(json.dumps(row), flush=True)  # a cut run keeps what it measured

    table = Table(title=f"{args.layer} kernels per forward+backward, ms ({device}, bf16, window 64)")
    for col in ("B,T,Hq,Hkv,D", "variant", "win fwd", "fwd", "bwd dq", "bwd dk/dv", "win dq", "win dk/dv", "other", "GPU", "wall"):
        table.add_column(col, justify="left" if col in ("B,T,Hq,Hkv,D", "variant") else "right")
    for r in rows:
        table.add_row(r["shape"], r["variant"], *(f"{r.get(k, 0.0):.3f}" for k in (*KERNELS, "other", "gpu_ms", "wall_ms")))
    Console(width=200).print(table)
    with open(args.json, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "layer": args.layer, "iterations": args.iterations,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
