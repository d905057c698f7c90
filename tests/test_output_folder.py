"""The output folder holds one run at a time (a lock a killed run does not leave stuck; a file system without
locks is warned about), and a validation file that cannot be read stops the run with one line naming it, the
previous epoch's checkpoint kept: once the file is fixed, the same command goes on from there and ends as a run
that never failed."""

import errno
import os
import signal
import subprocess
import sys

import pytest
from PIL import Image

import checkpoints
import main
import output_folder
from helpers import ROOT
from train_helpers import TINY, assert_one_line_error, assert_same_training, command_env, read_log, run_here

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_is_refused_while_the_first_lives(tmp_path):
    args = TINY + [
        '--data-set',
        'DIGITS',
        '--batch-size',
        '32',
        '--epochs',
        '50',
        '--aa',
        'none',
        '--mixup',
        '0',
        '--cutmix',
        '0',
        '--no-repeated-aug',
        '--output_dir',
        tmp_path,
    ]
    first = subprocess.Popen(
        [sys.executable, 'main.py', *map(str, args)],
        cwd=ROOT,
        env=command_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in first.stdout:
            if line.startswith('Start training'):
                break
        second = run_here(main, args)
        assert_one_line_error(
            second.returncode,
            second.stdout,
            second.stderr,
            2,
            f'another run is using --output_dir {tmp_path} right now',
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel released the killed run's lock: the folder is usable again.
    again = run_here(main, args[:-3] + ['--epochs', '1', '--eval', '--output_dir', tmp_path])
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize('error', ['ENOLCK', 'ENOSYS'])
def test_a_file_system_without_locks_warns_in_one_line_and_the_run_goes_on(tmp_path, monkeypatch, error):
    """Some network file systems have no flock (ENOLCK, ENOSYS): the run says so, naming the folder, and goes on."""

    def no_locks(fd, operation):
        raise OSError(getattr(errno, error), os.strerror(getattr(errno, error)))

    monkeypatch.setattr(output_folder.fcntl, 'flock', no_locks)
    args = TINY + ['--data-set', 'DIGITS', '--batch-size', '32', '--eval', '--output_dir', tmp_path]
    result = run_here(main, args)
    assert result.returncode == 0 and result.stderr == '', result.stderr
    warning = [line for line in result.stdout.splitlines() if line.startswith('warning:')]
    assert warning == [
        f'warning: --output_dir {tmp_path} cannot be locked ({os.strerror(getattr(errno, error))}): make sure no '
        'other run uses it'
    ]
    assert (tmp_path / 'eval_results.json').is_file()


def image_folders(root, corrupt: bool):
    """Two classes of 32 px images; with `corrupt`, one validation JPEG is cut short (returned)."""
    for split, count in (('train', 8), ('val', 3)):
        for label, colour in (('a', (200, 30, 30)), ('b', (30, 30, 200))):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new('RGB', (32, 32), tuple(c + 5 * i for c in colour)).save(folder / f'{i}.jpg', quality=95)
    broken = root / 'val' / 'b' / '1.jpg'
    if corrupt:
        broken.write_bytes(broken.read_bytes()[:200])
    return broken


@pytest.mark.slow  # two trainings
def test_an_unreadable_validation_file_stops_the_run_and_the_previous_epoch_resumes(tmp_path, monkeypatch):
    """A validation JPEG cut short after epoch 0: epoch 1's evaluation stops the run with one line naming the file
    (exit 2), before epoch 1 is saved; fixed, the same command resumes from epoch 0 and ends as the clean run."""
    args = TINY + [
        '--batch-size',
        '4',
        '--epochs',
        '2',
        '--warmup-epochs',
        '0',
        '--mixup',
        '0',
        '--cutmix',
        '0',
        '--no-repeated-aug',
        '--aa',
        'none',
    ]
    clean_data, clean_out = tmp_path / 'clean', tmp_path / 'clean_out'
    image_folders(clean_data, corrupt=False)
    reference = run_here(main, args + ['--data-path', clean_data, '--output_dir', clean_out])
    assert reference.returncode == 0, reference.stderr

    data, out = tmp_path / 'data', tmp_path / 'out'
    image_folders(data, corrupt=False)
    broken = data / 'val' / 'b' / '1.jpg'
    append = output_folder.OutputFolder.append_log

    def breaks_after_epoch_0(self, entry):
        append(self, entry)
        if entry['epoch'] == 0:
            broken.write_bytes(broken.read_bytes()[:200])

    with monkeypatch.context() as patch:
        patch.setattr(output_folder.OutputFolder, 'append_log', breaks_after_epoch_0)
        failed = run_here(main, args + ['--data-path', data, '--output_dir', out])
    assert_one_line_error(failed.returncode, failed.stdout, failed.stderr, 2, f'error: cannot load {broken}: ')
    assert checkpoints.load_checkpoint(out / 'checkpoint.pth')['epoch'] == 0
    assert [entry['epoch'] for entry in read_log(out)] == [0]

    broken.write_bytes((clean_data / 'val' / 'b' / '1.jpg').read_bytes())  # the file fixed
    resumed = run_here(main, args + ['--data-path', data, '--output_dir', out])
    assert resumed.returncode == 0, resumed.stderr
    assert 'Resumed from' in resumed.stdout and '(epoch 0)' in resumed.stdout
    assert read_log(out) == read_log(clean_out)
    assert_same_training(
        checkpoints.load_checkpoint(clean_out / 'checkpoint.pth'), checkpoints.load_checkpoint(out / 'checkpoint.pth')
    )
