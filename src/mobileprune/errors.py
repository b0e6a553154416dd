"""The one error type users see: the CLI prints its message on one line and exits with code 2."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

VERBOSE_ENV = "MOBILEPRUNE_VERBOSE"  # set (by --verbose) to let the libraries' own lines through


class MobilepruneError(Exception):
    """Bad input or a failed check, with a message that names the file and what is wrong."""

    exit_code = 2


class ScheduleStopped(Exception):
    """A chunk of a long schedule ended cleanly at an epoch boundary (``--stop-after``): not an
    error and not done; the same command resumes it. Exit code 75 (EX_TEMPFAIL, "try again"), so a
    script can tell an unfinished chunk from a finished run (0) and from bad input (2)."""

    exit_code = 75


def check_known_settings(config_class, values: dict, what: str) -> None:
    """Refuse keys that ``config_class`` (a dataclass) has no field for, naming them and the known ones."""
    from dataclasses import fields

    known = {f.name for f in fields(config_class)}
    if set(values) - known:
        raise MobilepruneError(f"unknown {what} settings {sorted(set(values) - known)}; known: {sorted(known)}")


def first_line(error: BaseException) -> str:
    """The first line of a library's exception text (torch's run to many), for a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def exit_code(program: str, action: Callable[[], object]) -> int:
    """Run ``action`` as a command named ``program``: 0, or its error on one line and a non-zero code.

    The ``mobileprune`` CLI and the benchmark scripts share this, so none of them shows a traceback
    for bad input.
    """
    try:
        action()
    except MobilepruneError as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        return e.exit_code
    except ScheduleStopped as e:
        print(f"{program}: stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return 130
    return 0


def quiet_libraries() -> None:
    """Silence the libraries' warnings and logged notices (torch.export, pytree) unless --verbose.

    Called by the CLI and by every child process that loads ExecuTorch (``bench``, ``probe_pte``,
    ``grade``'s workers): a child starts with Python's default filters. Imports no torch, so the
    CLI can call it before any command.
    """
    if os.environ.get(VERBOSE_ENV):
        return
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torch._export", "torch.utils._pytree", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)
