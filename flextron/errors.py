"""One exception type for every user-facing mistake, so the CLI can print it without a traceback."""


class FlextronError(Exception):
    """Bad input or a missing prerequisite. The message names the problem and the fix."""
