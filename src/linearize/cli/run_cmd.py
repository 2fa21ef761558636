"""`linearize run RECIPE [a.b=value ...]` and `linearize validate RECIPE`: recipes from the command line."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import app

OVERRIDES_HELP = "Overrides like recover.lr=5e-4 or eval.limit=50 (values are read as YAML, lists too)."


@app.command("validate")
def validate_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    overrides: Annotated[list[str] | None, typer.Argument(help=OVERRIDES_HELP, show_default=False)] = None,
) -> None:
    """Check a recipe: prints "recipe is valid", or every error with its field path (exit 2)."""
    from ..recipe import load_recipe

    load_recipe(recipe, overrides or [])
    Console(highlight=False).print(f"recipe is valid: {recipe}")


@app.command("run")
def run_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file (see recipes/ and docs/recipes.md).")],
    overrides: Annotated[list[str] | None, typer.Argument(help=OVERRIDES_HELP, show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (stages, token budgets, peak memory, "
                                          "output layout) and stop.")] = False,
) -> None:
    """Run convert -> recover -> eval (-> bench) in one run folder; a rerun skips finished stages and resumes a cut one."""
    from ..plan import print_plan
    from ..recipe import load_recipe
    from ..run import Run

    loaded = load_recipe(recipe, overrides or [])
    console = Console(stderr=True, record=not dry_run, highlight=False)
    if dry_run:
        print_plan(loaded, Console(highlight=False))
        return
    Run(loaded, console, command="linearize " + shlex.join(sys.argv[1:])).run()
