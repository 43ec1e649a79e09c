"""The one exception type for problems in the user's files or config.

Entry points catch `InputError`, print its message on one line to stderr and exit with status 2,
so a bad input never ends in a traceback wall. The message must name the file (and line) or the
config key that is wrong.
"""


class InputError(Exception):
    """Bad user input: a file, a line in it, or a config key. `str(err)` is the whole message."""
