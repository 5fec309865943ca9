"""User mistakes: reported as one line on stderr with a non-zero exit, never as a traceback."""


class UserError(Exception):
    """A problem the user can fix (a bad path, option, recipe or file); the message says what and how."""
