"""The evaluation result as a rich table (model | reference | recovered %) and as JSON.

JSON: {"perplexity": {FILE: {"model": x, "reference": y}},
       "tasks": {TASK: {"model": {metric: v}, "reference": {metric: v}}},
       "meta": {...}}; "reference" is null when no reference row was asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..errors import LinearizeError

# Metrics where lower is better: recovery is reference / model, not model / reference.
LOWER_IS_BETTER = {"ppl", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}


def recovered(metric: str, model: float | None, reference: float | None) -> float | None:
    """How much of the reference's quality the model keeps, in percent."""
    if model is None or reference is None:
        return None
    if metric in LOWER_IS_BETTER:
        return None if model == 0 else 100.0 * reference / model
    return None if reference == 0 else 100.0 * model / reference  # a score of 0 keeps 0% of a nonzero reference


def rows(result: dict[str, Any]) -> list[tuple[str, float | None, float | None, float | None]]:
    """(row name, model, reference, recovered %) for every number in the result."""
    out = []
    for name, pair in result["perplexity"].items():
        out.append((f"ppl {name}", pair["model"], pair["reference"], recovered("ppl", pair["model"], pair["reference"])))
    for name, pair in result["tasks"].items():
        ref = pair["reference"] or {}
        for metric, value in pair["model"].items():
            out.append((f"{name} {metric}", value, ref.get(metric), recovered(metric, value, ref.get(metric))))
    return out


def render(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    meta = result["meta"]
    table = Table(title=f"{meta['checkpoint']} on {meta['device']}")
    table.add_column("metric")
    table.add_column("model", justify="right")
    has_ref = meta.get("reference") is not None
    if has_ref:
        table.add_column(f"reference ({meta['reference']})", justify="right")
        table.add_column("recovered %", justify="right")
    for name, model, ref, rec in rows(result):
        cells = [name, _fmt(model)]
        if has_ref:
            cells += [_fmt(ref), "" if rec is None else f"{rec:.1f}"]
        table.add_row(*cells)
    console.print(table)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def write_json(result: dict[str, Any], path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as e:
        raise LinearizeError(f"could not write {path}: {e.strerror}; choose another --json path") from e
