"""User mistakes: reported as one line on stderr with a non-zero exit, never as a traceback."""


class UserError(Exception):
    """A problem the user can fix (a bad path, option, recipe or file); the message says what and how."""


def first_line(error: Exception) -> str:
    """The first line of an exception's message, for a one-line UserError."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
