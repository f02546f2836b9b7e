"""The one exception type for mistakes a user can make (bad flags, bad files, bad shapes).

CLIs catch it and print its message as one line with a non-zero exit; everything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what to change."""
