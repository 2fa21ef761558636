"""`linearize eval`: perplexity, zero-shot tasks and lm-evaluation-harness, for a model and its reference.

The reference row is the same checkpoint in teacher (softmax) mode (`--teacher`) or another
model (`--compare`); each side uses its own tokenizer, and the numbers meet only in the report.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch

from ..loading import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
from .harness import run_harness
from .options import EvalOptions, split_list
from .perplexity import perplexity
from .scoring import encode, special_prefix
from .tasks import evaluate_task, load_task, resolve_task_dir

__all__ = ["EvalOptions", "run_eval", "evaluate_side", "split_list", "device_name", "versions"]

DEFAULT_CONTEXT = 1024  # longer windows than this rarely change a ranking and cost quadratic time


@dataclass
class Side:
    """One column of the table: a model, its tokenizer and the mode it runs in."""

    name: str  # "model" or "reference"
    model: torch.nn.Module
    tokenizer: Any
    mode: Callable[[], AbstractContextManager]


def max_positions(model: torch.nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def evaluate_side(side: Side, opts: EvalOptions, texts: dict[str, str], context: int, stride: int
                  ) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, int]]:
    """(perplexity per file, metrics per task, tokens scored per file) for one side."""
    ppl, tasks, tokens = {}, {}, {}
    prefix = special_prefix(side.tokenizer)
    with side.mode():
        for name, text in texts.items():
            ids = encode(side.tokenizer, text, prefix)[: opts.max_tokens]
            result = perplexity(side.model, ids, context=context, stride=stride, batch_size=opts.batch_size,
                                description=f"ppl {name} ({side.name})")
            ppl[name], tokens[name] = result.value, result.tokens
        if opts.tasks:
            task_dir = resolve_task_dir(opts.task_dir)
            for name in opts.tasks:
                task = load_task(task_dir, name, opts.limit)
                tasks[name] = evaluate_task(side.model, side.tokenizer, task, batch_size=opts.batch_size,
                                            max_length=context, label=f"({side.name})")
        if opts.harness:
            for name, metrics in run_harness(side.model, side.tokenizer, opts.harness, limit=opts.limit,
                                             batch_size=opts.batch_size).items():
                tasks[f"harness:{name}"] = metrics
    return ppl, tasks, tokens


def run_eval(opts: EvalOptions) -> dict[str, Any]:
    """Load, evaluate both sides, and return the report dictionary (see report.py for its schema)."""
    started = time.time()
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    texts = {p.stem: p.read_text(encoding="utf-8") for p in opts.ppl_files}
    model = load_causal_lm(opts.checkpoint, dtype, device)
    sides = [Side("model", model, load_tokenizer(opts.checkpoint), nullcontext)]
    if opts.teacher:
        from .. import teacher  # imported here: only --teacher needs the converted-model machinery

        sides.append(Side("reference", model, sides[0].tokenizer, lambda: teacher(model)))
    elif opts.compare:
        ref = load_causal_lm(opts.compare, dtype, device)
        sides.append(Side("reference", ref, load_tokenizer(opts.compare), nullcontext))

    # One window length for both sides, so neither sees more history than the other.
    limits = [n for n in (max_positions(s.model) for s in sides) if n]
    context = opts.context or min([DEFAULT_CONTEXT, *limits])
    stride = opts.stride or max(context // 2, 1)

    result: dict[str, Any] = {"perplexity": {}, "tasks": {}, "meta": {}}
    tokens: dict[str, dict[str, int]] = {}
    for side in sides:
        ppl, tasks, side_tokens = evaluate_side(side, opts, texts, context, stride)
        for name, value in ppl.items():
            result["perplexity"].setdefault(name, {"model": None, "reference": None})[side.name] = value
            tokens.setdefault(name, {})[side.name] = side_tokens[name]
        for name, metrics in tasks.items():
            result["tasks"].setdefault(name, {"model": None, "reference": None})[side.name] = metrics
    result["meta"] = {
        "checkpoint": opts.checkpoint,
        "reference": opts.reference_label,
        "device": device_name(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "context": context,
        "stride": stride,
        "limit": opts.limit,
        "tokens": tokens,  # tokens scored per perplexity file and side
        "task_items": {name: _items(opts, name) for name in opts.tasks},
        "seconds": round(time.time() - started, 2),
        "versions": versions(),
    }
    return result


def _items(opts: EvalOptions, name: str) -> int:
    return len(load_task(resolve_task_dir(opts.task_dir), name, opts.limit).items)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for package in ("linearize", "transformers", "lm_eval"):
        try:
            out[package] = metadata.version(package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            pass
    return out
