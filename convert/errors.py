"""The one exception type that reaches the user as a single line on stderr and exit code 2.

Defined here, at the bottom layer that raises it, so that convert/ imports nothing from edgequant/;
edgequant.errors re-exports this class.
"""


class UserError(Exception):
    """Bad input or an unmet precondition: the message is shown as-is, without a traceback."""
