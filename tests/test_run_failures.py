"""Failures during a run end in one line with the right cause and exit code: memory running out on the CPU
(torch's plain RuntimeError, also inside a sample's transform) or a data-loading worker killed (exit 1); the
output folder removed or its checkpoint not writable (exit 1), the checkpoint on disk left whole."""

import errno
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import datasets
import main
import output_folder
from helpers import ROOT
from train_helpers import DIGITS, assert_one_line_error, command_env, run_here

pytestmark = pytest.mark.usefixtures('one_thread')

ALLOCATOR_FAILURE = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
    'to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)'
)


@pytest.mark.slow
def test_cpu_out_of_memory_is_one_line_exit_1():
    """A real allocation failure: main.py at 30000 x 30000 px (its first input: 10.8 GB) under an address-space
    limit of 2 GiB above what the process holds (RLIMIT_AS, set in the child)."""
    code = (
        'import resource, runpy, sys, torch\n'
        "held = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024\n"
        'resource.setrlimit(resource.RLIMIT_AS, (held + 2 * 2 ** 30, resource.RLIM_INFINITY))\n'
        "sys.argv = ['main.py', '--data-set', 'FAKE', '--input-size', '30000', '--device', 'cpu']\n"
        "runpy.run_path('main.py', run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, '-c', code], cwd=ROOT, env=command_env(), capture_output=True, text=True, timeout=300
    )
    assert_one_line_error(
        result.returncode,
        result.stdout,
        result.stderr,
        1,
        'error: out of memory (',
        "DefaultCPUAllocator: can't allocate memory",
        'lower --batch-size, the input size',
        'the checkpoints on disk are whole',
    )


def test_out_of_memory_in_a_transform_is_not_blamed_on_the_image(monkeypatch):
    load, calls = datasets.Digits.__getitem__, [0]

    def allocation_fails(self, index):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError(ALLOCATOR_FAILURE)
        return load(self, index)

    monkeypatch.setattr(datasets.Digits, '__getitem__', allocation_fails)
    result = run_here(main, DIGITS + ['--epochs', '1'])
    line = assert_one_line_error(
        result.returncode,
        result.stdout,
        result.stderr,
        1,
        'error: out of memory ([enforce fail at alloc_cpu.cpp:117]',
        "can't allocate memory",
        'lower --batch-size',
    )
    assert 'cannot load' not in line and 'sample' not in line


def test_a_data_loading_worker_killed_is_one_line(monkeypatch):
    """The kernel's out-of-memory killer sends SIGKILL: here the worker sends it to itself."""
    load = datasets.Digits.__getitem__

    def killed_in_worker(self, index):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return load(self, index)

    monkeypatch.setattr(datasets.Digits, '__getitem__', killed_in_worker)
    result = run_here(main, DIGITS + ['--epochs', '1', '--num_workers', '1'])
    assert_one_line_error(
        result.returncode,
        result.stdout,
        result.stderr,
        1,
        'error: DataLoader worker (pid(s) ',
        ') exited unexpectedly (out of memory? lower --num_workers or --batch-size)',
    )


def after_first_epoch(monkeypatch, then):
    """Call `then(folder)` once epoch 0's log line is written."""
    append = output_folder.OutputFolder.append_log

    def hooked(self, entry):
        append(self, entry)
        if entry['epoch'] == 0:
            then(self.path)

    monkeypatch.setattr(output_folder.OutputFolder, 'append_log', hooked)


@pytest.mark.slow
def test_the_output_folder_removed_during_the_run_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / 'out'
    after_first_epoch(monkeypatch, shutil.rmtree)
    result = run_here(main, DIGITS + ['--epochs', '2', '--output_dir', out])
    line = assert_one_line_error(
        result.returncode, result.stdout, result.stderr, 1, 'error: no such file or directory (', 'checkpoints'
    )
    assert line in (
        f'error: no such file or directory ({out / name}); the checkpoints on disk are whole'
        for name in ('best.pth', 'best_ema.pth', 'checkpoint.pth')  # the first of epoch 1's names
    )


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_replaced_is_named_and_left_whole(tmp_path, monkeypatch):
    """An immutable or foreign checkpoint.pth: renaming over it fails with EPERM. The line names it (never its
    temporary file, which is removed), and it still holds epoch 0."""
    out = tmp_path / 'out'
    replace = os.replace

    def not_permitted(source, target):
        if os.fspath(target).endswith('checkpoint.pth'):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), source, None, target)
        return replace(source, target)

    after_first_epoch(monkeypatch, lambda folder: monkeypatch.setattr(os, 'replace', not_permitted))
    result = run_here(main, DIGITS + ['--epochs', '2', '--output_dir', out])
    monkeypatch.undo()
    assert_one_line_error(
        result.returncode,
        result.stdout,
        result.stderr,
        1,
        f'error: operation not permitted ({out / "checkpoint.pth"}); the checkpoints on disk are whole',
    )
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['epoch'] == 0
    assert not [name for name in os.listdir(out) if name.endswith('.tmp')]
