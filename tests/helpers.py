"""Small helpers shared by tests."""

from __future__ import annotations

import sys

import pytest


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run `linearize ARGS` in-process, as the console script would; returns (exit code, stdout, stderr)."""
    from linearize.cli import main

    argv = sys.argv
    sys.argv = ["linearize", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def relative_error(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
