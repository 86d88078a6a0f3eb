"""The one exception type for problems in what the user gave us (a config key, a path, a record, a schema).

Job entry points print a UserError as one line and exit with status 2. Anything else, such as a ValueError raised
inside torch or pyarrow, is a bug or an environment problem and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user; the message names the input, where it is, and how to fix it."""
