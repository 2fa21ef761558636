"""User-facing errors: one line that says what to do, exit code 2."""


class LinearizeError(Exception):
    """Bad input or a failed precondition; the CLI prints the message alone and exits 2."""

    exit_code = 2
    label = "error"  # what the CLI prints before the message


def first_line(e: BaseException) -> str:
    """An exception's message, cut to its first line, for a one-line error; its type where it has no message."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
