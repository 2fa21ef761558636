"""What `linearize run --dry-run` prints: stages, token budgets, expected peak memory, output layout.

Everything is estimated from the recipe and the model's config; no weights are loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from .errors import LinearizeError
from .recipe import Recipe, resolved
from .recover.data import split_sources

GIB = 2**30
BYTES_PER_TOKEN = 4  # rough bytes of English text per token, to size local data without tokenizing it
# Activations a transformer layer keeps for backward, in bytes per token per hidden unit at 16 bits
# (Korthikanti et al. 2022: 34·s·b·h, leaving out the 5·a·s²·b of softmax scores that converted layers lack).
ACTIVATION_BYTES = 34


# Shapes of the shipped recipes' Hub models, for a plan made offline (the Hub's config.json wins when reachable).
KNOWN = {  # id: (model_type, hidden, layers, heads, kv heads, head_dim, intermediate, vocab, tied, positions)
    "meta-llama/Meta-Llama-3-8B": ("llama", 4096, 32, 32, 8, 128, 14336, 128256, False, 8192),
    "meta-llama/Llama-3.2-1B": ("llama", 2048, 16, 32, 8, 64, 8192, 128256, True, 131072),
    "mistralai/Mistral-7B-v0.1": ("mistral", 4096, 32, 32, 8, 128, 14336, 32000, False, 32768),
    "Qwen/Qwen2.5-7B": ("qwen2", 3584, 28, 28, 4, 128, 18944, 152064, False, 131072),
    "Qwen/Qwen3-8B": ("qwen3", 4096, 36, 32, 8, 128, 12288, 151936, False, 40960),
}


def read_config(source: str) -> tuple[Any, str] | None:
    """(config, where it came from) without loading weights; None when it cannot be read."""
    from transformers import AutoConfig

    from .loading import split_source

    try:
        path, extra = split_source(source)
    except LinearizeError:
        return None
    for kwargs in ({"local_files_only": True}, {}):  # the cache first: no network wait when it is there
        try:
            return AutoConfig.from_pretrained(path, **extra, **kwargs), "config"
        except Exception:  # noqa: BLE001 - a plan without memory figures beats no plan
            if kwargs and source in KNOWN:
                return known_config(source), "built-in shapes (the Hub was not asked)"
    return None


def known_config(source: str):
    from transformers import AutoConfig

    kind, h, n, heads, kv, hd, inter, vocab, tied, pos = KNOWN[source]
    return AutoConfig.for_model(kind, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                                num_key_value_heads=kv, head_dim=hd, intermediate_size=inter, vocab_size=vocab,
                                tie_word_embeddings=tied, max_position_embeddings=pos, dtype="bfloat16")


def parameter_count(cfg) -> int:
    """Parameters of a Llama / Mistral / Qwen2 / Qwen3 model from its config (conversion adds none)."""
    h, n, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or h // heads
    attn = h * (heads + 2 * kv) * hd + heads * hd * h
    if cfg.model_type == "qwen2" or getattr(cfg, "attention_bias", False):
        attn += (heads + 2 * kv) * hd
    layer = attn + 3 * h * cfg.intermediate_size + 2 * h + (2 * hd if cfg.model_type == "qwen3" else 0)
    return vocab * h * (1 if getattr(cfg, "tie_word_embeddings", False) else 2) + n * layer + h


def lora_count(cfg, targets: list[str], r: int) -> int:
    h, inter = cfg.hidden_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or h // heads
    shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    return cfg.num_hidden_layers * sum(r * sum(shapes[t]) for t in targets if t in shapes)


def _dtype_bytes(name: str, cfg) -> int:
    import torch

    from .loading import DTYPES

    if name == "auto":
        name = str(getattr(cfg, "dtype", None) or "float32").removeprefix("torch.")
    return torch.finfo(DTYPES.get(name, torch.float32)).bits // 8


def size(n: float) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:,.1f} MiB"


def memory_plan(recipe: Recipe, cfg) -> list[tuple[str, int, str]]:
    """(stage, expected peak bytes, how it adds up) from the config alone."""
    import torch

    from .footprint import footprint
    from .recover.trainer import training_dtype

    params, h, n, vocab = parameter_count(cfg), cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    out = []
    conv_b = _dtype_bytes(recipe.convert.dtype, cfg)
    out.append(("convert", params * conv_b, f"{params / 1e6:,.1f}M params x {conv_b} B"))

    rc = recipe.recover
    cuda = rc.device.startswith("cuda") or (rc.device == "auto" and torch.cuda.is_available())
    train_dtype = training_dtype(torch.device("cuda" if cuda else "cpu"))
    train_b = torch.finfo(train_dtype).bits // 8
    lora = lora_count(cfg, rc.lora_targets, rc.lora_r)
    tokens = rc.micro_batch * rc.seq_len
    act_per_layer = tokens * h * ACTIVATION_BYTES * train_b // 2
    acts = (n * tokens * h * train_b + act_per_layer) if rc.gradient_checkpointing else n * act_per_layer
    logits = tokens * vocab * 4 * 3 * (2 if rc.loss != "lm" else 1)  # fp32 logits, softmax, grad; x2 with a teacher
    weights = params * train_b
    out.append(("recover", weights + lora * 16 + acts + logits,  # LoRA: fp32 weight + grad + two Adam moments
                f"weights {size(weights)} + LoRA {lora / 1e6:.2f}M x 16 B {size(lora * 16)} + activations "
                f"{size(acts)} + logits {size(logits)} ({'cuda' if cuda else 'cpu'}, {str(train_dtype).removeprefix('torch.')})"))

    ev = recipe.eval
    context = ev.context or min(1024, getattr(cfg, "max_position_embeddings", 1024) or 1024)
    weights = params * (_dtype_bytes(ev.dtype, cfg) if ev.dtype != "auto" else max(conv_b, train_b))
    ev_logits = ev.batch_size * context * vocab * 4 * 2
    out.append(("eval", weights + ev_logits,
                f"weights {size(weights)} + logits of {ev.batch_size} x {context} tokens {size(ev_logits)}"))

    if recipe.bench is not None:
        b = recipe.bench
        kv = footprint(cfg).source_kv_bytes_per_token * max(b.batches) * (max(b.contexts) + b.new_tokens)
        weights = params * (_dtype_bytes(b.dtype, cfg) if b.dtype != "auto" else max(conv_b, train_b))
        out.append(("bench", weights + kv, f"weights {size(weights)} + teacher KV cache {size(kv)} "
                    f"at batch {max(b.batches)}, context {max(b.contexts)}"))
    return out


def _local_tokens(path: str) -> int | None:
    """Estimated tokens of local files (several, comma-separated, add up); None if any is not local."""
    files = [Path(part) for part in split_sources(path)]
    if files and all(p.is_file() for p in files):
        return sum(p.stat().st_size for p in files) // BYTES_PER_TOKEN
    return None


def token_plan(recipe: Recipe) -> list[tuple[str, str]]:
    """(stage, what it reads or trains on, in tokens or items)."""
    rc, ev = recipe.recover, recipe.eval
    data = _local_tokens(rc.data)
    lines = []
    for stage in rc.stages:
        budget = rc.budget(stage)
        seq = rc.orient_seq_len if stage == "orient" else rc.seq_len
        if budget is not None:
            text = f"{budget:,} tokens"
        elif data is not None:
            text = f"{rc.epochs:g} epochs of {rc.data} ≈ {rc.epochs * data:,.0f} tokens (file size / {BYTES_PER_TOKEN})"
        else:
            text = f"{rc.epochs:g} epochs of {rc.data} (counted once tokenized)"
        lines.append((f"recover {stage}", f"{text}, blocks of {seq}"))
    for f in ev.ppl_files:
        size = _local_tokens(str(f)) or 0
        n = min(size, ev.max_tokens) if ev.max_tokens else size
        lines.append(("eval ppl", f"{f.name}: ≈ {n:,} tokens x 3 models"))
    for task in ev.tasks:
        lines.append(("eval task", f"{task}: {ev.limit or 'all'} items x 3 models"))
    for task in ev.harness:
        lines.append(("eval harness", f"{task}: {ev.limit or 'all'} items x 3 models (lm-evaluation-harness)"))
    if recipe.bench is not None:
        b = recipe.bench
        lines.append(("bench", f"batches {b.batches} x contexts {b.contexts} + {b.new_tokens} decode steps, 2 models"))
    return lines


def layout_lines(recipe: Recipe) -> list[str]:
    root = resolved(recipe).folder
    lines = [f"{root}/", "  recipe.yaml  state.json  run.log  logs/  report.md",
             "  convert/            converted checkpoint",
             "  recover/            adapter, metrics.jsonl, stages.json, merged/ (.recover.partial while training)",
             "  eval/               converted.json (with teacher), recovered.json"]
    if recipe.bench is not None:
        lines.append("  bench/              bench.json" + (", bench.png" if recipe.bench.plot else ""))
    return lines


def print_plan(recipe: Recipe, console: Console) -> None:
    from rich.table import Table

    stages = Table(title=f"plan: {recipe.name}", show_header=True)
    for col in ("stage", "reads / trains on"):
        stages.add_column(col)
    for stage, text in token_plan(recipe):
        stages.add_row(stage, text)
    console.print(f"stages: {' -> '.join(recipe.stages())}  (source {recipe.convert.source})")
    console.print(stages)
    found = read_config(recipe.convert.source)
    if found is None:
        console.print("[yellow]expected peak memory: unknown[/] (the source's config could not be read)")
    else:
        cfg, origin = found
        mem = Table(title=f"expected peak memory (estimate from the {origin})")
        for col in ("stage", "peak", "how it adds up"):
            mem.add_column(col, justify="right" if col == "peak" else "left")
        for stage, peak, how in memory_plan(recipe, cfg):
            mem.add_row(stage, size(peak), how)
        console.print(mem)
        console.print(f"[dim]activations: micro_batch x seq_len x hidden x layers x {ACTIVATION_BYTES} B at 16 bit "
                      "(x2 at 32 bit); LoRA: 16 B a parameter (weight, grad, two Adam moments)[/]")
    console.print("output layout:")
    for line in layout_lines(recipe):
        console.print(f"  {line}", highlight=False)
