"""The torchrun entry point of a multi-process recovery: `python -m linearize.recover.worker OPTIONS.json`."""

import sys
from pathlib import Path

from rich.console import Console

from ..errors import LinearizeError
from .options import RecoverOptions
from .trainer import recover

if __name__ == "__main__":
    try:
        recover(RecoverOptions.model_validate_json(Path(sys.argv[1]).read_text()))
    except LinearizeError as e:
        Console(stderr=True).print(f"[bold red]{e.label}:[/] {e}", soft_wrap=True)
        sys.exit(e.exit_code)
