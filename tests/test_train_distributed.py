"""torchrun --nproc_per_node=2 on the CPU (gloo): the processes train on disjoint samples with
identical weights, --dist-eval counts every held-out image exactly once, and under --max-restarts a
killed worker is restarted, resumes from the checkpoint and finishes."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from train_helpers import DIGITS, ROOT, command_env, read_log, run_main

NUM_TRAIN, NUM_VAL = 1437, 360


def worker_pids(pid: int) -> dict:
    """{rank: pid} of torchrun's worker processes (its children that have a RANK)."""
    workers = {}
    for task in os.listdir(f'/proc/{pid}/task'):
        with open(f'/proc/{pid}/task/{task}/children') as f:
            for child in f.read().split():
                try:
                    with open(f'/proc/{child}/environ', 'rb') as env:
                        variables = dict(v.split(b'=', 1) for v in env.read().split(b'\0') if b'=' in v)
                except FileNotFoundError:
                    continue
                if b'RANK' in variables:
                    workers[int(variables[b'RANK'])] = int(child)
    return workers


def test_two_processes_disjoint_samples_identical_weights_exact_eval_and_restart(tmp_path):
    out, spy = tmp_path / 'out', tmp_path / 'spy'
    spy.mkdir()
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               '--max-restarts=1', '--monitor-interval=0.1', 'tests/dist_spy.py',
               *map(str, DIGITS), '--epochs', '2', '--dist-eval', '--output_dir', str(out)]
    # The restart needs a fresh store (pytorch/pytorch#135712; see the README).
    env = command_env(SPY_DIR=str(spy), TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1')
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        log = out / 'log.txt'
        deadline = time.time() + 240
        while not (log.exists() and log.stat().st_size) and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        workers = worker_pids(process.pid)
        assert sorted(workers) == [0, 1], f'workers {workers}'
        os.kill(workers[1], signal.SIGKILL)  # after epoch 0's checkpoint, during epoch 1
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers
    assert process.returncode == 0, output

    assert 'Resumed from' in output and '(epoch 0)' in output, output
    assert [entry['epoch'] for entry in read_log(out)] == [0, 1]
    for epoch in (0, 1):
        rank0, rank1 = (torch.load(spy / f'train_rank{r}_epoch{epoch}.pt') for r in (0, 1))
        assert len(rank0['indices']) == len(rank1['indices']) == NUM_TRAIN // 2
        assert not set(rank0['indices']) & set(rank1['indices'])
        assert set(rank0['indices']) | set(rank1['indices']) <= set(range(NUM_TRAIN))
        assert list(rank0['params']) == list(rank1['params'])
        for key in rank0['params']:
            assert torch.equal(rank0['params'][key], rank1['params'][key]), f'epoch {epoch}: {key} differs'
    shards = [torch.load(spy / f'eval_rank{r}.pt') for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(NUM_VAL))

    # The two-process evaluation counted each image once: one process over all of them agrees.
    single = run_main(DIGITS + ['--eval', '--resume', out / 'checkpoint.pth', '--output_dir', tmp_path / 'eval'])
    assert single.returncode == 0, single.stderr
    with open(tmp_path / 'eval' / 'eval_results.json') as f:
        results = json.load(f)
    last = read_log(out)[-1]
    assert (results['acc1'], results['acc5']) == (last['test_acc1'], last['test_acc5'])
    assert (results['ema_acc1'], results['ema_acc5']) == (last['test_ema_acc1'], last['test_ema_acc5'])
