"""The one exception type the command line turns into a one-line message instead of a traceback."""


class UserError(Exception):
    """A mistake the user can fix: the message says what was wrong, where, and what to do."""
