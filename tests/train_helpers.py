"""Shared by the training tests: a tiny RAVLT on 32 px inputs, running main.py as a command, and
checks of a failed command's output."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_MODEL_KWARGS = {'embed_dims': [16, 32, 64, 128], 'depths': [1, 1, 1, 1], 'num_heads': [1, 1, 2, 4],
                     'projection_dim': 64}
# A tiny RAVLT-T on the CPU, one process, no data-loading workers.
TINY = ['--model', 'RAVLT_T', '--model-kwargs', json.dumps(TINY_MODEL_KWARGS), '--input-size', '32',
        '--device', 'cpu', '--num_workers', '0', '--print-freq', '100']
# DIGITS without the ImageNet augmentations, at 1e-3 (0.016 * 32 / 512).
DIGITS = TINY + ['--data-set', 'DIGITS', '--batch-size', '32', '--lr', '0.016', '--warmup-epochs', '0',
                 '--aa', 'none', '--reprob', '0', '--mixup', '0', '--cutmix', '0', '--smoothing', '0',
                 '--no-repeated-aug', '--model-ema-warmup', '--save-freq', '0']


@pytest.fixture
def one_thread():
    """Run a test's in-process work on one thread: on shared cores, extra OpenMP threads mostly wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def command_env(**extra) -> dict:
    """The environment for a child process: one thread per process (the cores are shared) and the
    repository importable."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT, **extra)
    env.pop('RANK', None)
    env.pop('WORLD_SIZE', None)
    return env


def run_main(args, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python main.py ARGS` from the repository root."""
    return subprocess.run([sys.executable, 'main.py', *map(str, args)], cwd=ROOT, env=command_env(),
                          capture_output=True, text=True, timeout=timeout)


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
