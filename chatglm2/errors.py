"""The one exception type for bad user input."""


class InputError(Exception):
    """Something the user gave (a path, a flag, a file) is wrong; the message says what and what to do."""
