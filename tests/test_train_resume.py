"""One process, stopped the ways a cluster stops it, then started again with the same command: the run ends
bit-identical (weights, EMA, optimizer, log.txt) to one never stopped, with every random draw of the authors'
recipe in play (RandAugment, random erasing, mixup / cutmix, drop path, repeated augmentation):
- SIGKILL after an epoch's checkpoint is written but before its log line (the line is not lost, nor doubled,
  in log.txt or the TensorBoard events);
- SIGTERM in the middle of an epoch (exit code 3, a resumable checkpoint, an exact mid-epoch resume);
- SIGKILL in the middle of a save (the temporary file it leaves is removed at the next start).
Two processes: tests/test_train_distributed.py."""

import os
import signal

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoints
import main
from train_helpers import RANDOM, assert_one_line_error, assert_same_training, read_log, run_here, run_main

# Each test runs two or three trainings: up to two minutes on a busy 2-core machine.
pytestmark = [pytest.mark.usefixtures('one_thread'), pytest.mark.slow, pytest.mark.timeout(600)]


def run_hooked(output_dir, *extra, **hooks):
    return run_main(
        ['main.py', *RANDOM, *extra, '--output_dir', output_dir], script='tests/fault_injection.py', **hooks
    )


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp('uninterrupted')
    result = run_here(main, RANDOM + ['--output_dir', out])
    assert result.returncode == 0, result.stderr
    return out


def assert_same_run(reference, out):
    assert_same_training(
        checkpoints.load_checkpoint(reference / 'checkpoint.pth'), checkpoints.load_checkpoint(out / 'checkpoint.pth')
    )
    assert read_log(reference) == read_log(out)
    assert [name for name in os.listdir(out) if name.endswith('.tmp')] == []


def test_killed_before_its_log_line_the_epoch_is_logged_once(uninterrupted, tmp_path):
    killed = run_hooked(tmp_path, KILL_AT='output_folder:OutputFolder.append_log:1')  # epoch 0 saved, not yet logged
    assert killed.returncode == -signal.SIGKILL
    assert checkpoints.load_checkpoint(tmp_path / 'checkpoint.pth')['epoch'] == 0
    assert not (tmp_path / 'log.txt').exists() or read_log(tmp_path) == []

    restarted = run_here(main, RANDOM + ['--output_dir', tmp_path])
    assert restarted.returncode == 0, restarted.stderr
    assert 'Resumed from' in restarted.stdout and '(epoch 0)' in restarted.stdout
    assert_same_run(uninterrupted, tmp_path)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars('test/acc1')] == [0, 1]
    assert [e.value for e in events.Scalars('train/loss')] == pytest.approx(
        [e['train_loss'] for e in read_log(tmp_path)]
    )


def test_sigterm_mid_epoch_leaves_a_checkpoint_that_resumes_exactly(uninterrupted, tmp_path):
    # The signal comes during step 40 (epoch 1's step 8, 32 steps per epoch); the run stops at the next read of
    # the steps' losses, after step 12 (--print-freq 4, which changes no number of the run).
    stopped = run_hooked(tmp_path, '--print-freq', '4', SIGNAL_AT='0:40:SIGTERM')
    line = assert_one_line_error(
        stopped.returncode,
        stopped.stdout,
        stopped.stderr,
        3,
        'stopped: SIGTERM',
        'during epoch 1',
        'after 12 of its 32 steps',
        'resumes there',
    )
    assert str(tmp_path / 'checkpoint.pth') in line
    saved = checkpoints.load_checkpoint(tmp_path / 'checkpoint.pth')
    assert saved['epoch'] == 0 and saved['progress']['steps'] == 12 and saved['progress']['global_step'] == 44
    assert [entry['epoch'] for entry in read_log(tmp_path)] == [0]

    restarted = run_here(main, RANDOM + ['--output_dir', tmp_path])
    assert restarted.returncode == 0, restarted.stderr
    assert 'Resumed from' in restarted.stdout and 'step 12 of epoch 1' in restarted.stdout
    assert_same_run(uninterrupted, tmp_path)


def test_killed_during_a_save_the_temporary_file_is_removed(uninterrupted, tmp_path):
    killed = run_hooked(tmp_path, KILL_AT='torch:save:2')  # epoch 1's (one serialisation per epoch)
    assert killed.returncode == -signal.SIGKILL
    left = [name for name in os.listdir(tmp_path) if name.endswith('.tmp')]
    assert len(left) == 1 and left[0].startswith(('.best.pth.', '.checkpoint.pth.'))  # best.pth first if it improved
    assert checkpoints.load_checkpoint(tmp_path / 'checkpoint.pth')['epoch'] == 0  # whole, epoch 0's

    restarted = run_here(main, RANDOM + ['--output_dir', tmp_path])
    assert restarted.returncode == 0, restarted.stderr
    assert f'Removed 1 temporary file(s) left by an interrupted save: {left[0]}' in restarted.stdout
    assert_same_run(uninterrupted, tmp_path)
