"""convert, info and generate: make a converted checkpoint, look at it, talk to it."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from ..errors import first_line
from ..options import ConvertOptions
from . import app

D = {name: field.default for name, field in ConvertOptions.model_fields.items()}
H = {name: field.description for name, field in ConvertOptions.model_fields.items()}

out_console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def _int_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated layer indices like 0,8,16, got {text!r}") from None


@app.command()
def convert(
    source: str = typer.Argument(..., help=H["source"]),
    out: Path = typer.Option(..., "-o", "--out", help=H["out"]),
    to: str = typer.Option(D["to"], "--to", help=H["to"]),
    window: int = typer.Option(D["window"], help="Sliding-window size of Liger Attention, in tokens."),
    no_window: bool = typer.Option(False, "--no-window", help="Pure gated linear attention, no window branch."),
    keep_attention: str | None = typer.Option(None, help=H["keep_attention"]),
    keep_attention_every: int | None = typer.Option(D["keep_attention_every"], help=H["keep_attention_every"]),
    gate: str = typer.Option(D["gate"], help=H["gate"]),
    slots: int = typer.Option(D["slots"], help=H["slots"]),
    dtype: str = typer.Option(D["dtype"], help=H["dtype"]),
    overwrite: bool = typer.Option(D["overwrite"], help=H["overwrite"]),
) -> None:
    """Convert a Llama / Mistral / Qwen2 / Qwen3 checkpoint to a Liger gated-linear model."""
    from ..convert import convert_with
    from ..errors import LinearizeError

    if not no_window and window <= 0:
        raise LinearizeError(f"--window must be a positive number of tokens, got {window} (use --no-window for pure GLA)")
    start = time.perf_counter()
    try:
        opts = ConvertOptions(
            source=source, out=out, to=to, window=0 if no_window else window, keep_attention=_int_list(keep_attention) or [],
            keep_attention_every=keep_attention_every, gate=gate, slots=slots, dtype=dtype,
            overwrite=overwrite,
        )
    except ValidationError as e:
        first = e.errors()[0]
        raise LinearizeError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    folder = convert_with(opts, command="linearize " + shlex.join(sys.argv[1:]), console=err_console)
    err_console.print(f"[green]converted[/] {source} -> {folder} in {time.perf_counter() - start:.1f} s")


@app.command()
def info(ckpt: str = typer.Argument(..., help="A converted (or any Llama-family) checkpoint folder, or a "
                                               "recovered adapter folder.")) -> None:
    """Family, target, kept layers, parameters, and decoding memory against the source's KV cache."""
    from transformers import AutoConfig

    from ..errors import LinearizeError
    from ..footprint import footprint
    from ..loading import adapter_base, split_source

    base = adapter_base(ckpt)
    path, extra = split_source(base or ckpt)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=True, **extra)
    except (OSError, ValueError) as e:
        raise LinearizeError(f"could not read {ckpt}: {first_line(e)}") from e
    fp = footprint(config)
    s = getattr(config, "linearize", None) or {}
    table = Table(title=f"{ckpt}", show_header=False)
    table.add_row("model type", config.model_type)
    table.add_row("family", s.get("family", config.model_type))
    table.add_row("target", s.get("target", "none (softmax attention)"))
    if s:
        table.add_row("window", str(s["window"]) if s["window"] else "none (pure GLA)")
        table.add_row("layers kept as softmax", ", ".join(map(str, s["keep_attention"])) or "none")
        table.add_row("source", str(s["source"]))
    if base:
        lora = json.loads((Path(ckpt).expanduser() / "adapter_config.json").read_text())
        targets = ", ".join(sorted(lora.get("target_modules") or []))
        table.add_row("adapter", f"LoRA r={lora.get('r')}, alpha={lora.get('lora_alpha')} on {targets}, over {base}")
    table.add_row("layers", f"{config.num_hidden_layers} ({fp.converted_layers} converted)")
    n_params = _count_parameters(Path(path)) if not extra else None
    table.add_row("parameters", f"{n_params:,}" if n_params is not None else "unknown")
    table.add_row("recurrent state per sequence", _bytes(fp.state_bytes))
    table.add_row("KV cache per token (kept layers)", _bytes(fp.kv_bytes_per_token))
    table.add_row("source KV cache per token", _bytes(fp.source_kv_bytes_per_token))
    if fp.state_bytes:
        table.add_row("source KV cache reaches the state at", f"{fp.state_bytes / fp.source_kv_bytes_per_token:,.0f} tokens")
    out_console.print(table)


def _count_parameters(folder: Path) -> int | None:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                total += _prod(st.get_slice(name).get_shape())
    return total


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


@app.command()
def generate(
    ckpt: str = typer.Argument(..., help="Checkpoint folder (converted or not) or Hub id."),
    prompt: str = typer.Argument(..., help="Text to continue."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate."),
    teacher: bool = typer.Option(False, help="Use the original softmax attention of a converted model."),
    sample: bool = typer.Option(False, help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.8, help="Sampling temperature (with --sample)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16."),
) -> None:
    """Stream a continuation of PROMPT to the terminal."""
    from contextlib import nullcontext

    import torch
    from transformers import TextStreamer

    from .. import teacher as teacher_mode
    from ..errors import LinearizeError
    from ..loading import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype

    if max_new_tokens <= 0:
        raise LinearizeError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    dev = resolve_device(device)
    model = load_causal_lm(ckpt, resolve_dtype(dtype, dev), dev)
    tokenizer = load_tokenizer(ckpt)
    inputs = tokenizer(prompt, return_tensors="pt").to(dev)
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    sampling = dict(do_sample=True, temperature=temperature) if sample else dict(do_sample=False)
    with teacher_mode(model) if teacher else nullcontext(), torch.inference_mode():
        model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
