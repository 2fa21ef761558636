"""Registers, spills and shared memory of every Triton kernel, compiled for a GPU this machine need not have.

Triton compiles ahead of time for a named target (default sm_90, the H100) with the ptxas it
bundles, and `cuobjdump -res-usage` reads the resulting cubin. A kernel that spills (STACK > 0)
keeps part of its tiles in local memory, which on these latency-bound sweeps costs more than
anything else: the first window backward spilled 3.7 KB per thread and took 18.9 ms of a
~30 ms backward on the H100 (B8 T4096 H32 D128). Run this after changing a kernel or its launch
settings, on any machine with Triton (no GPU needed), and keep STACK at 0 for the shapes we ship.

    python benchmarks/kernel_registers.py                 # the benchmark shapes, bf16, sm_90
    python benchmarks/kernel_registers.py --arch 80 --json regs.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from rich.console import Console
from rich.table import Table
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from linearize.kernels.gdn import chunk_triton as gdn_chunk  # noqa: E402
from linearize.kernels.gdn import terms_triton as gdn_terms  # noqa: E402
from linearize.kernels.gla import backward_triton, chunk_triton  # noqa: E402
from linearize.kernels.gla.backward_triton import gla_bwd_dkv_kernel, gla_bwd_dq_kernel  # noqa: E402
from linearize.kernels.gla.chunk_triton import gla_fwd_kernel  # noqa: E402
from linearize.kernels.gsa import chunk_triton as gsa_chunk  # noqa: E402
from linearize.kernels.liger import segment_states_triton as seg  # noqa: E402
from linearize.kernels.liger import window_bwd_triton as wb  # noqa: E402
from linearize.kernels.liger import window_fwd_triton as wf  # noqa: E402
from linearize.kernels.liger.decode_triton import accumulator_rows, default_tile, liger_decode_kernel  # noqa: E402

# argument name -> Triton type; pointers to the I/O dtype are "*io" and filled in per run
TYPES = {
    **{n: "*io" for n in ("q", "k", "v", "g", "do", "o")},
    **{n: "*fp32" for n in ("cos", "sin", "h0", "ht", "dht", "dh0", "qdq", "dq", "dk", "dv", "lse", "dlse", "delta",
                            "state", "local", "totals", "start", "before", "after", "dq_add", "dk_add", "dv_add")},
    **{n: "*io" for n in ("k_ring", "v_ring")},
    "ring_valid": "*u8", "position": "*i64", "starts": "*i32", "cu_seqlens": "*i32", "window_starts": "*i32",
    **{n: "i32" for n in ("T", "TOTAL", "NT", "TABLE_T", "s_cos_b", "s_qb", "s_kb", "s_vb", "slot", "ROWS", "rows",
                          "pieces")},
    # gsa's slot scores: the feature maps as fp32 pointers (the model's are bf16: similar registers)
    **{n: "*fp32" for n in ("fq", "fk", "u", "log_gate", "s", "ds", "du", "dq_parts", "dk_parts")},
    # gdn's chunk terms and sweep: fp32 throughout, but q, k, v, o, do are named as the Liger kernels' ("*io")
    **{n: "*fp32" for n in ("Qe", "Oe", "W", "U", "Kr", "Kw", "dec", "dqe_parts", "dw_parts", "dkr_parts", "dkw_parts",
                            "ddec_parts", "vc", "dQe", "dOe", "dW", "dU", "dKr", "dKw", "dvc", "ddec", "dg", "dbeta",
                            "beta", "states")},
    "NC": "i32",
    **{n: "fp32" for n in ("scale", "gate_mult", "mix", "win_scale")},
}


def sweep_warps(sweep: str, D: int, many: bool) -> int:
    """The Liger sweeps' warps as gla_bwd picks them, with more programs than SMs (many) or fewer."""
    return backward_triton.default_warps(sweep, True, D, 2 if many else 1, torch.device("cpu"))  # 1 "SM" on CPU


def prefetch(sweep: str, feature_map: bool, K: int) -> bool:
    """Whether a backward sweep loads its next block ahead, as gla_bwd picks it with few programs."""
    return backward_triton.default_prefetch(sweep, feature_map, K, 1, torch.device("cpu"))


def plain_warps(sweep: str, K: int) -> int:
    """The plain (no feature map) sweeps' warps as gla_bwd picks them."""
    return backward_triton.default_warps(sweep, False, K, 1, torch.device("cpu"))


