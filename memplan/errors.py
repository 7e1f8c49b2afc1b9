"""The one error type users see: the CLI prints its message on one line and exits with status 2."""


class MemplanError(ValueError):
    """Bad input (unknown model, impossible numbers, malformed config). The message is one line, for a user."""
