"""GPU decode benchmark: a converted model against its own softmax teacher, random weights.

Speed does not depend on the weights' values, so the models are built from a config on the GPU
(no download, no checkpoint), converted in memory, and measured with `linearize.bench`: the
converted model, then the very same weights in teacher (softmax) mode.

    python benchmarks/decode.py --shape llama3-8b --batch 16 --context 1k,4k,16k,32k \
        --new-tokens 256 --json out/decode-8b.json --plot out/decode-8b.png

Targets (H100, bf16, batch 16): decode memory flat with context; at 32K decode >= 4x the
softmax model's tokens/s; decode step within 1.5x of the weight-read floor. The script prints
the figures and a verdict for each, met or not.

`--profile` adds where one decode step's GPU time goes (eager steps under torch.profiler: the
weight GEMMs, the Liger decode kernel, everything else), against the floor. `--compile` runs each
layer's norms and MLP through torch.compile (fusing their elementwise kernels) before measuring.
`--fuse` first concatenates each converted layer's q/k/v weights and each MLP's gate/up weights,
so each group is one GEMM (decoding.fuse_projections; the parameters become views, no memory added).
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console
from shapes import SHAPES, random_llama

from linearize import teacher
from linearize.bench import (
    BenchOptions,
    Run,
    Side,
    bench_sides,
    measure_bandwidth,
    parse_sizes,
    plot,
    render,
    speedups,
    sync,
    weight_bytes,
)
from linearize.decoding import GreedyDecoder
from linearize.evaluate.report import write_json
from linearize.families import family_for
from linearize.modeling import default_settings, linearize_model


def build(shape: str, dtype: torch.dtype, window: int, keep: list[int]) -> torch.nn.Module:
    model = random_llama(shape, dtype).eval()
    settings = default_settings(window=window, keep_attention=keep, source=f"random {shape}", family="llama")
    return linearize_model(model, family_for("llama"), settings)


def verdicts(report: dict, batch: int, console: Console) -> None:
    """The issue's three targets, each met or not, with the numbers behind it."""
    rows = [r for r in report["rows"] if r["model"] == "model" and r["batch"] == batch and r["status"] == "ok"]
    if not rows:
        console.print(f"batch {batch}: no converted-model row ran")
        return
    peaks = [r["decode_peak_bytes"] for r in sorted(rows, key=lambda r: r["context"])]
    growth = peaks[-1] / peaks[0]
    console.print(f"batch {batch}: converted decode peak memory {peaks[0] / 2**30:.2f} -> {peaks[-1] / 2**30:.2f} GiB "
                  f"from {rows[0]['context']} to {rows[-1]['context']} tokens (x{growth:.3f}): "
                  f"{'flat' if growth < 1.05 else 'NOT flat'}")
    longest = max(r["context"] for r in rows)
    ref = next((r for r in report["rows"] if r["model"] == "reference" and r["batch"] == batch and r["context"] == longest), None)
    ratio = speedups(report).get((batch, longest))
    if ref is not None and ref["status"] != "ok":
        console.print(f"batch {batch}, context {longest}: softmax reference ran out of memory; converted decodes "
                      f"{next(r for r in rows if r['context'] == longest)['decode_tok_s']:,.0f} tok/s")
    elif ratio is not None:
        console.print(f"batch {batch}, context {longest}: decode {ratio:.2f}x the softmax model's tokens/s "
                      f"(target >= 4x: {'met' if ratio >= 4 else 'NOT met'})")
    for r in rows:
        console.print(f"batch {batch}, context {r['context']}: decode step {r['decode_step_ms']:.2f} ms = "
                      f"{r['floor_ratio']:.2f}x the weight-read floor (target <= 1.5x: "
                      f"{'met' if r['floor_ratio'] <= 1.5 else 'NOT met'})")


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    if any(word in name for word in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk")):
        return "weight GEMMs"
    if "liger_decode" in name:
        return "Liger decode kernel"
    return "other (norms, activations, adds, copies, argmax)"


@torch.inference_mode()
def profile_step(model: torch.nn.Module, batch: int, context: int, console: Console, steps: int = 5,
                 device: torch.device = torch.device("cuda")) -> dict:
    """Where an eager decode step's GPU time goes, by kind of kernel, against the weight-read floor.
    Eager steps run the same kernels as a graph replay, each visible to the profiler."""
    run = Run(model)
    run.prefill(torch.randint(model.config.vocab_size, (batch, context), device=device), 4096)
    decoder = GreedyDecoder(model, run.cache, run.logits)
    decoder.run(3)  # first calls compile and tune
    sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        decoder.run(steps)
        sync(device)
    kinds: dict[str, list[float]] = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
            entry = kinds.setdefault(kind_of(e.key), [0, 0.0])
            entry[0] += e.count / steps
            entry[1] += e.self_device_time_total / steps / 1e3  # ms per step
    decoder.release()
    run.close()
    floor_ms = weight_bytes(model) / measure_bandwidth(device) * 1e3
    busy = sum(ms for _, ms in kinds.values()) or float("nan")  # nan: no GPU kernels seen
    console.print(f"one eager decode step, batch {batch}, context {context}: GPU busy {busy:.2f} ms, "
                  f"weight-read floor {floor_ms:.2f} ms")
    for kind, (count, ms) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        console.print(f"  {kind:50s} {count:6.0f} kernels {ms:7.3f} ms  ({ms / busy:.0%})")
    gemm = kinds.get("weight GEMMs", [0, 0.0])[1]
    if gemm:
        console.print(f"  the GEMMs read the weights at {floor_ms / gemm:.0%} of the copy bandwidth")
    return {"batch": batch, "context": context, "gpu_busy_ms": busy, "floor_ms": floor_ms,
            "kinds": {k: {"kernels_per_step": c, "ms_per_step": ms} for k, (c, ms) in kinds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--batch", default="16")
    parser.add_argument("--context", default="1k,4k,16k,32k")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prefill-chunk", type=int, default=4096)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--keep-attention", default="", help="layers left as softmax, e.g. 0,16")
    parser.add_argument("--no-reference", action="store_true", help="skip the softmax teacher rows")
    parser.add_argument("--torch-kernels", action="store_true",
                        help="run converted layers on the plain-PyTorch kernels instead of Triton (a baseline, or a workaround)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="time eager decode steps, not graph replays")
    parser.add_argument("--compile", action="store_true", help="torch.compile each layer's norms and MLP first")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode for --compile, e.g. max-autotune-no-cudagraphs (inductor's GEMMs)")
    parser.add_argument("--fuse", action="store_true", help="one GEMM for q/k/v and one for gate/up first")
    parser.add_argument("--profile", action="store_true",
                        help="also print where an eager decode step's GPU time goes (first batch and context)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode.py measures a GPU: no CUDA device here")

    device = torch.device("cuda")
    if args.torch_kernels:
        import linearize.kernels

        linearize.kernels._triton_ops = lambda: None  # the dispatcher's "auto" then picks PyTorch
    keep = [int(x) for x in args.keep_attention.split(",") if x.strip()]
    model = build(args.shape, torch.bfloat16, args.window, keep)
    opts = BenchOptions(checkpoint=f"random {args.shape}", teacher=not args.no_reference,
                        batches=parse_sizes(args.batch, "--batch"), contexts=parse_sizes(args.context, "--context"),
                        new_tokens=args.new_tokens, prefill_chunk=args.prefill_chunk, device="cuda", dtype="bfloat16",
                        cuda_graph=not args.no_cuda_graph, compile=args.compile,
                        compile_mode=args.compile_mode, fuse=args.fuse)
    sides = [Side("model", f"random {args.shape}, converted", model, nullcontext, softmax=False)]
    if not args.no_reference:
        sides.append(Side("reference", "teacher (softmax)", model, lambda: teacher(model), softmax=True))
    report = bench_sides(sides, opts, device)
    report["meta"]["shape"] = args.shape
    report["meta"]["kernels"] = "torch" if args.torch_kernels else "auto (triton on CUDA)"
    console = Console(width=160)
    render(report, console)
    for batch in opts.batches:
        verdicts(report, batch, console)
    if args.profile:
        report["profile"] = profile_step(model, opts.batches[0], opts.contexts[0], console)
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plot(report, args.plot)


if __name__ == "__main__":
    main()
