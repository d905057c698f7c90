"""Processes: how torchrun or srun launched this one, its device, the process group, and the few collectives the
run uses. Every collective is a no-op with one process, so the same code runs with one process or many.

When a process fails it exits at once (cli.one_line_errors); the launcher ends the others: torchrun's agent
stops every worker when one exits non-zero, `srun --kill-on-bad-exit=1` every task (docs/clusters.md)."""

import builtins
import datetime
import os
import re
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from errors import UsageError


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list ('gpu[03-05,9],cpu1' -> 'gpu03')."""
    prefix, ranges = re.match(r'([^\[,]+)(?:\[([^\],]+))?', nodelist.strip()).groups()
    return prefix + (ranges.split('-')[0] if ranges else '')


def launch_environment(env=None) -> dict:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT of this process: torchrun's variables, else srun's
    (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID; the rendezvous on the step's first node, at a port
    derived from the job id unless MASTER_PORT is set), else one process."""
    env = os.environ if env is None else env
    if 'RANK' in env or 'WORLD_SIZE' in env:
        missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT') if k not in env]
        if missing or not (env['RANK'].isdigit() and env['WORLD_SIZE'].isdigit()):
            raise UsageError(
                f'RANK={env.get("RANK")} WORLD_SIZE={env.get("WORLD_SIZE")} are set but not by a launcher '
                f'({", ".join(missing) or "not numbers"}): unset them to run one process, or start with torchrun'
            )
        return {k: env.get(k, '0') for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    if 'SLURM_STEP_NUM_TASKS' not in env:
        if int(env.get('SLURM_NTASKS', 1)) > 1:  # a batch script that runs python itself: one process
            raise UsageError(
                f'SLURM_NTASKS is {env["SLURM_NTASKS"]} but this process was not started by srun: start one '
                'process per task with `srun python ...` (or torchrun), or ask SLURM for one task'
            )
        return {'RANK': '0', 'WORLD_SIZE': '1', 'LOCAL_RANK': '0'}
    nodes = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST', '')
    return {
        'RANK': env['SLURM_PROCID'],
        'WORLD_SIZE': env['SLURM_STEP_NUM_TASKS'],
        'LOCAL_RANK': env.get('SLURM_LOCALID', '0'),
        'MASTER_ADDR': env.get('MASTER_ADDR') or first_slurm_host(nodes),
        # Two jobs whose first node is the same must not meet at one port.
        'MASTER_PORT': env.get('MASTER_PORT') or str(20000 + int(env.get('SLURM_JOB_ID', 0)) % 20000),
    }


def cuda_device_index(local_rank: int, count: int) -> int:
    """The GPU of a process among the `count` it sees: its local rank's, or the only one it sees when the launcher
    gives each process its own (srun --gpus-per-task=1, a site's cgroups)."""
    if local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise UsageError(
        f'local rank {local_rank} but this process sees {count} GPUs: start one process per GPU, or let each '
        'process see one GPU (srun --gpus-per-task=1)'
    )


def init_distributed(args):
    """Sets args.rank, world_size, device and dist_backend; with several processes the process group (NCCL on
    CUDA, gloo on the CPU unless --dist-backend) with --dist-timeout. Then only rank 0 prints."""
    launch = launch_environment()
    args.rank, args.world_size = int(launch['RANK']), int(launch['WORLD_SIZE'])
    if args.world_size > 1:  # torch's env:// initialisation reads them (one process leaves the environment alone)
        os.environ.update(launch)
    if (args.device or ('cuda' if torch.cuda.is_available() else 'cpu')) == 'cuda':
        if not torch.cuda.is_available():
            raise UsageError('--device cuda was asked for but CUDA is not available; use --device cpu')
        index = cuda_device_index(int(launch['LOCAL_RANK']), torch.cuda.device_count())
        torch.cuda.set_device(index)
        args.device = torch.device('cuda', index)
    else:
        args.device = torch.device('cpu')
    args.dist_backend = args.dist_backend or ('nccl' if args.device.type == 'cuda' else 'gloo')
    if args.dist_backend == 'nccl' and args.device.type != 'cuda':
        raise UsageError('--dist-backend nccl needs CUDA: use --device cuda, or gloo on the CPU')
    if args.world_size > 1:
        dist.init_process_group(
            backend=args.dist_backend,
            timeout=datetime.timedelta(minutes=args.dist_timeout),
            device_id=args.device if args.dist_backend == 'nccl' else None,
        )
        if args.rank != 0:  # errors still reach stderr (cli.one_line_errors)
            builtins.print = lambda *a, **k: None
            warnings.filterwarnings('ignore')


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def _collective_device() -> torch.device:
    return torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else torch.device('cpu')


def all_reduce_sum(values) -> list:
    """Numbers (a list, or a tensor read on the host once, after the sum) summed over the processes."""
    if get_world_size() == 1:
        return values.tolist() if isinstance(values, torch.Tensor) else list(values)
    if isinstance(values, torch.Tensor):
        values = values.to(_collective_device())
    else:
        values = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(values)
    return values.tolist()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every process."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather_objects(obj) -> Optional[list]:
    """Every process's `obj`, as a list on rank 0 (None elsewhere)."""
    if get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size() if is_main_process() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def agree(error: Optional[str]):
    """A check every process makes (its one-line problem or None): all stop together with the first problem,
    which rank 0 reports, or all go on."""
    errors = [error]
    if get_world_size() > 1:
        errors = [None] * get_world_size()
        dist.all_gather_object(errors, error)
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        rank, message = failed[0]
        raise UsageError(message if len(errors) == 1 else f'rank {rank}: {message}', everywhere=True)


def barrier():
    """The other processes wait here while rank 0 works alone (writing checkpoints, scoring COCO), at most
    --dist-timeout."""
    if get_world_size() > 1:
        dist.barrier()


def broadcast_buffers(*modules: torch.nn.Module):
    """Rank 0's buffers (BatchNorm statistics) on every process: without SyncBatchNorm (gloo) each process ends an
    epoch with its own."""
    if get_world_size() > 1:
        for module in modules:
            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=0)
