"""`linearize bench CKPT`: prefill/decode speed and memory against context, beside a reference model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..bench import BenchOptions
from . import app

D = {name: field.default for name, field in BenchOptions.model_fields.items()}  # defaults live in BenchOptions


@app.command("bench")
def bench_command(
    checkpoint: Annotated[str, typer.Argument(help="Converted checkpoint (or any causal LM): folder, Hub id or .gguf.")],
    teacher: Annotated[bool, typer.Option("--teacher", help="Reference: the same checkpoint in teacher (softmax) mode.")] = False,
    compare: Annotated[str | None, typer.Option("--compare", metavar="SOURCE", help="Reference: another model.")] = None,
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = ",".join(map(str, D["batches"])),
    context: Annotated[str, typer.Option(help="Comma-separated context lengths (k = 1024).")] = ",".join(
        f"{c // 1024}k" if c % 1024 == 0 else str(c) for c in D["contexts"]
    ),
    new_tokens: Annotated[int, typer.Option(help="Decode steps timed after each prefill.")] = D["new_tokens"],
    prefill_chunk: Annotated[int, typer.Option(help="Tokens per prefill forward pass.")] = D["prefill_chunk"],
    cuda_graph: Annotated[bool, typer.Option(
        "--cuda-graph/--no-cuda-graph", help="On CUDA, replay a recorded decode step (converted models).")] = D["cuda_graph"],
    compile: Annotated[bool, typer.Option(
        "--compile", help="torch.compile each layer's norms and MLP first (fewer, fused kernels per decode step).")] = D["compile"],
    fuse: Annotated[bool, typer.Option(
        "--fuse", help="One GEMM for each converted layer's q/k/v and each MLP's gate/up (no memory added).")] = D["fuse"],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = D["device"],
    dtype: Annotated[str, typer.Option(help="auto (the checkpoint's), float32, float16 or bfloat16.")] = D["dtype"],
    json_out: Annotated[Path | None, typer.Option("--json", metavar="OUT", help="Also write the results as JSON.")] = None,
    plot_out: Annotated[Path | None, typer.Option("--plot", metavar="OUT.png", help="Plot decode tok/s and memory (needs matplotlib).")] = None,
) -> None:
    """Prefill and decode tokens/s, peak memory, recurrent-state and KV bytes at each context; OOM rows, not crashes."""
    from ..bench import BenchOptions, parse_sizes, plot, render, run_bench
    from ..evaluate.report import write_json

    opts = BenchOptions(
        checkpoint=checkpoint, teacher=teacher, compare=compare, batches=parse_sizes(batch, "--batch"),
        contexts=parse_sizes(context, "--context"), new_tokens=new_tokens, prefill_chunk=prefill_chunk,
        cuda_graph=cuda_graph, compile=compile, fuse=fuse, device=device, dtype=dtype, json_out=json_out, plot_out=plot_out,
    )
    if opts.plot_out is not None:  # fail before minutes of measuring, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            from ..errors import LinearizeError

            raise LinearizeError("--plot needs matplotlib: pip install matplotlib, or leave out --plot") from None
    report = run_bench(opts)
    render(report)
    if opts.json_out:
        write_json(report, opts.json_out)
    if opts.plot_out:
        plot(report, opts.plot_out)
