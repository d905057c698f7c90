"""Shared by the training tests: a tiny RAVLT on 32 px inputs, running the entry points as commands (one
process, torchrun, simulated srun), killing them as a cluster does, and checks of outputs."""

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

from helpers import ROOT

TINY_MODEL_KWARGS = {
    'embed_dims': [16, 32, 64, 128],
    'depths': [1, 1, 1, 1],
    'num_heads': [1, 1, 2, 4],
    'projection_dim': 64,
}
# A tiny RAVLT-T on the CPU, one process, no data-loading workers.
TINY = [
    '--model',
    'RAVLT_T',
    '--model-kwargs',
    json.dumps(TINY_MODEL_KWARGS),
    '--input-size',
    '32',
    '--device',
    'cpu',
    '--num_workers',
    '0',
    '--print-freq',
    '100',
]
# The recipe's augmentations off: RandAugment, random erasing, mixup, cutmix, repeated augmentation.
NO_AUGMENTATION = ['--aa', 'none', '--reprob', '0', '--mixup', '0', '--cutmix', '0', '--no-repeated-aug']
# DIGITS without the ImageNet augmentations, at 1e-3 (0.016 * 32 / 512).
DIGITS = (
    TINY
    + ['--data-set', 'DIGITS', '--batch-size', '32', '--lr', '0.016', '--warmup-epochs', '0', '--smoothing', '0']
    + NO_AUGMENTATION
    + ['--model-ema-warmup', '--save-freq', '0']
)
# FAKE (1,024 random 32 px images) with every random draw of the authors' recipe: RandAugment (python's
# generator), random erasing (torch's), mixup / cutmix (numpy's), drop path (torch's), repeated augmentation.
RANDOM = TINY + [
    '--data-set',
    'FAKE',
    '--batch-size',
    '32',
    '--epochs',
    '2',
    '--warmup-epochs',
    '1',
    '--drop-path',
    '0.2',
    '--save-freq',
    '0',
    '--model-ema-warmup',
]


def command_env(**extra) -> dict:
    """The environment for a child process: one thread per process (the cores are shared), the repository
    importable, and no launcher variables of the test's own."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT, **extra)
    for name in (
        'RANK',
        'WORLD_SIZE',
        'LOCAL_RANK',
        'SLURM_PROCID',
        'SLURM_NTASKS',
        'SLURM_LOCALID',
        'SLURM_STEP_NUM_TASKS',
        'SLURM_STEP_NODELIST',
        'SLURM_JOB_NODELIST',
        'SLURM_NODELIST',
        'SLURM_JOB_ID',
        'MASTER_ADDR',
        'MASTER_PORT',
        'LOCAL_WORLD_SIZE',
    ):
        if name not in extra:
            env.pop(name, None)
    return env


def run_main(args, timeout: int = 300, script: str = 'main.py', **env) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` from the repository root."""
    return subprocess.run(
        [sys.executable, script, *map(str, args)],
        cwd=ROOT,
        env=command_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_here(entry_point, args):
    """An entry point's command line (`main`, `main_det`, `main_seg`) run in this process, as its command runs
    under command_env (the error policy included, one thread) but without starting an interpreter: a result
    with the returncode, stdout and stderr a CompletedProcess has."""
    from cli import one_line_errors

    out, err, code, threads = io.StringIO(), io.StringIO(), 0, torch.get_num_threads()
    environ = dict(os.environ)
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with one_line_errors():
                entry_point.main(entry_point.get_args_parser().parse_args([str(a) for a in args]))
        except SystemExit as e:
            code = e.code
        finally:
            torch.set_num_threads(threads)
            os.environ.clear()  # as a command's environment ends with it
            os.environ.update(environ)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, script: str, args) -> list:
    return [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--standalone',
        f'--nproc_per_node={nproc}',
        '--monitor-interval=0.1',
        script,
        *map(str, args),
    ]


def start(command, **env) -> subprocess.Popen:
    """A command in a process group of its own (killed together, as a cluster kills a job); output merged."""
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=command_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def descendants(pid: int) -> list:
    """PIDs of a process's children, grandchildren ... torchrun starts its workers in sessions of their own,
    so a cluster's "kill the job" is every one of these, not a process group."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        try:
            for task in os.listdir(f'/proc/{parent}/task'):
                with open(f'/proc/{parent}/task/{task}/children') as f:
                    children = [int(c) for c in f.read().split()]
                found += children
                queue += children
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def signal_all(process: subprocess.Popen, sig, workers_only: bool = False):
    """Send `sig` to a launched command and all its descendants at once (the launcher last, or not at all)."""
    for pid in descendants(process.pid) + ([] if workers_only else [process.pid]):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def finish(process: subprocess.Popen, timeout: int = 300):
    """(exit code, stdout, stderr); everything it started is killed if it overruns."""
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        signal_all(process, signal.SIGKILL)
    return process.returncode, out, err


def kill_at_epoch_boundary(process: subprocess.Popen, output_dir, epochs: int = 1):
    """SIGKILL every process of a run once `epochs` epochs are logged (their checkpoint written before)."""
    wait_for_log(output_dir, epochs, process)
    signal_all(process, signal.SIGKILL)
    process.wait()


def wait_for_log(output_dir, epochs: int, process: subprocess.Popen, timeout: float = 240):
    """Wait until log.txt holds `epochs` lines (or the process ended)."""
    log = os.path.join(output_dir, 'log.txt')
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if os.path.exists(log):
            with open(log) as f:
                if len(f.read().splitlines()) >= epochs:
                    return
        time.sleep(0.05)


def read_log(output_dir) -> list:
    with open(os.path.join(output_dir, 'log.txt')) as f:
        return [json.loads(line) for line in f]


def assert_one_line_error(code: int, stdout: str, stderr: str, expected_code: int, *fragments: str) -> str:
    """A failed command: the exit code, exactly one line on stderr holding `fragments`, no traceback."""
    assert code == expected_code, f'exit code {code}, expected {expected_code}\n{stderr}'
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f'expected one line on stderr, got:\n{stderr}'
    assert 'Traceback' not in stdout + stderr
    for fragment in fragments:
        assert fragment in lines[0], f'{fragment!r} not in {lines[0]!r}'
    return lines[0]


def assert_state_dicts_equal(a: dict, b: dict):
    """Same keys, every tensor bit-identical."""
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f'{key} differs'


def assert_same_training(a: dict, b: dict):
    """Two checkpoints of the same epoch with bit-identical weights, EMA weights and optimizer state."""
    assert a['epoch'] == b['epoch'] and a['step'] == b['step']
    assert_state_dicts_equal(a['model'], b['model'])
    if 'model_ema' in a or 'model_ema' in b:
        assert_state_dicts_equal(a['model_ema'], b['model_ema'])
    assert list(a['optimizer']['state']) == list(b['optimizer']['state'])
    for state_a, state_b in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert_state_dicts_equal(state_a, state_b)
