"""User-facing errors: one line that says what to do, exit code 2."""


class LinearizeError(Exception):
    """Bad input or a failed precondition; the CLI prints the message alone and exits 2."""

    exit_code = 2
    label = "error"  # what the CLI prints before the message
