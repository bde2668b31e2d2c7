"""User-facing errors: raised for bad input, caught by the CLI and printed as one message."""


class EmbedkitError(Exception):
    """A problem with the user's input (config, data, paths), not a bug.

    The message names what is wrong (file, line, key) and what to do. The CLI prints it without a
    traceback and exits with code 2.
    """

    exit_code = 2
