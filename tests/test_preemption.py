"""Preemption as a cluster delivers it: SLURM signals every process of a job step (the launcher, the training
processes and their data-loading workers), with SIGTERM (scancel, the time limit) or the signal of `--signal`
(SIGUSR1). Two processes with two loader workers each, on the CPU (gloo), under torchrun and under srun
(simulated: each task started with srun's variables): after the signal every training process writes nothing but
rank 0's `stopped:` line, exits 3, and a resumable checkpoint holds the epoch's progress; the same command started
again ends bit-identical to a run never stopped. With --deterministic the same holds for four processes, whose
ring all-reduce sums in an order that depends on the gradient buckets' layout. And the launch mistakes a batch
script makes get one line at once."""

import os
import signal
import sys

import pytest
import torch

import distributed
import main
from errors import UsageError
from train_helpers import TINY, assert_same_training, descendants, finish, free_port, start, torchrun_command

STEPS = 16  # FAKE's 1,024 training images in batches of 32 on two processes
ARGS = TINY + [
    '--data-set',
    'FAKE',
    '--batch-size',
    '32',
    '--epochs',
    '1',
    '--warmup-epochs',
    '0',
    '--drop-path',
    '0.2',
    '--save-freq',
    '0',
    '--model-ema-warmup',
    '--num_workers',
    '2',
    '--print-freq',
    '2',
]


def launch(launcher: str, out, args=ARGS, nproc: int = 2, **env) -> list:
    """The run as `launcher` ('torchrun' or 'srun') starts it, each training process recording its exit code."""
    command = ['tests/record_exit.py', 'main.py', *args, '--output_dir', out]
    env = dict(EXIT_CODE_DIR=str(out.parent / f'{out.name}_codes'), **env)
    os.makedirs(env['EXIT_CODE_DIR'], exist_ok=True)
    if launcher == 'torchrun':
        return [start(torchrun_command(nproc, command[0], command[1:]), **env)]
    port, job = free_port(), str(free_port())
    srun = dict(
        SLURM_STEP_NUM_TASKS=str(nproc),
        SLURM_NTASKS=str(nproc),
        SLURM_STEP_NODELIST='localhost',
        SLURM_JOB_ID=job,
        MASTER_PORT=str(port),
    )
    return [
        start([sys.executable, *command], SLURM_PROCID=str(r), SLURM_LOCALID=str(r), **srun, **env)
        for r in range(nproc)
    ]


def exit_codes(out) -> list:
    folder = out.parent / f'{out.name}_codes'
    return [int((folder / name).read_text()) for name in sorted(os.listdir(folder))]


def signal_in_epoch(processes, sig, step: int = 6):
    """Once rank 0 has logged `step` steps of epoch 0, `sig` to every process of the job at once: the launchers,
    the training processes and their data-loading workers (which must exist by then)."""
    for line in processes[0].stdout:
        if f'Epoch: [0] [{step - 1:>2}/{STEPS}]' in line:
            break
    targets = [pid for p in processes for pid in [p.pid, *descendants(p.pid)]]
    assert len(targets) >= 2 + 2 * 2, 'the loader workers should be running'
    for pid in targets:
        os.kill(pid, sig)


def finished(processes) -> list:
    return [finish(p) for p in processes]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """The run never stopped (srun, two processes)."""
    out = tmp_path_factory.mktemp('reference') / 'run'
    for code, _, stderr in finished(launch('srun', out)):
        assert code == 0, stderr
    return torch.load(out / 'checkpoint.pth', weights_only=True)


