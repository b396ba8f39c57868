"""The one exception type for bad user input (config, data, arguments, checkpoints).

The CLI prints its message as a single line and exits with code 2; everything else is a bug or a
failed run and exits 1.
"""


class UserError(Exception):
    """Bad input from the user. The message names the file, key or value at fault."""

    exit_code = 2
