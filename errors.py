"""The exceptions a run raises on purpose and the exit codes `cli.one_line_errors` turns them into."""

# 1: a failure during the run, 2: bad input, 3: stopped by a signal with a resumable checkpoint, 130: Ctrl-C.
EXIT_FAILURE, EXIT_USAGE, EXIT_PREEMPTED, EXIT_INTERRUPTED = 1, 2, 3, 130


class UsageError(Exception):
    """Bad input (a flag, file, checkpoint or data set): one line on stderr, exit code 2.

    `everywhere`: every process raised it together (an agreed decision), so only rank 0 reports it."""

    def __init__(self, message: str, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere


class Preempted(Exception):
    """A stop signal (SIGTERM, SIGUSR1) ended the run after every process saved and agreed: exit code 3."""


class RunFailure(Exception):
    """The run cannot go on (its output folder cannot be written ...): one line naming the resume point, exit 1."""
