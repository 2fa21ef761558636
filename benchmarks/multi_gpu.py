"""Recovery on several GPUs against one: the same loss curve at equal global batch, and the speed-up.

Runs `linearize recover` once per configuration on the same checkpoint, data and seed — one process
with `--grad-accum A`, then N processes with `--grad-accum A/N` replicated (DDP arithmetic) and, with
`--fsdp`, sharded — and compares each run's metrics.jsonl with the one-process run step by step:
the largest loss difference, the last validation losses, and steady tokens/s (the first steps, which
compile kernels, left out). Prints a table and writes JSON with the device name.

    python benchmarks/multi_gpu.py --ckpt CONVERTED --data alpaca_5000.json --tokens 3M --gpus 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table


def runs(gpus: int, accum: int) -> list[tuple[str, list[str]]]:
    """(name, extra recover arguments) per configuration, all at the same global batch."""
    if accum % gpus:
        sys.exit(f"--grad-accum {accum} must be divisible by --gpus {gpus} to keep the global batch equal")
    return [
        ("1 GPU", ["--nproc", "1", "--grad-accum", str(accum)]),
        (f"{gpus} GPUs, replicated", ["--nproc", str(gpus), "--grad-accum", str(accum // gpus)]),
        (f"{gpus} GPUs, FSDP2", ["--nproc", str(gpus), "--grad-accum", str(accum // gpus), "--fsdp"]),
    ]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def steady_rate(records: list[dict], skip: int) -> float:
    """Tokens/s after the first `skip` steps. Each record's tokens_per_s is the stage's running average
    (tokens since the stage began over time since then), so the elapsed time at a step is tokens / rate."""
    first, last = records[min(skip, len(records) - 2)], records[-1]
    elapsed = [r["tokens"] / r["tokens_per_s"] for r in (first, last)]
    return (last["tokens"] - first["tokens"]) / (elapsed[1] - elapsed[0])


def compare(base: list[dict], other: list[dict]) -> dict:
    """Step-by-step agreement of a run's losses with the one-process run's."""
    steps = min(len(base), len(other))
    loss = [abs(a["loss"] - b["loss"]) for a, b in zip(base[:steps], other[:steps], strict=True)]
    val = [(a["val_loss"], b["val_loss"]) for a, b in zip(base[:steps], other[:steps], strict=True) if "val_loss" in a]
    return {"steps_compared": steps, "max_abs_loss_diff": max(loss),
            "max_rel_loss_diff": max(d / abs(a["loss"]) for d, a in zip(loss, base, strict=False)),
            "max_abs_val_loss_diff": max((abs(a - b) for a, b in val), default=None)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a converted checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--tokens", default="3M")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=8, help="of the one-process run; the others divide it")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--device", default="cuda", help="cpu: the same runs as processes on gloo (a smoke test)")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--skip-steps", type=int, default=3, help="first steps left out of the steady tokens/s")
    p.add_argument("--only", default="", help="comma-separated run numbers (1-based), default all")
    p.add_argument("--run-dir", default="runs/multi_gpu")
    p.add_argument("--json", default="multi_gpu.json")
    args = p.parse_args()
    console = Console()
    available = torch.cuda.device_count()
    if args.device == "cuda" and available < args.gpus:
        sys.exit(f"--gpus {args.gpus} needs that many CUDA devices; this machine has {available}")
    chosen = runs(args.gpus, args.grad_accum)
    if args.only:
        chosen = [chosen[int(i) - 1] for i in args.only.split(",")]
    run_dir = Path(args.run_dir)
    rows, curves = [], []
    for name, extra in chosen:
        out = run_dir / name.replace(" ", "-").replace(",", "")
        cmd = [sys.executable, "-m", "linearize", "recover", args.ckpt, "--data", args.data, "-o", str(out),
               "--tokens", args.tokens, "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
               "--eval-every", str(args.eval_every), "--save-every", "1000000", "--device", args.device, *extra]
        console.print(f"[bold]{name}[/]: {' '.join(cmd[2:])}")
        start = time.perf_counter()
        code = subprocess.call(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.perf_counter() - start
        if code != 0:
            sys.exit(f"{name}: recover exited with code {code}")
        records = metrics(out)
        curves.append(records)
        rows.append({"run": name, "args": extra, "steps": len(records), "tokens": records[-1]["tokens"],
                     "final_loss": records[-1]["loss"], "final_val_loss": records[-1].get("val_loss"),
                     "steady_tokens_per_s": steady_rate(records, args.skip_steps), "wall_s": wall,
                     "losses": [r["loss"] for r in records],
                     "val_losses": {r["step"]: r["val_loss"] for r in records if "val_loss" in r}})
    for row, records in zip(rows, curves, strict=True):
        row.update(compare(curves[0], records))
        row["speedup"] = row["steady_tokens_per_s"] / rows[0]["steady_tokens_per_s"]

    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    table = Table(title=f"recover on {args.gpus} GPUs vs 1, equal global batch ({device})")
    for col in ("run", "steps", "final loss", "final val loss", "max |Δloss| vs 1 GPU", "max |Δval|",
                "tokens/s (steady)", "speed-up", "wall s"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in rows:
        table.add_row(r["run"], str(r["steps"]), f"{r['final_loss']:.4f}",
                      "-" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}",
                      f"{r['max_abs_loss_diff']:.2e}",
                      "-" if r["max_abs_val_loss_diff"] is None else f"{r['max_abs_val_loss_diff']:.2e}",
                      f"{r['steady_tokens_per_s']:,.0f}", f"{r['speedup']:.2f}x", f"{r['wall_s']:.0f}")
    console.print(table)
    meta = {"device": device, "gpus": args.gpus, "torch": torch.__version__, "ckpt": args.ckpt, "data": args.data,
            "tokens": args.tokens, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
            "global_batch_blocks": args.micro_batch * args.grad_accum, "command": " ".join(sys.argv)}
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
