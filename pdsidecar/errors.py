"""Errors shown to users as one line (no traceback)."""


class CliError(Exception):
    """A user-facing error: the CLI prints it as one line and exits with code 2."""
