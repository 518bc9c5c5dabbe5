"""The one exception type that reaches the user as a single line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input or an unmet precondition: the message is shown as-is, without a traceback."""
