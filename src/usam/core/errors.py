"""The errors a user fixes by changing a config key, a path or a file."""


class UsageError(Exception):
    """Commands print it as one line and exit with code 2 (the traceback with verbose=true);
    any other exception is a bug and keeps its traceback. Subclasses that describe bad
    values also subclass ``ValueError``, so callers of the Python API can catch either."""


class InputFileError(UsageError, FileNotFoundError):
    """A file, folder or pattern the user named that does not exist or holds no file."""
