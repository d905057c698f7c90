"""Runs an entry point (`python tests/fault_injection.py main.py ARGS`, also under torchrun or srun) with test hooks
chosen by environment variables; the hooks only watch or stop the run, they change none of its numbers.

    SPY_DIR=D        each process records into D what it saw: the training indices and the parameters after
                     every epoch, and its evaluation share
    FAULTS_AT=F:N    the process records the minor page faults of each of the evaluated model's first N forward
                     passes into the JSON file F, then ends (exit code 0)
    SIGNAL_AT=R:S:N  the process of rank R sends itself signal N (e.g. SIGTERM) before the run's optimizer step S
    PREEMPT_AT=S:N   under torchrun, as a cluster preempts a job: once every process has reached the run's
                     optimizer step S (each has asked whether to stop, without the signal), rank 0 sends signal N
                     to the launcher and every process it started; every process waits until it has been sent, so
                     all of them have it when they next ask, at step S + 1
    KILL_AT=M:F:K    the process SIGKILLs itself the K-th time function F of module M is called (e.g.
                     output_folder:OutputFolder.append_log, checkpoints:save_checkpoint)
    FAIL_AT=R:E      the process of rank R raises E at its first optimizer step ('usage': a UsageError naming an
                     image, 'oom': torch.OutOfMemoryError), or cannot read checkpoints ('load': as if its node had
                     no copy), or finds the disk full when it saves one ('enospc')
"""

import errno
import importlib
import json
import os
import resource
import runpy
import signal
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import checkpoints
import engine
from errors import UsageError

RANK = int(os.environ.get('RANK', os.environ.get('SLURM_PROCID', 0)))


def before_optimizer_steps(hook):
    """Call hook(step) before each optimizer step of the process (counted from 0; a skipped step is none)."""
    calls = [0]

    def pre_hook(optimizer, args, kwargs):
        hook(calls[0])
        calls[0] += 1

    register_optimizer_step_pre_hook(pre_hook)


def spy(directory):
    train_one_epoch, evaluate = engine.train_one_epoch, engine.evaluate

    def spied_train(model, criterion, data_loader, optimizer, scaler, device, epoch, **kwargs):
        result = train_one_epoch(model, criterion, data_loader, optimizer, scaler, device, epoch, **kwargs)
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        indices = [index for index, _ in data_loader.sampler]
        torch.save({'indices': indices, 'params': params}, os.path.join(directory, f'train_rank{RANK}_epoch{epoch}.pt'))
        return result

    def spied_evaluate(model, data_loader, *args, **kwargs):
        dataset = data_loader.dataset.dataset  # inside SeededDataset
        indices = list(dataset.indices) if isinstance(dataset, torch.utils.data.Subset) else list(range(len(dataset)))
        torch.save(indices, os.path.join(directory, f'eval_rank{RANK}.pt'))
        return evaluate(model, data_loader, *args, **kwargs)

    engine.train_one_epoch, engine.evaluate = spied_train, spied_evaluate


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # every thread of the process


def faults_at(path, steps):
    evaluate = engine.evaluate

    def counted(model, data_loader, *args, **kwargs):
        faults = []

        def before(module, inputs):
            faults.append(-minor_faults())

        def after(module, inputs, output):
            faults[-1] += minor_faults()
            if len(faults) == int(steps):
                with open(path, 'w') as f:
                    json.dump({'faults': faults}, f)
                sys.stdout.flush()
                os._exit(0)

        model.register_forward_pre_hook(before)
        model.register_forward_hook(after)
        return evaluate(model, data_loader, *args, **kwargs)

    engine.evaluate = counted


def signal_at(rank, step, name):
    def hook(calls):
        if RANK == int(rank) and calls == int(step):
            os.kill(os.getpid(), getattr(signal, name))

    before_optimizer_steps(hook)


def preempt_at(step, name):
    import torch.distributed as dist

    from train_helpers import descendants

    def hook(calls):
        if calls == int(step):
            dist.barrier()
            if RANK == 0:
                launcher = os.getppid()
                for pid in descendants(launcher) + [launcher]:
                    os.kill(pid, getattr(signal, name))
            dist.barrier()

    before_optimizer_steps(hook)


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


def fail_at(rank, error):
    if RANK != int(rank):
        return
    if error == 'enospc':

        def full(obj, *paths):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(paths[0]))

        checkpoints.save_checkpoint = full
        return
    if error == 'load':

        def unreadable(path, *args, **kwargs):
            raise UsageError(f'checkpoint {path} does not exist')

        checkpoints.load_checkpoint = unreadable
        return

    def failing(calls):
        if error == 'oom':
            raise torch.OutOfMemoryError('CUDA out of memory (injected)')
        raise UsageError('cannot read /data/train/n01440764/a.JPEG (injected)')

    before_optimizer_steps(failing)


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
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name='__main__')