@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    'launcher, sig',
    [('torchrun', signal.SIGTERM), ('torchrun', signal.SIGUSR1), ('srun', signal.SIGTERM)],
    ids=['torchrun-SIGTERM', 'torchrun-SIGUSR1', 'srun-SIGTERM'],
)
def test_a_signal_to_every_process_saves_exits_3_and_resumes_bit_identical(reference, tmp_path, launcher, sig):
    out = tmp_path / 'run'
    processes = launch(launcher, out)
    signal_in_epoch(processes, sig)
    results = finished(processes)
    assert exit_codes(out) == [3, 3]
    if launcher == 'srun':
        assert [code for code, _, _ in results] == [3, 3]
    stderr = '\n'.join(err for _, _, err in results)
    ours = [line for line in stderr.splitlines() if line.startswith('[rank')]  # what the training processes said
    assert len(ours) == 1 and ours[0].startswith(f'[rank 0] stopped: {sig.name} received during epoch 0; stopped after')
    assert 'DataLoader worker' not in stderr and 'main.py' not in stderr  # no worker died, no traceback of ours
    stopped = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert stopped['epoch'] == -1 and 6 <= stopped['progress']['steps'] < STEPS  # written after the signal
    for code, _, stderr in finished(launch(launcher, out)):
        assert code == 0, stderr
    assert_same_training(reference, torch.load(out / 'checkpoint.pth', weights_only=True))


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_deterministic_four_processes_stopped_and_resumed_are_bit_identical(tmp_path):
    """Four processes: with DDP's bucket rebuild after the first step, the resumed run's first steps would reduce
    in another buffer layout than the uninterrupted run's, and the ring all-reduce sum in another order."""
    args = [*ARGS, '--batch-size', '16', '--deterministic']  # 16 steps of 4 x 16 images
    reference, stopped = tmp_path / 'reference', tmp_path / 'stopped'
    for code, _, stderr in finished(launch('torchrun', reference, args, nproc=4)):
        assert code == 0, stderr
    processes = launch('torchrun', stopped, args, nproc=4)
    signal_in_epoch(processes, signal.SIGTERM)
    finished(processes)
    assert exit_codes(stopped) == [3, 3, 3, 3]
    for code, _, stderr in finished(launch('torchrun', stopped, args, nproc=4)):
        assert code == 0, stderr
    expected = torch.load(reference / 'checkpoint.pth', weights_only=True)
    assert_same_training(expected, torch.load(stopped / 'checkpoint.pth', weights_only=True))


def test_a_batch_script_that_runs_python_for_several_tasks_is_told_at_once():
    """`python main.py` in a batch script of --ntasks 8 (no srun): one process would wait --dist-timeout for seven
    that never come."""
    with pytest.raises(UsageError, match='SLURM_NTASKS is 8 but this process was not started by srun'):
        distributed.launch_environment({'SLURM_NTASKS': '8', 'SLURM_PROCID': '0', 'SLURM_JOB_ID': '7'})
    assert distributed.launch_environment({'SLURM_NTASKS': '1', 'SLURM_PROCID': '0'})['WORLD_SIZE'] == '1'


def test_srun_tasks_meet_at_the_first_node_on_a_port_of_their_job():
    """Two jobs whose first node is the same must not both listen on 29500."""
    srun = {'SLURM_PROCID': '3', 'SLURM_STEP_NUM_TASKS': '8', 'SLURM_LOCALID': '3', 'SLURM_STEP_NODELIST': 'gpu[07-08]'}
    first = distributed.launch_environment({**srun, 'SLURM_JOB_ID': '123456'})
    second = distributed.launch_environment({**srun, 'SLURM_JOB_ID': '123457'})
    assert first['MASTER_ADDR'] == 'gpu07' and (first['RANK'], first['WORLD_SIZE'], first['LOCAL_RANK']) == (
        '3',
        '8',
        '3',
    )
    assert first['MASTER_PORT'] != second['MASTER_PORT']
    assert distributed.launch_environment({**srun, 'SLURM_JOB_ID': '1', 'MASTER_PORT': '4000'})['MASTER_PORT'] == '4000'


@pytest.mark.parametrize(
    'env, fragment',
    [
        ({'RANK': '0', 'WORLD_SIZE': '2'}, 'MASTER_ADDR, MASTER_PORT'),  # left from another shell
        ({'RANK': 'x', 'WORLD_SIZE': '2', 'MASTER_ADDR': 'a', 'MASTER_PORT': '1'}, 'not numbers'),
    ],
)
def test_launcher_variables_left_over_are_one_line(env, fragment):
    with pytest.raises(UsageError, match=fragment):
        distributed.launch_environment(env)


def test_the_imagenet_configs_leave_loader_workers_to_the_per_core_cap():
    """16 workers per process fixed in a config would start 128 per node of 8 GPUs however few cores the job has."""
    args = main.get_args_parser().parse_args(['--config', 'configs/ravlt_s.yaml'])
    assert args.num_workers is None and args.batch_size == 128 and args.model == 'RAVLT_S'
