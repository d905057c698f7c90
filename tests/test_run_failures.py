"""Failures during a run end in one line with the right cause and exit code, and the line names what is left
to resume from: memory running out on the CPU (torch's plain RuntimeError, also inside a sample's transform)
or a data-loading worker killed (exit 1); the output folder removed or its checkpoint not writable (exit 1);
a stop signal while the run waits for data that never comes (exit 3, instead of hanging)."""

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

pytestmark = [pytest.mark.usefixtures('one_thread'), pytest.mark.slow]  # each one a run

ALLOCATOR_FAILURE = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
    'to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)'
)


def test_cpu_out_of_memory_is_one_line_exit_1():
    """A real allocation failure: flops.py at 30000 x 30000 px under an address-space limit of 2 GiB above what
    the process holds (RLIMIT_AS, set in the child)."""
    code = (
        'import resource, runpy, sys, torch\n'
        "held = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024\n"
        'resource.setrlimit(resource.RLIMIT_AS, (held + 2 * 2 ** 30, resource.RLIM_INFINITY))\n'
        "sys.argv = ['scripts/flops.py', '--model', 'RAVLT_T', '--input-size', '30000']\n"
        "runpy.run_path('scripts/flops.py', run_name='__main__')\n"
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
    assert_one_line_error(
        result.returncode,
        result.stdout,
        result.stderr,
        1,
        'error: out of memory (while loading DIGITS image',
        "can't allocate memory",
    )


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
        'error: a data-loading worker',
        "killed by signal Killed (most likely the kernel's out-of-memory killer: lower --num_workers",
    )


def after_first_epoch(monkeypatch, then):
    """Call `then(folder)` once epoch 0's log line is written."""
    append = output_folder.OutputFolder.append_log

    def hooked(self, entry):
        append(self, entry)
        if entry['epoch'] == 0:
            then(self.path)

    monkeypatch.setattr(output_folder.OutputFolder, 'append_log', hooked)


def test_the_output_folder_removed_during_the_run_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / 'out'
    after_first_epoch(monkeypatch, shutil.rmtree)
    result = run_here(main, DIGITS + ['--epochs', '2', '--output_dir', out])
    assert_one_line_error(
        result.returncode,
        result.stdout,
        result.stderr,
        1,
        f'error: cannot write {out}',
        '(no such file or directory)',
        f'the output folder {out} was removed during the run, and with it its checkpoints',
    )


def test_a_checkpoint_that_cannot_be_replaced_names_the_resume_point(tmp_path, monkeypatch):
    """An immutable or foreign checkpoint.pth: renaming over it fails with EPERM."""
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
        f'error: cannot write {out / "checkpoint.pth"} (operation not permitted); the resume point '
        f'is {out / "checkpoint.pth"} (epoch 0; run the same command again once it can be written)',
    )
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['epoch'] == 0
    assert not [name for name in os.listdir(out) if name.endswith('.tmp')]


@pytest.mark.parametrize('workers', [0, 1])
def test_a_stop_signal_ends_a_run_stuck_on_its_data(workers, tmp_path):
    """The first sample never comes (a file that blocks, a hung file system): SIGTERM still ends the run, once it
    has waited DATA_WAIT_AFTER_STOP (2 s here) for the batch, in the main process or a data-loading worker."""
    process = subprocess.Popen(
        [
            sys.executable,
            'tests/fault_injection.py',
            'main.py',
            *map(str, DIGITS),
            '--epochs',
            '1',
            '--num_workers',
            str(workers),
            '--output_dir',
            str(tmp_path),
        ],
        cwd=ROOT,
        env=command_env(STALL_AT='1', DATA_WAIT_AFTER_STOP='2'),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in process.stdout:
            if line.startswith('Start training'):
                break
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert_one_line_error(
        process.returncode,
        out,
        err,
        3,
        'stopped: SIGTERM received during epoch 0, but no batch came for 2 s after it',
        'this epoch unsaved; no checkpoint was written yet',
    )
