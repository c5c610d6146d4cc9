"""The one exception type for mistakes a user can fix (bad config, bad data, missing files).

The CLI turns it into a one-line message and a non-zero exit code; anything else is a bug and keeps
its traceback.
"""


class PmlError(Exception):
    """A user-facing error whose message names the file, key, record or rank at fault."""


class ConfigError(PmlError):
    """A bad preset, override, key or value."""


class DataError(PmlError):
    """Bad input data: malformed annotations, missing or corrupt images, empty splits."""