def decode_tile(D: int, HQ: int, HS: int) -> dict:
    """The decode kernel's BK and BV as liger_decode_step picks them, with more programs than SMs."""
    block_k, block_v = default_tile(D, HQ, HS, 1 << 20, torch.device("cpu"))
    return dict(BK=block_k, BV=block_v)


def configs(D: int, HQ: int, HKV: int) -> list[tuple]:
    """(label, kernel, constexprs, num_warps, num_stages[, argument types that differ from TYPES]) as the
    launch wrappers pick them."""
    BT = chunk_triton.BT
    common = dict(HQ=HQ, HKV=HKV, IS_VARLEN=False, LOW_PRECISION=True, DIAG_F32=False, PREFETCH=True)
    block_kv = wb.BKV_WIDE if D >= 128 else wb.BQ
    # the window backward as the Liger layer runs it: the sweeps' fp32 rows added in (dk, dv's per query
    # head), the sums written in the I/O dtype; hedgehog's window writes fresh fp32 gradients
    window = dict(HQ=HQ, HKV=HKV, D=D, W=64, BQ=wb.BQ, LOW_PRECISION=True, ACCUMULATE=True)
    io_grads = {n: "*io" for n in ("dq", "dk", "dv")}
    # the chunked gsa kernel as the model runs it: bf16 feature maps, products in bf16
    chunk_slots = dict(H=HQ, D=D, M=64, BT=gsa_chunk.BT, LOW_PRECISION=True, PRECISION="tf32",
                       **dict(zip(("BD", "BM"), chunk_triton.state_tile(D, 64), strict=True)))
    # gdn's chunk kernels as training runs them (one TF32 pass under autocast; fp32 outside autocast
    # takes three passes, tf32x3, which spills more at D 128: docs/kernels.md, tenth session)
    terms = dict(H=HQ, D=D, V=D, BD=D, BV=D, BT=gdn_terms.BT, MID=gdn_terms.MID)
    sweep = dict(D=D, V=D, BT=gdn_chunk.BT, **dict(zip(("BD", "BV"), chunk_triton.state_tile(D, D), strict=True)))
    fwd_bv, fwd_warps = chunk_triton.forward_tile(D, D)  # as gla_fwd launches: Liger's heads, hedgehog's 2D features
    hh_bv, hh_warps = chunk_triton.forward_tile(2 * D, D)
    decode = dict(HQ=HQ, HKV=HKV, K=D, W=64, BW=64)
    seg_bt, seg_bv = seg.tile(D, D)
    seg_tiles = dict(HKV=HKV, K=D, V=D, BV=seg_bv)
    return [
        ("forward (Liger, fused)", gla_fwd_kernel,
         dict(common, K=D, V=D, BT=BT, BV=fwd_bv, WINDOW=64, FEATURE_MAP=True, USE_H0=False, STORE_HT=False,
              PRELOAD=False, ADD_TO_OUT=False),
         fwd_warps, 1),
        ("forward (Liger, fused, sequence segment)", gla_fwd_kernel,
         dict(common, K=D, V=D, BT=BT, BV=fwd_bv, WINDOW=64, FEATURE_MAP=True, USE_H0=True, STORE_HT=False,
              PRELOAD=True, IS_VARLEN=True, ADD_TO_OUT=False),
         8, 1),  # liger/segmented.py launches 8 warps at every size
        ("backward dq sweep (Liger)", gla_bwd_dq_kernel,
         dict(common, K=D, V=D, BT=BT, BK=D, FEATURE_MAP=True, USE_H0=False), sweep_warps("dq", D, many=True), 1),
        ("backward dk/dv sweep (Liger)", gla_bwd_dkv_kernel,
         dict(common, K=D, V=D, BT=BT, BV=D, FEATURE_MAP=True, USE_DHT=False, STORE_DH0=False,
              PREFETCH=prefetch("dkv", True, D)),
         sweep_warps("dkv", D, many=True), 1),
        ("backward dq sweep (Liger, sequence segment)", gla_bwd_dq_kernel,
         dict(common, K=D, V=D, BT=BT, BK=D, FEATURE_MAP=True, USE_H0=True, IS_VARLEN=True),
         sweep_warps("dq", D, many=False), 1),
        ("backward dk/dv sweep (Liger, sequence segment)", gla_bwd_dkv_kernel,
         dict(common, K=D, V=D, BT=BT, BV=D, FEATURE_MAP=True, USE_DHT=True, STORE_DH0=True, IS_VARLEN=True,
              PREFETCH=prefetch("dkv", True, D)),
         sweep_warps("dkv", D, many=False), 1),
        ("segment states: each segment's own (segmented.py)", seg.segment_local_states_kernel,
         dict(seg_tiles, BT=seg_bt, PRECISION="tf32"), *seg._launch("states", D).values()),
        ("segment states: each segment's gradient", seg.segment_local_grads_kernel,
         dict(seg_tiles, HQ=HQ, BT=seg_bt, PRECISION="tf32"), *seg._launch("grads", D).values()),
        ("segment states: the scan across segments", seg.segment_scan_kernel,
         dict(seg_tiles, HQ=HQ, LOCAL_H=HKV, USE_START=True, REVERSE=False, STORE_AFTER=True), 4, 1),
        ("backward dq sweep (chunk_gla)", gla_bwd_dq_kernel,
         dict(common, K=D, V=D, BT=BT, BK=min(D, 64), FEATURE_MAP=False, USE_H0=False), plain_warps("dq", D), 1),
        ("backward dk/dv sweep (chunk_gla)", gla_bwd_dkv_kernel,
         dict(common, K=D, V=D, BT=BT, BV=min(D, 64), FEATURE_MAP=False, USE_DHT=False, STORE_DH0=False,
              PREFETCH=prefetch("dkv", False, D)),
         plain_warps("dkv", D), 1),
        # hedgehog's linear part: chunk_gla on 2D features [softmax(x), softmax(-x)], values of D
        ("forward (chunk_gla, hedgehog's 2D features)", gla_fwd_kernel,
         dict(common, K=2 * D, V=D, BT=BT, BV=hh_bv, WINDOW=0, FEATURE_MAP=False,
              USE_H0=False, STORE_HT=True, PRELOAD=False, ADD_TO_OUT=False),
         hh_warps, 1),
        ("backward dq sweep (chunk_gla, hedgehog's 2D features)", gla_bwd_dq_kernel,
         dict(common, K=2 * D, V=D, BT=BT, BK=64, FEATURE_MAP=False, USE_H0=False), plain_warps("dq", 2 * D), 1),
        ("backward dk/dv sweep (chunk_gla, hedgehog's 2D features)", gla_bwd_dkv_kernel,
         dict(common, K=2 * D, V=D, BT=BT, BV=min(D, 64), FEATURE_MAP=False, USE_DHT=True, STORE_DH0=False,
              PREFETCH=prefetch("dkv", False, 2 * D)),
         plain_warps("dkv", 2 * D), 1),
        ("window forward", wf.window_fwd_kernel,
         dict(HQ=HQ, HKV=HKV, D=D, W=64, BQ=wf.BQ, IS_VARLEN=False, LOW_PRECISION=True, STORE_LSE=False), wf.warps(D), wf.stages(D)),
        ("window forward with its lse (hedgehog)", wf.window_fwd_kernel,
         dict(HQ=HQ, HKV=HKV, D=D, W=64, BQ=wf.BQ, IS_VARLEN=False, LOW_PRECISION=True, STORE_LSE=True), wf.warps(D), wf.stages(D)),
        ("forward (Liger, window split off: GLA sweep adding to o)", gla_fwd_kernel,
         dict(common, K=D, V=D, BT=BT, BV=fwd_bv, WINDOW=0, FEATURE_MAP=True, USE_H0=False, STORE_HT=False,
              PRELOAD=False, ADD_TO_OUT=True),
         fwd_warps, 1),
        ("window backward dq (Liger)", wb.window_dq_kernel, dict(window, HAS_DLSE=False), *wb.launch("dq").values(),
         io_grads),
        ("window backward dq, lse gradient (hedgehog)", wb.window_dq_kernel,
         dict(window, HAS_DLSE=True, ACCUMULATE=False), *wb.launch("dq").values()),
        (f"window backward dk/dv ({block_kv} keys, Liger: sums the group's rows)", wb.window_dkv_kernel,
         dict(window, BKV=block_kv, ADD_GROUP=HQ // HKV), *wb.launch("dkv").values(), io_grads),
        (f"window backward dk/dv ({block_kv} keys, hedgehog)", wb.window_dkv_kernel,
         dict(window, BKV=block_kv, ACCUMULATE=False, ADD_GROUP=1), *wb.launch("dkv").values()),
        ("gsa slot scores, chunked forward (64 slots)", gsa_chunk.chunk_scores_fwd_kernel,
         dict(chunk_slots, USE_H0=True, STORE_HT=True, GRAD_Q=False), 8, 1),
        ("gsa slot scores, chunked dq (64 slots)", gsa_chunk.chunk_scores_fwd_kernel,
         dict(chunk_slots, USE_H0=True, STORE_HT=False, GRAD_Q=True), 8, 1),
        ("gsa slot scores, chunked backward (64 slots)", gsa_chunk.chunk_scores_bwd_kernel,
         dict(chunk_slots, USE_DHT=True), 8, 1),
        ("gdn delta rule, chunk terms (TF32: autocast)", gdn_terms.chunk_terms_fwd_kernel, dict(terms, PRECISION="tf32"), 4, 1),
        ("gdn delta rule, chunk terms back (TF32)", gdn_terms.chunk_terms_bwd_kernel, dict(terms, PRECISION="tf32"), 8, 1),
        ("gdn delta rule, chunk sweep (TF32)", gdn_chunk.chunk_delta_fwd_kernel,
         dict(sweep, STORE_STATES=False, PRECISION="tf32"), 8, 1),
        ("gdn delta rule, chunk sweep back (TF32)", gdn_chunk.chunk_delta_bwd_kernel,
         dict(sweep, USE_DHT=True, PRECISION="tf32"), 8, 1),
        ("decode step (Liger, window 64, state per query head)", liger_decode_kernel,
         dict(decode, HS=HQ, **decode_tile(D, HQ, HQ), GB=accumulator_rows(1), SLOT_IN_MEMORY=False), 4, 3),
        ("decode step (Liger, window 64, state per kv head, CUDA-graph slot)", liger_decode_kernel,
         dict(decode, HS=HKV, **decode_tile(D, HQ, HKV), GB=accumulator_rows(HQ // HKV), SLOT_IN_MEMORY=True), 4, 3),
    ]


def compile_report(kernel, constexprs: dict, io: str, arch: int, num_warps: int, num_stages: int,
                   types: dict | None = None) -> dict:
    names = list(kernel.arg_names)
    types = {**TYPES, **(types or {})}
    signature = {n: "constexpr" if n in constexprs else types[n].replace("io", io) for n in names}
    # pointers 16-byte aligned, as the JIT specialises them for torch's allocations: without it the
    # compiler cannot vectorise a load, and registers and spills differ from the running kernel's
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if signature[n].startswith("*")}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(n),): v for n, v in constexprs.items()}, attrs=aligned)
    start = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    seconds = time.perf_counter() - start
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    field = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return dict(registers=field.get("REG"), stack_bytes=field.get("STACK"), shared_bytes=compiled.metadata.shared,
                compile_s=seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 = H100/H200, 80 = A100")
    p.add_argument("--shapes", default="128:32:32,128:32:8,64:9:3", help="head_dim:q_heads:kv_heads, comma-separated")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--json", type=Path)
    p.add_argument("--warps", type=int, default=None, help="override every kernel's num_warps (to try settings)")
    p.add_argument("--stages", type=int, default=None, help="override every kernel's num_stages (software pipelining)")
    p.add_argument("--only", default="", help="only kernels whose label contains this text")
    args = p.parse_args()
    console = Console(width=150)
    table = Table(title=f"Triton {triton.__version__} kernels compiled for sm_{args.arch}, {args.dtype} I/O")
    for col in ("kernel", "D", "Hq/Hkv", "warps", "stages", "registers", "spill (stack B)", "shared KiB", "compile s"):
        table.add_column(col, justify="left" if col == "kernel" else "right")
    rows = []
    for shape in args.shapes.split(","):
        D, HQ, HKV = (int(x) for x in shape.split(":"))
        for label, kernel, constexprs, warps, stages, *types in configs(D, HQ, HKV):
            if args.only not in label:
                continue
            warps, stages = args.warps or warps, args.stages or stages
            try:
                r = compile_report(kernel, constexprs, args.dtype, args.arch, warps, stages, *types)
            except Exception as e:  # noqa: BLE001 - a kernel that does not build is a row of the report
                r = dict(error=f"{type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}")
            rows.append(dict(kernel=label, head_dim=D, q_heads=HQ, kv_heads=HKV, num_warps=warps, num_stages=stages, **r))
            if "error" in r:
                table.add_row(label, str(D), f"{HQ}/{HKV}", str(warps), str(stages), "[red]" + r["error"][:60], "", "", "")
                continue
            spill = r["stack_bytes"]
            table.add_row(label, str(D), f"{HQ}/{HKV}", str(warps), str(stages), str(r["registers"]),
                          f"[red]{spill}[/]" if spill else "0", f"{r['shared_bytes'] / 1024:.0f}", f"{r['compile_s']:.1f}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(dict(triton=triton.__version__, arch=f"sm_{args.arch}", dtype=args.dtype,
                                             rows=rows), indent=1))


if __name__ == "__main__":
    main()
