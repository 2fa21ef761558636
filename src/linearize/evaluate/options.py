"""What `linearize eval` was asked to do, checked before any model loads (bad input fails in a second)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator

from ..errors import LinearizeError
from .tasks import resolve_task_dir


def split_list(value: str | None) -> list[str]:
    """"a, b,,c" -> ["a", "b", "c"]; None -> []."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]


class EvalOptions(BaseModel):
    model_config = ConfigDict(frozen=True)

    checkpoint: str
    compare: str | None = None  # another model as the reference row
    teacher: bool = False  # the checkpoint itself in teacher (softmax) mode as the reference row
    ppl_files: list[Path] = []
    context: int | None = None  # None: the model's positions, at most 1024
    stride: int | None = None  # None: half the context
    max_tokens: int | None = None  # score only the first N tokens of each file
    tasks: list[str] = []
    task_dir: Path | None = None  # None: $LINEARIZE_TASK_DIR
    limit: int | None = None  # first N items of each task
    harness: list[str] = []
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    json_out: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> EvalOptions:
        # LinearizeError is not a ValueError, so pydantic lets it through as the one-line CLI error.
        if self.teacher and self.compare:
            raise LinearizeError("--teacher and --compare both pick the reference row: pass one of them")
        if not (self.ppl_files or self.tasks or self.harness):
            raise LinearizeError("nothing to evaluate: pass --ppl FILE, --tasks NAMES or --harness NAMES")
        for name, value in (("--context", self.context), ("--stride", self.stride), ("--max-tokens", self.max_tokens),
                            ("--limit", self.limit), ("--batch-size", self.batch_size)):
            if value is not None and value < 1:
                raise LinearizeError(f"{name} must be a positive number, got {value}")
        if self.context is not None and self.stride is not None and self.stride > self.context:
            raise LinearizeError(f"--stride {self.stride} is longer than --context {self.context}: "
                                 "tokens between windows would go unscored; use a stride up to the context")
        for path in self.ppl_files:
            if not path.is_file():
                raise LinearizeError(f"perplexity file not found: {path}")
        stems = [p.stem for p in self.ppl_files]
        if len(set(stems)) != len(stems):
            raise LinearizeError("two --ppl files share a name: rename one, results are keyed by file name")
        if self.tasks:
            task_dir = resolve_task_dir(self.task_dir)
            for name in self.tasks:
                if not (task_dir / f"{name}.jsonl").is_file():
                    known = ", ".join(sorted(p.stem for p in task_dir.glob("*.jsonl"))) or "none"
                    raise LinearizeError(f"unknown task {name!r}: no {name}.jsonl in {task_dir} (known: {known})")
        return self

    @property
    def reference_label(self) -> str | None:
        return "teacher" if self.teacher else self.compare
