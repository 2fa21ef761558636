"""Zero-shot tasks from local JSONL files, one object a line, in three formats:

- multiple choice `{"query", "choices", "gold"}`: score `" " + choice` after the query; acc takes
  the highest log-likelihood, acc_norm divides it by the choice's length in characters first
  (lm-evaluation-harness's acc_norm);
- schema `{"context_options", "continuation", "gold"}` (Winogrande): score the same
  continuation after each option, the option under which it is likeliest wins;
- language modelling `{"context", "continuation"}` (LAMBADA): correct when greedy decoding
  reproduces the whole continuation; also the perplexity of the continuations.
The format is read off each file's fields, so any file in one of these shapes is a task.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LinearizeError
from .scoring import Request, Score, encode_pair, score_requests, special_prefix

TASK_DIR_ENV = "LINEARIZE_TASK_DIR"

FORMATS = {
    "multiple_choice": {"query", "choices", "gold"},
    "schema": {"context_options", "continuation", "gold"},
    "lambada": {"context", "continuation"},
}


@dataclass(frozen=True)
class Task:
    name: str
    format: str
    items: list[dict]


def resolve_task_dir(task_dir: Path | None) -> Path:
    if task_dir is None:
        env = os.environ.get(TASK_DIR_ENV)
        if not env:
            raise LinearizeError(f"tasks need their JSONL files: pass --task-dir DIR or set {TASK_DIR_ENV}")
        task_dir = Path(env)
    task_dir = task_dir.expanduser()
    if not task_dir.is_dir():
        raise LinearizeError(f"task folder not found: {task_dir}")
    return task_dir


def task_format(name: str, item: dict) -> str:
    for fmt, fields in FORMATS.items():
        if fields <= item.keys():
            return fmt
    raise LinearizeError(f"task {name}: items have fields {sorted(item)}, which match no known format "
                         f"(query/choices/gold, context_options/continuation/gold, context/continuation)")


def load_task(task_dir: Path, name: str, limit: int | None = None) -> Task:
    """The first `limit` items of `task_dir/name.jsonl`, checked against its format."""
    path = task_dir / f"{name}.jsonl"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in task_dir.glob("*.jsonl"))) or "none"
        raise LinearizeError(f"unknown task {name!r}: no {path} (tasks in {task_dir}: {known})")
    items = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LinearizeError(f"{path}:{lineno} is not valid JSON ({e.msg}): fix or remove that line") from e
    if not items:
        raise LinearizeError(f"task {name}: {path} holds no items")
    fmt = task_format(name, items[0])
    for lineno, item in enumerate(items, 1):
        if not FORMATS[fmt] <= item.keys():
            raise LinearizeError(f"{path}: item {lineno} lacks {sorted(FORMATS[fmt] - item.keys())} for a {fmt} task")
        options = item.get("choices", item.get("context_options"))
        if options is not None and not 0 <= int(item["gold"]) < len(options):
            raise LinearizeError(f"{path}: item {lineno} has gold {item['gold']} outside its {len(options)} options")
    return Task(name=name, format=fmt, items=items)


def requests_for(task: Task, tokenizer, prefix: list[int]) -> list[list[Request]]:
    """Per item, the requests whose scores decide it (one per option, or one)."""
    out = []
    for item in task.items:
        if task.format == "multiple_choice":
            out.append([encode_pair(tokenizer, item["query"], " " + c, prefix) for c in item["choices"]])
        elif task.format == "schema":
            out.append([encode_pair(tokenizer, opt, " " + item["continuation"], prefix) for opt in item["context_options"]])
        else:
            out.append([encode_pair(tokenizer, item["context"], " " + item["continuation"], prefix)])
    return out


def metrics(task: Task, scores: list[list[Score]]) -> dict[str, float]:
    """Task metrics from per-item scores; each a plain float, acc in [0, 1]."""
    n = len(task.items)
    if task.format == "lambada":
        acc = sum(s[0].greedy for s in scores) / n
        # lm-evaluation-harness's lambada perplexity: exp of minus the mean per-item log-likelihood.
        ppl = math.exp(-sum(s[0].loglik for s in scores) / n)
        return {"acc": acc, "ppl": ppl}
    golds = [int(item["gold"]) for item in task.items]
    acc = sum(_argmax([s.loglik for s in item_scores]) == gold for item_scores, gold in zip(scores, golds, strict=True)) / n
    if task.format == "schema":
        return {"acc": acc}
    normed = [[s.loglik / max(len(c), 1) for s, c in zip(item_scores, item["choices"], strict=True)]
              for item, item_scores in zip(task.items, scores, strict=True)]
    acc_norm = sum(_argmax(lls) == gold for lls, gold in zip(normed, golds, strict=True)) / n
    return {"acc": acc, "acc_norm": acc_norm}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # ties go to the first option


def evaluate_task(model: torch.nn.Module, tokenizer, task: Task, *, batch_size: int, max_length: int,
                  label: str = "") -> dict[str, float]:
    """Score every request of the task in one batched pass and reduce to its metrics."""
    per_item = requests_for(task, tokenizer, special_prefix(tokenizer))
    flat = [r for reqs in per_item for r in reqs]
    flat_scores = score_requests(model, flat, batch_size=batch_size, max_length=max_length,
                                 description=f"{task.name} {label}".strip())
    scores, pos = [], 0
    for reqs in per_item:
        scores.append(flat_scores[pos : pos + len(reqs)])
        pos += len(reqs)
    return metrics(task, scores)
