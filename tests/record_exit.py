"""Runs a script (`python tests/record_exit.py main.py ARGS`, also under torchrun) and writes the exit code of this
process into EXIT_CODE_DIR/rank{RANK}: how a test sees the training processes' exit codes behind a launcher that
does not report them (torchrun stopped by a signal)."""

import os
import runpy
import sys

MAIN = os.getpid()


def record(code):
    if os.getpid() == MAIN:  # not a data-loading worker, which inherits this
        with open(os.path.join(os.environ['EXIT_CODE_DIR'], f'rank{os.environ.get("RANK", "0")}'), 'w') as f:
            f.write(str(code))


if __name__ == '__main__':
    exit_now = os._exit

    def recorded_exit(code):
        record(code)
        exit_now(code)

    os._exit = recorded_exit
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name='__main__')
    except SystemExit as e:
        record(e.code or 0)
        raise
    record(0)
