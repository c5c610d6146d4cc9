"""The exception types for mistakes a user can fix (bad config, bad data, missing files).

The CLI turns any of `USER_ERRORS` into a one-line message and exit status 2; anything else is a
bug and keeps its traceback. The data package has its own `DataError` (it depends on nothing of
pml_dist); it is re-exported here so callers name every user error from one module.
"""

from ffcv_data.errors import DataError


class PmlError(Exception):
    """A user-facing error whose message names the file, key, record or rank at fault."""


class ConfigError(PmlError):
    """A bad preset, override, key or value."""


USER_ERRORS = (PmlError, DataError)


def error_line(command: str, message: str) -> str:
    """How `pml-dist COMMAND` prints a user error: the one line on stderr before exit status 2."""
    return f"pml-dist {command}: error: {message}"


__all__ = ["USER_ERRORS", "ConfigError", "DataError", "PmlError", "error_line"]
