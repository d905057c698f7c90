"""A run killed with SIGKILL after an epoch and started again with the same command ends bit-identical
(model, EMA and optimizer) to a run never interrupted: CPU, --num_workers 0, with the authors'
augmentations (RandAugment: python's RNG, mixup/cutmix: numpy's, random erasing and drop path: torch's)
and repeated augmentation."""
import os
import signal
import subprocess
import sys
import time

import utils
from train_helpers import ROOT, TINY, assert_state_dicts_equal, command_env, read_log, run_main

# FAKE: 1,024 random 32 px images, 32 steps per epoch.
ARGS = TINY + ['--data-set', 'FAKE', '--batch-size', '32', '--epochs', '2', '--warmup-epochs', '1',
               '--drop-path', '0.1', '--save-freq', '0']


def kill_after_first_epoch(output_dir) -> int:
    """Start the run, SIGKILL it once epoch 0's checkpoint and log line are written; its exit code."""
    process = subprocess.Popen([sys.executable, 'main.py', *map(str, ARGS), '--output_dir', str(output_dir)],
                               cwd=ROOT, env=command_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = os.path.join(output_dir, 'log.txt')
    deadline = time.time() + 240
    while not (os.path.exists(log) and os.path.getsize(log)) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return process.returncode


def test_killed_and_restarted_run_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    uninterrupted = run_main(ARGS + ['--output_dir', tmp_path / 'a'])
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    assert kill_after_first_epoch(tmp_path / 'b') == -signal.SIGKILL
    assert [entry['epoch'] for entry in read_log(tmp_path / 'b')] == [0]
    restarted = run_main(ARGS + ['--output_dir', tmp_path / 'b'])
    assert restarted.returncode == 0, restarted.stderr
    assert 'Resumed from' in restarted.stdout and '(epoch 0)' in restarted.stdout

    a = utils.load_checkpoint(tmp_path / 'a' / 'checkpoint.pth')
    b = utils.load_checkpoint(tmp_path / 'b' / 'checkpoint.pth')
    assert a['epoch'] == b['epoch'] == 1
    assert_state_dicts_equal(a['model'], b['model'])
    assert_state_dicts_equal(a['model_ema'], b['model_ema'])
    for state_a, state_b in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert_state_dicts_equal(state_a, state_b)
    log_a, log_b = read_log(tmp_path / 'a'), read_log(tmp_path / 'b')
    assert log_a == log_b
