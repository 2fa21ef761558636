"""Recipes: one YAML file that chains convert -> recover -> eval (-> bench), checked before anything runs.

Each stage section *is* that stage's options model (ConvertOptions, RecoverOptions, EvalOptions,
BenchOptions) minus the fields the run folder decides (where outputs go, resume, overwrite).
Defaults and checks therefore live in one place: a recipe field means what the CLI option means.
Relative paths are read from the current directory, like CLI arguments; the resolved recipe
saved in the run folder holds absolute paths, so a rerun works from anywhere.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, ClassVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .bench import BenchOptions
from .errors import LinearizeError, first_line
from .evaluate.options import EvalOptions
from .loading import packaged_file
from .options import ConvertOptions
from .recover.data import split_sources
from .recover.options import RecoverOptions

PYPI = "pypi:"


class RecipeError(LinearizeError):
    """A recipe that does not validate; the message lists every error with its field path."""


def _decided_by_run(cls, value: Any, info) -> Any:
    if value is not None:
        raise ValueError(f"decided by the run folder ({cls.RUN[info.field_name]}): remove it from the recipe")
    return value


class _Stage(BaseModel):
    """Strict section: unknown keys are errors. RUN names the fields the run folder sets."""

    model_config = ConfigDict(extra="forbid")
    RUN: ClassVar[dict[str, str]] = {}

    @classmethod
    def keys(cls) -> list[str]:
        return [k for k in cls.model_fields if k not in cls.RUN]


def _run_field():
    # A placeholder for a field the run sets: never dumped, and any value in a recipe is refused.
    return Field(None, exclude=True)


class ConvertStage(_Stage, ConvertOptions):
    RUN: ClassVar[dict[str, str]] = {"out": "RUN/convert", "overwrite": "reruns replace unfinished stages"}
    out: None = _run_field()
    overwrite: None = _run_field()
    _guard = field_validator(*RUN, mode="before")(classmethod(_decided_by_run))

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v.startswith(PYPI):  # pypi:PACKAGE/FILE must name a file of an installed package
            try:
                packaged_file(v)
            except LinearizeError as e:
                raise ValueError(str(e)) from None
        return v


class RecoverStage(_Stage, RecoverOptions):
    RUN: ClassVar[dict[str, str]] = {
        "ckpt": "RUN/convert", "out": "RUN/recover", "resume": "a rerun resumes by itself",
        "merge": "always on: eval reads RUN/recover/merged", "overwrite": "reruns replace unfinished stages",
    }
    ckpt: None = _run_field()
    out: None = _run_field()
    resume: None = _run_field()
    merge: None = _run_field()
    overwrite: None = _run_field()
    _guard = field_validator(*RUN, mode="before")(classmethod(_decided_by_run))


class EvalStage(_Stage, EvalOptions):
    RUN: ClassVar[dict[str, str]] = {
        "checkpoint": "RUN/convert, then RUN/recover/merged", "teacher": "the report always has a teacher column",
        "compare": "the reference is the teacher", "json_out": "RUN/eval/*.json",
    }
    checkpoint: None = _run_field()
    teacher: None = _run_field()
    compare: None = _run_field()
    json_out: None = _run_field()
    _guard = field_validator(*RUN, mode="before")(classmethod(_decided_by_run))


class BenchStage(_Stage, BenchOptions):
    RUN: ClassVar[dict[str, str]] = {
        "checkpoint": "RUN/recover/merged", "teacher": "the reference is the teacher",
        "compare": "the reference is the teacher", "json_out": "RUN/bench/bench.json",
        "plot_out": "RUN/bench/bench.png with plot: true",
    }
    checkpoint: None = _run_field()
    teacher: None = _run_field()
    compare: None = _run_field()
    json_out: None = _run_field()
    plot_out: None = _run_field()
    plot: bool = Field(False, description="also draw RUN/bench/bench.png (needs matplotlib)")
    _guard = field_validator(*RUN, mode="before")(classmethod(_decided_by_run))


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="run name (letters, digits, . _ -)")
    description: str = Field("", description="what the recipe is for, shown in the report")
    run_dir: Path | None = Field(None, description="run folder; default runs/NAME")
    convert: ConvertStage
    recover: RecoverStage
    eval: EvalStage
    bench: BenchStage | None = Field(None, description="optional speed benchmark of the recovered model")

    @field_validator("eval", "bench", mode="wrap")
    @classmethod
    def _one_line_errors(cls, value: Any, handler, info):
        # EvalOptions / BenchOptions raise LinearizeError for cross-field problems; as a ValueError
        # pydantic files it under the section's path like every other error.
        try:
            return handler(value)
        except LinearizeError as e:
            raise ValueError(recipe_words(str(e), FLAG_FIELDS[info.field_name])) from None

    @property
    def folder(self) -> Path:
        return self.run_dir if self.run_dir is not None else Path("runs") / self.name

    STAGES: ClassVar[tuple[str, ...]] = ("convert", "recover", "eval", "bench")

    def stages(self) -> list[str]:
        return [s for s in self.STAGES if getattr(self, s) is not None]


# CLI flags named in EvalOptions / BenchOptions messages whose recipe key is spelled differently.
FLAG_FIELDS = {"eval": {"ppl": "ppl_files"}, "bench": {"batch": "batches", "context": "contexts"}}


def recipe_words(message: str, renames: dict[str, str]) -> str:
    """"pass --ppl FILE or --tasks NAMES" -> "pass ppl_files or tasks": recipes have keys, not flags."""
    return re.sub(r"--([a-z][a-z-]*)(?: [A-Z]+\b)?", lambda m: renames.get(m[1], m[1].replace("-", "_")), message)


# ---- loading -----------------------------------------------------------------------------------------


def load_recipe(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, apply `a.b=value` overrides, validate; RecipeError lists every problem by field path."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LinearizeError(f"recipe not found: {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # its str() quotes the line beneath: one line is kept here
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or first_line(e)
        raise LinearizeError(f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys (name, convert, recover, eval, ...), got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        lines = [format_error(err) for err in e.errors()]
        raise RecipeError(f"{path}: {len(lines)} error(s)\n  " + "\n  ".join(lines)) from None


def apply_override(raw: dict, item: str) -> None:
    """`recover.lr=5e-4`: the value is read as YAML, so numbers, booleans, null and [a, b] lists work."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise LinearizeError(f"override {item!r}: write it as a.b=value, e.g. recover.lr=5e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML: take the text as written
    node = raw
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise LinearizeError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
    node[parts[-1]] = value


