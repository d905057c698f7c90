"""The exceptions every part of a run raises on purpose, the exit codes `cli.run_cli` turns them into, and the
one-line report on stderr."""

import os
import re
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
    """A signal (SIGTERM, SIGUSR1) stopped the run after a resumable checkpoint was written.

    `everywhere`: every process stopped together (an agreed step), so only rank 0 reports it."""

    def __init__(self, message: str, everywhere: bool = True):
        super().__init__(message)
        self.everywhere = everywhere


class RunFailure(Exception):
    """The run cannot go on (its output folder removed or not writable ...): one line, exit code 1. The message
    names the resume point."""


def first_line(error: BaseException) -> str:
    """The first line of an error message, with its type, for one-line reports."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ''
    return f'{type(error).__name__}: {text}' if text else type(error).__name__


# What allocators say when memory runs out: torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory",
# "not enough memory"), CUDA's and MPS's ("... out of memory").
OUT_OF_MEMORY_MARKERS = ("can't allocate memory", 'not enough memory', 'out of memory', 'Cannot allocate memory')


def is_out_of_memory(error: BaseException) -> bool:
    """Memory ran out: MemoryError, torch.OutOfMemoryError, or the plain RuntimeError of the CPU allocator."""
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and any(marker in str(error) for marker in OUT_OF_MEMORY_MARKERS)
    )


def killed_worker(error: BaseException):
    """How a data-loading worker died ('killed by signal Killed' ... or 'exited unexpectedly') when the DataLoader
    reports it, else None. Its "exited unexpectedly" error carries the signal in its cause."""
    if not isinstance(error, RuntimeError) or 'DataLoader worker' not in str(error):
        return None
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 5:
        chain.append(chain[-1].__cause__)
    for link in chain:
        found = re.search(r'killed by signal: ([^.\n]+)', str(link))
        if found:
            return f'killed by signal {found.group(1).strip()}'
    return 'exited unexpectedly' if 'exited unexpectedly' in str(error) else None


def report_line(message: str):
    """Write one line on stderr, directly (non-main processes have `print` silenced), prefixed with this
    process's rank when there are several."""
    prefix = f'[rank {os.environ.get("RANK", 0)}] ' if int(os.environ.get('WORLD_SIZE', 1)) > 1 else ''
    sys.stderr.write(f'{prefix}{" ".join(message.split())}\n')
    sys.stderr.flush()
