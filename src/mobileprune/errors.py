"""The one error type users see: the CLI prints its message on one line and exits with code 2."""


class MobilepruneError(Exception):
    """Bad input or a failed check, with a message that names the file and what is wrong."""

    exit_code = 2
