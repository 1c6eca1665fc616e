"""The errors a user fixes by changing a config key, a path or a file."""


class UsageError(Exception):
    """Commands print it as one line and exit with code 2 (the traceback with verbose=true).

    Errors of bad input that subclass ``ValueError`` are treated the same way; this base
    is for the others, such as a missing weights file.
    """
