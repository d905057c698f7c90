"""Two processes on the CPU (gloo), launched by torchrun and by srun (simulated: SLURM_PROCID, SLURM_NTASKS,
SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_STEP_NODELIST, as srun sets them), stopped the ways a cluster stops them:
- the processes keep identical weights, and --dist-eval counts every held-out image exactly once;
- every process SIGKILLed after an epoch, then the same command again: bit-identical to a run never stopped
  (weights, EMA, optimizer, log.txt), whichever launcher;
- SIGUSR1 to one process or SIGTERM to every process in the middle of an epoch: all stop after the same step, a
  resumable checkpoint and exit code 3; the restart is bit-identical too; one process can continue from it;
- a process that fails alone exits at once with its one line (and its rank), and torchrun ends the other;
  a checkpoint that one process cannot read stops every process with one line;
- the same kill and restart of main_seg.py (Semantic FPN) is bit-identical to its uninterrupted run, and
  resumed with another process count it ends at its last step.
"""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import main
from helpers import ROOT
from train_helpers import (
    RANDOM,
    assert_same_training,
    finish,
    free_port,
    kill_at_epoch_boundary,
    read_log,
    run_here,
    start,
    torchrun_command,
)

# Each test runs two or three trainings of two processes: up to two minutes on a busy 2-core machine.
pytestmark = [pytest.mark.usefixtures('one_thread'), pytest.mark.distributed, pytest.mark.timeout(600)]

NUM_VAL = 256  # FAKE's held-out images
ARGS = RANDOM + ['--dist-eval']


def srun_process(rank: int, args, script='main.py', port=None, **env):
    """Task `rank` of two, as srun starts it (SLURM_PROCID, the step's task count), through the test hooks."""
    return start(
        [sys.executable, 'tests/fault_injection.py', script, *map(str, args)],
        SLURM_PROCID=str(rank),
        SLURM_NTASKS='2',
        SLURM_STEP_NUM_TASKS='2',
        SLURM_LOCALID=str(rank),
        SLURM_STEP_NODELIST='localhost',
        MASTER_PORT=str(port),
        **env,
    )


def srun(args, script='main.py', **env):
    """Two processes as srun starts them; (exit code, stdout, stderr) of each."""
    port = free_port()
    processes = [srun_process(rank, args, script, port, **env) for rank in (0, 1)]
    return [finish(p) for p in processes]


def torchrun(args, script='main.py', **env):
    return start(torchrun_command(2, 'tests/fault_injection.py', [script, *args]), **env)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """Two epochs with two processes under (simulated) srun, never stopped; each process records what it saw."""
    out, spy = tmp_path_factory.mktemp('reference'), tmp_path_factory.mktemp('spy')
    for code, _, stderr in srun(ARGS + ['--output_dir', out], SPY_DIR=str(spy)):
        assert code == 0, stderr
        assert 'Grad strides do not match' not in stderr  # DDP's buckets and the gradients agree on their layout
    return out, spy


def assert_same_run(a, b):
    assert_same_training(
        checkpoints.load_checkpoint(a / 'checkpoint.pth'), checkpoints.load_checkpoint(b / 'checkpoint.pth')
    )
    assert read_log(a) == read_log(b)


def test_processes_agree_and_evaluation_counts_each_image_once(reference, tmp_path):
    out, spy = reference
    for epoch in (0, 1):
        rank0, rank1 = (torch.load(spy / f'train_rank{r}_epoch{epoch}.pt') for r in (0, 1))
        assert len(rank0['indices']) == len(rank1['indices']) and rank0['indices'] != rank1['indices']
        for key in rank0['params']:
            assert torch.equal(rank0['params'][key], rank1['params'][key]), f'epoch {epoch}: {key} differs'
    shards = [torch.load(spy / f'eval_rank{r}.pt') for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(NUM_VAL))
    # One process over all the images agrees with the two shares.
    single = run_here(main, ARGS + ['--eval', '--resume', out / 'checkpoint.pth', '--output_dir', tmp_path])
    assert single.returncode == 0, single.stderr
    results = json.loads((tmp_path / 'eval_results.json').read_text())
    last = read_log(out)[-1]
    assert {k: results[k] for k in ('acc1', 'acc5', 'ema_acc1', 'ema_acc5')} == {
        k: last[f'test_{k}'] for k in ('acc1', 'acc5', 'ema_acc1', 'ema_acc5')
    }


def test_killed_at_an_epoch_boundary_and_restarted_is_bit_identical(reference, tmp_path):
    kill_at_epoch_boundary(torchrun(ARGS + ['--output_dir', tmp_path]), tmp_path)
    assert [entry['epoch'] for entry in read_log(tmp_path)] == [0]
    code, out, err = finish(torchrun(ARGS + ['--output_dir', tmp_path]))
    assert code == 0, err
    assert 'Resumed from' in out and '(epoch 0)' in out
    assert_same_run(reference[0], tmp_path)


