"""Writing output folders: all or nothing, never half-written."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import LinearizeError


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise LinearizeError(f"{out} already exists: pass --overwrite to replace it, or choose another -o")
    if out.exists() and not out.is_dir():
        raise LinearizeError(f"{out} exists and is not a folder: choose another -o")


def require_free_space(folder: Path, nbytes: int, what: str) -> None:
    """Fail before writing `what` (about `nbytes`) under `folder` if its disk has clearly too little room.

    Checked up front because a full disk otherwise shows up minutes later as an OSError half-way through
    a safetensors file. The margin covers the tokenizer, config and card written beside the weights.
    """
    existing = Path(folder).expanduser().resolve()
    while not existing.exists():  # the folder itself may not exist yet: ask about the disk it will be on
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    needed = int(nbytes * 1.05) + (64 << 20)
    if free < needed:
        raise LinearizeError(
            f"{what} needs about {needed / 2**30:.2f} GiB but {existing} has {free / 2**30:.2f} GiB free: "
            "free some space or choose an output folder on another disk"
        )


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers as they would be saved (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@contextmanager
def atomic_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it becomes `out`, on any failure it goes."""
    out = out.expanduser().resolve()
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _make_readable(tmp)
        if out.exists():  # --overwrite: swap, so the old folder survives until the new one is whole
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_readable(folder: Path) -> None:
    """mkdtemp and some writers create private files; a checkpoint is meant to be shared."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
