"""The one exception type that means "the user's input is wrong".

``launch.py`` prints a :class:`UserError` as one line on stderr and exits
non-zero; any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input (data, config, flags, checkpoint); the message is one clear line."""
