"""The exceptions every part of a run raises on purpose, the exit codes `cli.run_cli` turns them into, and the
one-line report on stderr."""
import os
import sys

# Exit codes: 1 a failure during the run, 2 bad input, 3 stopped by a signal with a resumable checkpoint, 130 Ctrl-C.
EXIT_FAILURE, EXIT_USAGE, EXIT_PREEMPTED, EXIT_INTERRUPTED = 1, 2, 3, 130


class UsageError(Exception):
    """Bad input (flags, files, checkpoints, data): printed as one line, exit code 2.

    `everywhere`: every process raised it together (an agreed decision), so only rank 0 reports it."""

    def __init__(self, message: str, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere


class Preempted(Exception):
    """A signal (SIGTERM, SIGUSR1) stopped the run after a resumable checkpoint was written."""


def first_line(error: BaseException) -> str:
    """The first line of an error message, with its type, for one-line reports."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ''
    return f'{type(error).__name__}: {text}' if text else type(error).__name__


def report_line(message: str):
    """Write one line on stderr, directly (non-main processes have `print` silenced), prefixed with this
    process's rank when there are several."""
    prefix = f'[rank {os.environ.get("RANK", 0)}] ' if int(os.environ.get('WORLD_SIZE', 1)) > 1 else ''
    sys.stderr.write(f'{prefix}{" ".join(message.split())}\n')
    sys.stderr.flush()