def stop_lines(err: str) -> list:
    return [line for line in err.splitlines() if 'stopped: ' in line]


def test_sigusr1_to_one_process_stops_both_after_the_same_step_and_resumes_exactly(reference, tmp_path):
    # Rank 1 alone receives SIGUSR1 (a cluster's warning signal; by default it would end the process) during the
    # run's step 20 (epoch 1's step 4, 16 steps per epoch and process); the processes agree at the next read of
    # the steps' losses, after step 8 (--print-freq 4).
    code, out, err = finish(torchrun(ARGS + ['--print-freq', '4', '--output_dir', tmp_path], SIGNAL_AT='1:20:SIGUSR1'))
    assert code != 0
    assert stop_lines(err) == [
        f'[rank 0] stopped: a stop signal (to another process) received during epoch 1; '
        f'stopped after 8 of its 16 steps: '
        f'{tmp_path / "checkpoint.pth"} resumes there (run the same command again)'
    ], err
    saved = checkpoints.load_checkpoint(tmp_path / 'checkpoint.pth')
    assert (saved['epoch'], saved['progress']['steps'], saved['world_size']) == (0, 8, 2)

    code, out, err = finish(torchrun(ARGS + ['--output_dir', tmp_path]))
    assert code == 0, err
    assert 'step 8 of epoch 1' in out
    assert_same_run(reference[0], tmp_path)


def test_sigterm_to_every_process_and_one_process_continues(tmp_path):
    """As a cluster preempts a job: SIGTERM to the launcher and every worker, during the run's step 20 (epoch 1).
    Then the run continues with one process from the two processes' checkpoint."""
    # The signal arrives before step 20 (epoch 1's step 4); the processes agree on it at the next read of the
    # steps' losses, after 8 steps (--print-freq 4).
    code, out, err = finish(torchrun(ARGS + ['--print-freq', '4', '--output_dir', tmp_path], PREEMPT_AT='20:SIGTERM'))
    assert code != 0
    assert stop_lines(err) == [
        f'[rank 0] stopped: SIGTERM received during epoch 1; stopped after 8 of its 16 steps: '
        f'{tmp_path / "checkpoint.pth"} resumes there (run the same command again)'
    ], err
    assert not [line for line in err.splitlines() if line.startswith('[rank') and 'error' in line], err
    assert not [line for line in err.splitlines() if ROOT in line], err  # no traceback of ours
    assert 'Grad strides do not match' not in err
    saved = checkpoints.load_checkpoint(tmp_path / 'checkpoint.pth')
    assert (saved['epoch'], saved['progress']['steps'], saved['world_size']) == (0, 8, 2)

    # Another process count cannot continue that epoch exactly: it restarts the epoch.
    result = run_here(main, ARGS + ['--output_dir', tmp_path])
    assert result.returncode == 0, result.stderr
    assert (
        'The checkpoint was taken during epoch 1 with 2 processes of batch 32: with 1 of 32 that epoch restarts from '
        'its beginning' in result.stdout
    )
    assert [entry['epoch'] for entry in read_log(tmp_path)] == [0, 1]


@pytest.mark.parametrize(
    'rank, error, line',
    [
        (1, 'usage', 'error: cannot read /data/train/n01440764/a.JPEG (injected)'),
        (0, 'enospc', 'error: no space left on device ({out}); the checkpoints on disk are whole'),
    ],
)
def test_a_process_that_fails_alone_exits_with_its_line_and_torchrun_ends_the_other(tmp_path, rank, error, line):
    """One process fails alone: rank 1 at its first step while rank 0 computes, or rank 0 finding the disk full
    when it saves epoch 0 while rank 1 waits for it. It prints its one line, with its rank, and exits at once
    (waiting for no peer); torchrun's agent sees its exit and ends the other, and the job with it."""
    code, out, err = finish(torchrun(ARGS + ['--output_dir', tmp_path], FAIL_AT=f'{rank}:{error}'), timeout=120)
    assert code != 0
    failed = [entry for entry in err.splitlines() if entry.startswith('[rank ')]
    assert failed[0] == f'[rank {rank}] ' + line.format(out=tmp_path / 'best.pth'), err
    assert 'Start training' in out and not (tmp_path / 'checkpoint.pth').exists()
    assert ('Averaged stats' in out) == (error == 'enospc')  # rank 0 trained epoch 0 only where it failed saving


