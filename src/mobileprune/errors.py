"""The one error type users see: the CLI prints its message on one line and exits with code 2."""


class MobilepruneError(Exception):
    """Bad input or a failed check, with a message that names the file and what is wrong."""

    exit_code = 2


def first_line(error: BaseException) -> str:
    """The first line of a library's exception text (torch's run to many), for a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
