"""The one exception type for bad user input (config, data, arguments, checkpoints).

The CLI prints its message as a single line and exits with code 2; everything else is a bug or a
failed run and exits 1.
"""


def one_line(text: str) -> str:
    """`text` with its line breaks (every one str.splitlines knows: \\n, \\r, \\v, \\f, \\x1c-\\x1e,
    \\x85, U+2028, U+2029) turned into spaces: a sample id or a caption quoted in a message may hold
    them, and the message must stay one line."""
    return " ".join(str(text).splitlines())


class UserError(Exception):
    """Bad input from the user. The message names the file, key or value at fault, on one line."""

    exit_code = 2

    def __init__(self, message: str = ""):
        super().__init__(one_line(message))