def test_a_process_that_cannot_read_the_checkpoint_stops_every_process_with_one_line(reference, tmp_path):
    """Rank 0 decides what to resume (its output folder's checkpoint) and every process reads it; on nodes
    without a shared folder rank 1 cannot, and every process stops, reported once."""
    (tmp_path / 'checkpoint.pth').write_bytes((reference[0] / 'checkpoint.pth').read_bytes())
    (rank0, out0, err0), (rank1, out1, err1) = srun(ARGS + ['--output_dir', tmp_path], FAIL_AT='1:load')
    assert rank0 == rank1 == 2
    assert err0.strip().splitlines() == [
        f'[rank 0] error: rank 1: checkpoint {tmp_path / "checkpoint.pth"} does not exist (on several nodes the '
        'output folder must be shared)'
    ]
    assert err1 == ''


def ade_folders(root, num_train: int = 4, num_val: int = 2):
    """A tiny ADE20K-format set: 64 x 48 images of coloured bands, labels 0 ('other') to 3."""
    rng = np.random.default_rng(1)
    palette = np.array([[128, 128, 128], [200, 30, 30], [30, 200, 30], [30, 30, 200]], np.uint8)
    for split, count in (('training', num_train), ('validation', num_val)):
        (root / 'images' / split).mkdir(parents=True)
        (root / 'annotations' / split).mkdir(parents=True)
        for i in range(count):
            labels = np.zeros((48, 64), np.uint8)
            for label, top in enumerate(np.sort(rng.integers(4, 44, 3)), start=1):
                labels[top:] = label
            Image.fromarray(palette[labels]).save(root / 'images' / split / f'ADE_{i:04d}.jpg', quality=95)
            Image.fromarray(labels).save(root / 'annotations' / split / f'ADE_{i:04d}.png')


TINY_JSON = json.dumps({'embed_dims': [16, 32, 64, 128], 'depths': [1, 1, 1, 1], 'num_heads': [1, 1, 2, 4]})
SEG_ARGS = [
    '--task',
    'semfpn',
    '--model',
    'RAVLT_T',
    '--model-kwargs',
    TINY_JSON,
    '--num-classes',
    '3',
    '--img-scale',
    '64',
    '48',
    '--crop-size',
    '48',
    '--device',
    'cpu',
    '--num_workers',
    '0',
    '--batch-size',
    '1',
    '--lr',
    '1e-3',
    '--iters',
    '6',
    '--eval-interval',
    '2',
    '--print-freq',
    '100',
]


def test_segmentation_killed_and_restarted_is_bit_identical(tmp_path):
    ade_folders(tmp_path / 'ade')
    args = SEG_ARGS + ['--data-path', tmp_path / 'ade']
    code, _, err = finish(torchrun(args + ['--output_dir', tmp_path / 'a'], script='main_seg.py'))
    assert code == 0, err
    kill_at_epoch_boundary(torchrun(args + ['--output_dir', tmp_path / 'b'], script='main_seg.py'), tmp_path / 'b')
    code, out, err = finish(torchrun(args + ['--output_dir', tmp_path / 'b'], script='main_seg.py'))
    assert code == 0, err
    assert 'Resumed from' in out
    assert [(e['epoch'], e['step']) for e in read_log(tmp_path / 'b')] == [(0, 2), (1, 4), (2, 6)]
    assert_same_run(tmp_path / 'a', tmp_path / 'b')


@pytest.mark.parametrize('before, after', [(2, 1), (1, 2)])
def test_segmentation_resumed_with_another_process_count_ends_at_its_last_step(tmp_path, before, after):
    """The schedule counts steps: resumed with fewer processes, the epochs are longer (4 steps instead of 2) and
    the run continues to --iters (not stopping early with steps untrained); with more, it ends at --iters too
    (without empty epochs, each evaluating again)."""
    ade_folders(tmp_path / 'ade')
    args = SEG_ARGS + ['--data-path', tmp_path / 'ade', '--output_dir', tmp_path / 'out']

    def launch(processes, **env):
        if processes == 2:
            return finish(torchrun(args, script='main_seg.py', **env))
        return finish(start([sys.executable, 'tests/fault_injection.py', 'main_seg.py', *map(str, args)], **env))

    # Killed after the checkpoint of its first epoch that evaluates: step 4 with 2 processes, 4 with one.
    code, _, err = launch(before, KILL_AT=f'output_folder:OutputFolder.append_log:{2 if before == 2 else 1}')
    assert code != 0 and 'Grad strides do not match' not in err
    assert checkpoints.load_checkpoint(tmp_path / 'out' / 'checkpoint.pth')['step'] == 4
    code, out, err = launch(after)
    assert code == 0, err
    steps = [(entry['epoch'], entry['step']) for entry in read_log(tmp_path / 'out')]
    assert steps == ([(0, 2), (1, 4), (2, 6)] if before == 2 else [(0, 4), (1, 6)])
    saved = checkpoints.load_checkpoint(tmp_path / 'out' / 'checkpoint.pth')
    assert (saved['step'], saved['world_size']) == (6, after)
