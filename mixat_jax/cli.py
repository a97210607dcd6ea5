"""What every ``python -m mixat_jax.*`` entry point shares: exit codes, one-line errors, Ctrl-C,
and the check that an output directory is usable before any work starts.

Contract (README, WORKSPACE "Develop"): bad input prints exactly one ``error: ...`` line on stderr
and exits with status 2, leaving what the output directory already holds intact; a run stopped by
SIGTERM exits 143 and by Ctrl-C (SIGINT) 130, after one line saying where its state is and that
re-running the same command resumes. No traceback reaches the user for any of these.
"""

from __future__ import annotations

import errno
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_PREEMPTED = 143  # 128 + SIGTERM


class Stopped(Exception):
    """A run stopped on a signal after saving its state; carries the message and exit status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def one_line(e: BaseException) -> str:
    """The exception's message on a single line (whitespace runs collapsed)."""
    return " ".join(str(e).split()) or type(e).__name__


def check_output_dir(path: str | Path, flag: str = "--workdir") -> Path:
    """Raises ValueError (one line naming the path) unless ``path`` is, or can become, a directory
    this process can write to. Creates nothing that was not there: directories made for the probe
    are removed again, so a later bad-input error still leaves the file system as it was."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file; pass a directory")
    missing = []
    q = p
    while not q.exists():
        missing.append(q)
        if q.parent == q:
            break
        q = q.parent
    try:
        for d in reversed(missing):
            d.mkdir()
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        where = e.filename or p
        reason = e.strerror or errno.errorcode.get(e.errno or 0, type(e).__name__)
        raise ValueError(
            f"{flag} {str(path)!r} is unusable: cannot create or write {str(where)!r} ({reason}); "
            "pass a directory you can write to"
        ) from None
    finally:
        for d in missing:  # deepest first
            try:
                d.rmdir()
            except OSError:
                pass
    return p


def run_main(main: Callable[[], int]) -> int:
    """Runs an entry point's body and turns the expected ways of stopping into exit statuses.

    ValueError -> ``error: ...`` and 2; an OSError on a named file (unwritable output, disk full)
    -> one line naming the file and 2; :class:`Stopped` -> its message and status; Ctrl-C outside
    a checkpointing loop -> one line and 130 (files already written stay as they are)."""
    try:
        return main()
    except ValueError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Stopped as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(
            "interrupted; outputs already written are intact, and re-running the same command "
            "resumes where the run can",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except OSError as e:
        if e.filename is None:
            raise
        print(
            f"error: cannot use {str(e.filename)!r}: {e.strerror or one_line(e)}", file=sys.stderr
        )
        return EXIT_BAD_INPUT
