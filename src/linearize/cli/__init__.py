"""The `linearize` command line. Each command lives in its own module and registers on `app`."""

from __future__ import annotations

import errno
import sys
import warnings

import typer
from rich.console import Console

from ..errors import LinearizeError

app = typer.Typer(
    name="linearize",
    help="Turn a pretrained LLM into a gated linear-recurrent model, recover, evaluate and serve it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)

# Registration: importing a command module adds its command to `app`.
from . import bench_cmd, convert_cmd, eval_cmd, recover_cmd, run_cmd  # noqa: E402, F401, I001


def main() -> None:
    # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` on every adapter it wraps:
    # a FutureWarning about library internals that a user can do nothing about
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        app()
    except LinearizeError as e:
        err.print(f"[bold red]{e.label}:[/] {e}", soft_wrap=True)
        sys.exit(e.exit_code)
    except Exception as e:
        message = write_failure(e)
        if message is None:
            raise
        # Output folders are written whole or not at all, and a recovery keeps its last checkpoint.
        err.print(f"[bold red]error:[/] {message}", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: nothing was written to the output folder")
        sys.exit(130)


def write_failure(e: BaseException) -> str | None:
    """The one-line message for a file that could not be written (a full disk, no permission, a read-only
    file system), or None for any other error. safetensors reports a full disk in its own error type."""
    full = "No space left on device" in str(e) or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
    denied = isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    if not (full or denied):
        return None
    where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
    if full:
        return (f"the disk is full{where}: free some space or choose another -o, then run again "
                "(a recovery continues with --resume)")
    return f"{e.strerror or 'not allowed'}{where}: choose an output folder you can write to"
