"""How every command (`python -m step_hf.X`, `examples/*.py`) refuses bad input: one line on stderr and exit status 2.

A command raises `UserError` for input it refuses (a flag, a file, a dataset that does not fit) and runs its `main`
through `run_command`, which prints the message alone; anything else keeps its traceback, since that is a bug.
`UserError` is a `ValueError`, so library callers catch it as they catch any refused value.
"""

import contextlib
import sys
from collections.abc import Callable, Iterator

USER_ERROR_EXIT_CODE = 2  # argparse's status for a bad command line: a refused input is the same kind of failure


class UserError(ValueError):
    """Input that a command refuses: its message names the problem and the fix, on one line. `exit_code` is the
    command's exit status (2 unless a subclass says otherwise)."""

    exit_code = USER_ERROR_EXIT_CODE


def one_line(message: str) -> str:
    """`message` with its line breaks (and the indentation after them) turned into "; " separators."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


@contextlib.contextmanager
def refusing(what: str, fix: str = "") -> Iterator[None]:
    """Loading `what` (a model folder, a dataset) that fails as a missing or unreadable input (`OSError`, which
    `datasets`' "not found" errors are, or `ValueError`, e.g. no such split) is a `UserError` naming it and `fix`."""
    try:
        yield
    except (OSError, ValueError) as error:
        if isinstance(error, UserError):
            raise
        raise UserError(f"Cannot load {what}: {one_line(error)}{f' ({fix})' if fix else ''}") from None


def run_command(main: Callable[..., object], argv: list[str] | None = None) -> None:
    """Run a command's `main(argv)` (`main()` when `argv` is None); a `UserError` becomes one line on stderr
    (`error: ...`) and the command's exit status. The library's weight-loading progress bars are off: a command prints
    its own progress, and those bars would bury a refusal's one line."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        main(argv) if argv is not None else main()
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(error.exit_code)


__all__ = ["UserError", "refusing", "run_command"]
