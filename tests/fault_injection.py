"""Runs an entry point (`python tests/fault_injection.py main.py ARGS`, also under torchrun) with test hooks
chosen by environment variables; the hooks only watch or stop the run, they change none of its numbers.

    SPY_DIR=D        each process records into D what it saw: the training indices and the parameters after
                     every epoch, its evaluation share, and its C allocator (allocator.describe())
    FAULTS_AT=F:N    the process records the minor page faults of each of the evaluated model's first N forward
                     passes (and its PID and C allocator) into the JSON file F, then ends (exit code 0)
    SIGNAL_AT=R:S:N  the process of rank R sends itself signal N (e.g. SIGTERM) before the run's optimizer step S
    PREEMPT_AT=S:N   under torchrun, as a cluster preempts a job: once every process has reached the run's
                     optimizer step S (each has asked whether to stop, without the signal), rank 0 sends signal N
                     to the launcher and every process it started; every process waits until it has been sent, so
                     all of them have it when they next ask, at step S + 1
    KILL_AT=M:F:K    the process SIGKILLs itself the K-th time function F of module M is called (e.g.
                     output_folder:OutputFolder.append_log, checkpoints:save_checkpoint)
    FAIL_AT=R:E[:stay]  the process of rank R raises E in its first training step ('usage': a UsageError, 'oom':
                     torch.OutOfMemoryError), or cannot read checkpoints ('load': as if its node had no copy), or
                     finds the disk full when it saves one ('enospc'); with ':stay' it then stays alive without
                     taking part, as NCCL sees a failed peer on the same node (gloo would notice its exit)
    STALL_AT=N       the N-th sample a process (or data-loading worker) loads never comes: as a data file that
                     blocks, or a hung file system
    DATA_WAIT_AFTER_STOP=S  how long a stopped run waits for a batch (trainer.DATA_WAIT_AFTER_STOP)
"""

import errno
import importlib
import json
import os
import resource
import runpy
import signal
import sys
import time

import torch

import allocator
import checkpoints
import cli
import engine
import trainer
import utils

RANK = int(os.environ.get('RANK', os.environ.get('SLURM_PROCID', 0)))


def spy(directory):
    train_one_epoch, evaluate = engine.train_one_epoch, engine.evaluate

    def spied_train(model, loss_fn, data_loader, *args, **kwargs):
        result = train_one_epoch(model, loss_fn, data_loader, *args, **kwargs)
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        indices = [index for index, _ in data_loader.sampler]
        torch.save(
            {'indices': indices, 'params': params}, os.path.join(directory, f'train_rank{RANK}_epoch{args[3]}.pt')
        )
        return result

    def spied_evaluate(data_loader, *args, **kwargs):
        torch.save(list(data_loader.dataset.dataset.indices), os.path.join(directory, f'eval_rank{RANK}.pt'))
        with open(os.path.join(directory, f'allocator_rank{RANK}.txt'), 'w') as f:
            f.write(allocator.describe())
        return evaluate(data_loader, *args, **kwargs)

    engine.train_one_epoch, engine.evaluate = spied_train, spied_evaluate


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # every thread of the process


def faults_at(path, steps):
    evaluate = engine.evaluate

    def counted(data_loader, model, *args, **kwargs):
        faults = []

        def before(module, inputs):
            faults.append(-minor_faults())

        def after(module, inputs, output):
            faults[-1] += minor_faults()
            if len(faults) == int(steps):
                with open(path, 'w') as f:
                    json.dump({'faults': faults, 'pid': os.getpid(), 'allocator': allocator.describe()}, f)
                sys.stdout.flush()
                os._exit(0)

        model.register_forward_pre_hook(before)
        model.register_forward_hook(after)
        return evaluate(data_loader, model, *args, **kwargs)

    engine.evaluate = counted


def signal_at(rank, step, name):
    optimizer_step, calls = engine.optimizer_step, [0]

    def hooked(*args, **kwargs):
        if RANK == int(rank) and calls[0] == int(step):
            os.kill(os.getpid(), getattr(signal, name))
        calls[0] += 1
        return optimizer_step(*args, **kwargs)

    engine.optimizer_step = hooked


def preempt_at(step, name):
    import torch.distributed as dist

    from train_helpers import descendants

    optimizer_step, calls = engine.optimizer_step, [0]

    def hooked(*args, **kwargs):
        if calls[0] == int(step):
            dist.barrier()
            if RANK == 0:
                launcher = os.getppid()
                for pid in descendants(launcher) + [launcher]:
                    os.kill(pid, getattr(signal, name))
            dist.barrier()
        calls[0] += 1
        return optimizer_step(*args, **kwargs)

    engine.optimizer_step = hooked


def kill_at(module, function, count):
    owner = importlib.import_module(module)
    *path, attribute = function.split('.')
    for name in path:
        owner = getattr(owner, name)
    original, calls = getattr(owner, attribute), [0]

    def hooked(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(count):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, attribute, hooked)


def fail_at(rank, error, stay=''):
    if RANK != int(rank):
        return
    if stay == 'stay':
        cli.cleanup_distributed = lambda: time.sleep(3600)  # after its one line: alive, silent
    if error == 'enospc':

        def full(obj, *paths):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(paths[-1]))

        checkpoints.save_checkpoint = full
        return
    if error == 'load':

        def unreadable(path, *args, **kwargs):
            raise cli.UsageError(f'checkpoint {path} does not exist')

        checkpoints.load_checkpoint = unreadable
        return

    def failing(*args, **kwargs):
        if error == 'oom':
            raise torch.OutOfMemoryError('CUDA out of memory (injected)')
        raise cli.UsageError('cannot read /data/train/n01440764/a.JPEG (injected)')

    engine.optimizer_step = failing


def stall_at(count):
    load, calls = utils.SeededDataset.__getitem__, [0]

    def stalled(self, item):
        calls[0] += 1
        if calls[0] == int(count):
            while True:
                time.sleep(3600)
        return load(self, item)

    utils.SeededDataset.__getitem__ = stalled


if __name__ == '__main__':
    if 'SPY_DIR' in os.environ:
        spy(os.environ['SPY_DIR'])
    if 'FAULTS_AT' in os.environ:
        faults_at(*os.environ['FAULTS_AT'].rsplit(':', 1))
    if 'SIGNAL_AT' in os.environ:
        signal_at(*os.environ['SIGNAL_AT'].split(':'))
    if 'PREEMPT_AT' in os.environ:
        preempt_at(*os.environ['PREEMPT_AT'].split(':'))
    if 'KILL_AT' in os.environ:
        kill_at(*os.environ['KILL_AT'].split(':'))
    if 'FAIL_AT' in os.environ:
        fail_at(*os.environ['FAIL_AT'].split(':'))
    if 'STALL_AT' in os.environ:
        stall_at(os.environ['STALL_AT'])
    if 'DATA_WAIT_AFTER_STOP' in os.environ:
        trainer.DATA_WAIT_AFTER_STOP = float(os.environ['DATA_WAIT_AFTER_STOP'])
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name='__main__')
