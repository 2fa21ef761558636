"""`linearize eval CKPT`: perplexity and zero-shot accuracy, beside a reference model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..evaluate.options import EvalOptions
from . import app

D = {name: field.default for name, field in EvalOptions.model_fields.items()}  # defaults live in EvalOptions


@app.command("eval")
def eval_command(
    checkpoint: Annotated[str, typer.Argument(help="Converted checkpoint (or any causal LM): folder, Hub id or .gguf.")],
    teacher: Annotated[bool, typer.Option("--teacher", help="Reference row: the same checkpoint in teacher (softmax) mode.")] = False,
    compare: Annotated[str | None, typer.Option("--compare", metavar="SOURCE", help="Reference row: another model.")] = None,
    ppl: Annotated[list[Path] | None, typer.Option("--ppl", metavar="FILE", help="Text file for perplexity (repeatable).")] = None,
    context: Annotated[int | None, typer.Option(help="Window length in tokens (default: model positions, at most 1024).")] = None,
    stride: Annotated[int | None, typer.Option(help="Step between perplexity windows (default: context / 2).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Score only the first N tokens of each --ppl file.")] = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated tasks, e.g. arc_easy,piqa,winogrande,lambada_openai.")] = None,
    task_dir: Annotated[Path | None, typer.Option(help="Folder of TASK.jsonl files (default: $LINEARIZE_TASK_DIR).")] = None,
    limit: Annotated[int | None, typer.Option(help="First N items of each task.")] = None,
    harness: Annotated[str | None, typer.Option(metavar="TASKS", help="Comma-separated lm-evaluation-harness tasks (needs the eval extra).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows or requests per forward pass.")] = D["batch_size"],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = D["device"],
    dtype: Annotated[str, typer.Option(help="auto (the checkpoint's), float32, float16 or bfloat16.")] = D["dtype"],
    json_out: Annotated[Path | None, typer.Option("--json", metavar="OUT", help="Also write the results as JSON.")] = None,
) -> None:
    """Perplexity (strided windows) and zero-shot tasks; with a reference: model | reference | recovered %."""
    from ..evaluate import EvalOptions, run_eval, split_list
    from ..evaluate.report import render, write_json

    opts = EvalOptions(
        checkpoint=checkpoint, teacher=teacher, compare=compare, ppl_files=ppl or [], context=context, stride=stride,
        max_tokens=max_tokens, tasks=split_list(tasks), task_dir=task_dir, limit=limit, harness=split_list(harness),
        batch_size=batch_size, device=device, dtype=dtype, json_out=json_out,
    )
    result = run_eval(opts)
    render(result)
    if opts.json_out:
        write_json(result, opts.json_out)
