"""Processes: how torchrun or srun launched this one, the process group, and the collectives the run uses.

Every collective here is a no-op with one process, so the same code runs with one process or many."""
import builtins
import datetime
import os
import re
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from errors import UsageError


def first_slurm_host(nodelist: str) -> Optional[str]:
    """The first host of a SLURM node list ('gpu[03-05,9],cpu1' -> 'gpu03')."""
    found = re.match(r'([^\[,]+)(?:\[([^\],]+))?', nodelist.strip())
    if not found:
        return None
    prefix, ranges = found.groups()
    return prefix + (ranges.split('-')[0] if ranges else '')


def launch_environment(env=None) -> dict:
    """RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR / MASTER_PORT) of this process: from torchrun, or from
    srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), as DeiT reads them."""
    env = os.environ if env is None else env
    if 'RANK' in env and 'WORLD_SIZE' in env:
        return {k: env[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT') if k in env}
    tasks = int(env.get('SLURM_STEP_NUM_TASKS', env.get('SLURM_NTASKS', 1)))
    if 'SLURM_PROCID' not in env or tasks <= 1:
        return {'RANK': '0', 'WORLD_SIZE': '1', 'LOCAL_RANK': '0'}
    address = env.get('MASTER_ADDR') or first_slurm_host(env.get('SLURM_STEP_NODELIST', env.get('SLURM_NODELIST', '')))
    if not address:
        raise UsageError('under srun, set MASTER_ADDR to the first node of the job (e.g. export MASTER_ADDR=$(scontrol '
                         'show hostnames "$SLURM_JOB_NODELIST" | head -n 1)), or launch with torchrun')
    return {'RANK': env['SLURM_PROCID'], 'WORLD_SIZE': str(tasks), 'LOCAL_RANK': env.get('SLURM_LOCALID', '0'),
            'MASTER_ADDR': address, 'MASTER_PORT': env.get('MASTER_PORT', '29500')}


def init_distributed(args):
    """Sets args.rank, world_size, local_rank, distributed and device (a torch.device), and under torchrun or
    srun the process group (NCCL on CUDA, gloo on the CPU) with the --dist-timeout. Then only rank 0 prints."""
    launch = launch_environment()
    os.environ.update(launch)  # torch's env:// initialisation and our error lines read them
    args.rank, args.world_size = int(launch['RANK']), int(launch['WORLD_SIZE'])
    args.local_rank = int(launch.get('LOCAL_RANK', 0))
    args.distributed = args.world_size > 1
    requested = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if requested == 'cuda':
        if not torch.cuda.is_available():
            raise UsageError('--device cuda was asked for but CUDA is not available; use --device cpu')
        if args.local_rank >= torch.cuda.device_count():
            raise UsageError(f'local rank {args.local_rank} but this node has {torch.cuda.device_count()} GPUs: start '
                             'one process per GPU (torchrun --nproc_per_node, srun --ntasks-per-node)')
        torch.cuda.set_device(args.local_rank)
        args.device = torch.device('cuda', args.local_rank)
    else:
        args.device = torch.device('cpu')
    if args.distributed:
        nccl = args.device.type == 'cuda'
        dist.init_process_group(backend='nccl' if nccl else 'gloo', init_method='env://',
                                world_size=args.world_size, rank=args.rank,
                                timeout=datetime.timedelta(minutes=args.dist_timeout),
                                device_id=args.device if nccl else None)
        silence_unless_main()
        if int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', 0)) and \
                os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
            print('warning: with torchrun --max-restarts, also set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: restarted '
                  "workers can otherwise read the killed workers' addresses from torchrun's store and hang "
                  '(pytorch/pytorch#135712)')


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def cleanup_distributed():
    """Destroy the process group if one was initialised."""
    if is_distributed():
        dist.destroy_process_group()


def silence_unless_main():
    """Only rank 0 prints progress (errors go to stderr directly, from every rank: see cli.run_cli)."""
    if not is_main_process():
        builtins.print = lambda *a, **k: None
        warnings.filterwarnings('ignore')


def _collective_device() -> torch.device:
    """Where collective tensors must live: NCCL needs CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def all_reduce_sum(values) -> list:
    """Sum a list of numbers over all processes (identity with one process)."""
    if get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


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


def first_error(error: Optional[str]) -> Optional[str]:
    """Processes that must stop together when any of them failed: `error` is this process's one-line problem
    or None; every process gets the first process's problem (naming its rank when there are several), or None."""
    errors = [error]
    if get_world_size() > 1:
        errors = [None] * get_world_size()
        dist.all_gather_object(errors, error)
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if not failed:
        return None
    rank, message = failed[0]
    return message if len(errors) == 1 else f'rank {rank}: {message}'


def agree(error: Optional[str]):
    """Every process stops together, with the same one line (rank 0 prints it), when any of them failed."""
    message = first_error(error)
    if message is not None:
        raise UsageError(message, everywhere=True)


def wait_for_main_process():
    """The other processes wait here, explicitly, while rank 0 works alone (scoring COCO, writing
    checkpoints); the wait is bounded by the process group's timeout (--dist-timeout)."""
    if get_world_size() > 1:
        dist.barrier()


def broadcast_buffers(*modules: torch.nn.Module):
    """Give every process rank 0's buffers (BatchNorm statistics). Without SyncBatchNorm (not available
    on the CPU) each process ends an epoch with the statistics of its own last batch."""
    if get_world_size() == 1:
        return
    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)
