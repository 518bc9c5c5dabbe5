"""The one exception type that reaches the user as a single line on stderr and exit code 2.

The class is convert.errors.UserError (convert/ raises it and must not import this package), re-exported here
for everything above convert/; the CLI catches it.
"""

from .convert.errors import UserError

__all__ = ["UserError"]