def format_error(err: dict) -> str:
    """One pydantic error as `path: message`, naming the allowed keys or values."""
    loc = err["loc"]
    where = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if err["type"] == "extra_forbidden":
        allowed = allowed_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{where}: unknown key{hint}; allowed: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{where}: required"
    if err["type"] not in ("value_error", "assertion_error") and "input" in err:
        msg += f" (got {err['input']!r})"
    return f"{where or 'recipe'}: {msg}"


def allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        nested = [t for t in (field.annotation, *get_args(field.annotation)) if isinstance(t, type)
                  and issubclass(t, BaseModel)] if field else []
        if not nested:
            return []
        model = nested[0]
    return model.keys() if issubclass(model, _Stage) else list(model.model_fields)


def resolved(recipe: Recipe) -> Recipe:
    """The recipe with local paths made absolute and the run folder filled in (what the run saves)."""

    def local(value: str) -> str:
        p = Path(value).expanduser()
        return str(p.resolve()) if not value.startswith(PYPI) and p.exists() else value

    ev = recipe.eval
    eval_paths = {"ppl_files": [p.resolve() for p in ev.ppl_files],
                  "task_dir": ev.task_dir.expanduser().resolve() if ev.task_dir else None}
    return recipe.model_copy(update={
        "run_dir": recipe.folder.expanduser().resolve(),
        "convert": recipe.convert.model_copy(update={"source": local(recipe.convert.source)}),
        "recover": recipe.recover.model_copy(update={"data": ",".join(map(local, split_sources(recipe.recover.data)))}),
        "eval": ev.model_copy(update=eval_paths),
    })


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
