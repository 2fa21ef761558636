"""recover: LoRA recovery of a converted checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ..recover.options import RecoverOptions
from . import app

D = {name: field.default for name, field in RecoverOptions.model_fields.items()}
H = {name: field.description for name, field in RecoverOptions.model_fields.items()}


@app.command()
def recover(
    ckpt: str = typer.Argument(..., help=H["ckpt"]),
    data: str = typer.Option(..., "--data", help=H["data"]),
    out: Path = typer.Option(..., "-o", "--out", help=H["out"]),
    format: str = typer.Option(D["format"], "--format", help="auto, alpaca, text or chat"),
    tokens: str | None = typer.Option(None, help=H["tokens"]),
    epochs: float = typer.Option(D["epochs"], help=H["epochs"]),
    seq_len: int = typer.Option(D["seq_len"], help=H["seq_len"]),
    lora_r: int = typer.Option(D["lora_r"], help=H["lora_r"]),
    lora_alpha: float = typer.Option(D["lora_alpha"], help=H["lora_alpha"]),
    lora_targets: str = typer.Option(",".join(D["lora_targets"]), help=H["lora_targets"]),
    loss: str = typer.Option(D["loss"], help="lm, kd or lm+kd"),
    kd_weight: float = typer.Option(D["kd_weight"], help=H["kd_weight"]),
    stages: str = typer.Option(",".join(D["stages"]), help=H["stages"]),
    stage_tokens: str = typer.Option("", help=H["stage_tokens"]),
    lr: float = typer.Option(D["lr"], help=H["lr"]),
    schedule: str = typer.Option(D["schedule"], help="cosine or constant"),
    warmup_ratio: float = typer.Option(D["warmup_ratio"], help=H["warmup_ratio"]),
    max_grad_norm: float = typer.Option(D["max_grad_norm"], help=H["max_grad_norm"]),
    micro_batch: int = typer.Option(D["micro_batch"], help=H["micro_batch"]),
    grad_accum: int = typer.Option(D["grad_accum"], help=H["grad_accum"]),
    gradient_checkpointing: bool = typer.Option(D["gradient_checkpointing"], help=H["gradient_checkpointing"]),
    cuda_graph: bool = typer.Option(D["cuda_graph"], help=H["cuda_graph"]),
    eval_every: int = typer.Option(D["eval_every"], help=H["eval_every"]),
    save_every: int = typer.Option(D["save_every"], help=H["save_every"]),
    seed: int = typer.Option(D["seed"], help=H["seed"]),
    device: str = typer.Option(D["device"], help=H["device"]),
    resume: bool = typer.Option(D["resume"], help=H["resume"]),
    stop_after_steps: int | None = typer.Option(None, help=H["stop_after_steps"]),
    merge: bool = typer.Option(D["merge"], help=H["merge"]),
    overwrite: bool = typer.Option(D["overwrite"], help=H["overwrite"]),
    nproc: int = typer.Option(D["nproc"], help=H["nproc"]),
    fsdp: bool = typer.Option(D["fsdp"], help=H["fsdp"]),
) -> None:
    """Recover a converted model's quality with LoRA (Liger's recipe by default)."""
    from pydantic import ValidationError

    from ..errors import LinearizeError
    from ..recover.trainer import recover as run_recover

    fields = dict(locals())
    fields["lora_targets"] = [t.strip() for t in lora_targets.split(",") if t.strip()]
    fields["stages"] = [s.strip() for s in stages.split(",") if s.strip()]
    try:
        opts = RecoverOptions(**{k: v for k, v in fields.items() if k in RecoverOptions.model_fields})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise LinearizeError(f"--{where.replace('_', '-')}: {first['msg']}") from None
    console = Console(stderr=True)
    folder = run_recover(opts, console)
    console.print(f"[green]recovered[/] adapter written to {folder}")

