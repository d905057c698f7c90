"""Processes: how torchrun or srun launched this one, the process group, the collectives the run uses, and the
watch that ends every process when one fails alone.

Every collective here is a no-op with one process, so the same code runs with one process or many."""

import builtins
import datetime
import os
import re
import threading
import time
import warnings
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from errors import EXIT_FAILURE, UsageError, report_line


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
        raise UsageError(
            'under srun, set MASTER_ADDR to the first node of the job (e.g. export MASTER_ADDR=$(scontrol '
            'show hostnames "$SLURM_JOB_NODELIST" | head -n 1)), or launch with torchrun'
        )
    return {
        'RANK': env['SLURM_PROCID'],
        'WORLD_SIZE': str(tasks),
        'LOCAL_RANK': env.get('SLURM_LOCALID', '0'),
        'MASTER_ADDR': address,
        'MASTER_PORT': env.get('MASTER_PORT', '29500'),
    }


def cuda_device_index(local_rank: int, count: int) -> int:
    """The GPU of a process among the `count` it sees: its local rank's, or the only one it sees when the launcher
    gives each process its own (srun --gpus-per-task=1 or --gpu-bind, a site's cgroups)."""
    if local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise UsageError(
        f'local rank {local_rank} but this process sees {count} GPUs: start one process per GPU '
        '(torchrun --nproc_per_node, srun --ntasks-per-node), or let each process see one GPU '
        '(srun --gpus-per-task=1)'
    )


def init_distributed(args):
    """Sets args.rank, world_size, local_rank, distributed, device (a torch.device) and dist_backend, and under
    torchrun or srun the process group (--dist-backend: NCCL on CUDA, gloo on the CPU, by default) with the
    --dist-timeout, and the watch on the other processes (PeerWatch). Then only rank 0 prints."""
    launch = launch_environment()
    os.environ.update(launch)  # torch's env:// initialisation and our error lines read them
    args.rank, args.world_size = int(launch['RANK']), int(launch['WORLD_SIZE'])
    args.local_rank = int(launch.get('LOCAL_RANK', 0))
    args.distributed = args.world_size > 1
    requested = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if requested == 'cuda':
        if not torch.cuda.is_available():
            raise UsageError('--device cuda was asked for but CUDA is not available; use --device cpu')
        index = cuda_device_index(args.local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        args.device = torch.device('cuda', index)
    else:
        args.device = torch.device('cpu')
    backend = getattr(args, 'dist_backend', None) or ('nccl' if args.device.type == 'cuda' else 'gloo')
    if backend == 'nccl' and args.device.type != 'cuda':
        raise UsageError('--dist-backend nccl needs CUDA tensors: use --device cuda, or gloo on the CPU')
    args.dist_backend = backend
    if args.distributed:
        dist.init_process_group(
            backend=backend,
            init_method='env://',
            world_size=args.world_size,
            rank=args.rank,
            timeout=datetime.timedelta(minutes=args.dist_timeout),
            device_id=args.device if backend == 'nccl' else None,
        )
        watch_peers(args.rank, args.world_size)
        silence_unless_main()
        if (
            int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', 0))
            and os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'
        ):
            print(
                'warning: with torchrun --max-restarts, also set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: restarted '
                "workers can otherwise read the killed workers' addresses from torchrun's store and hang "
                '(pytorch/pytorch#135712)'
            )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def backend() -> Optional[str]:
    """The process group's backend ('nccl', 'gloo'), None with one process."""
    return dist.get_backend() if is_distributed() else None


def cleanup_distributed():
    """Count this process out of the watch on the others (see PeerWatch) and destroy the process group if one was
    initialised."""
    global _peer_watch
    watch, _peer_watch = _peer_watch, None
    if watch is not None:
        watch.leave()
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
    """Sum numbers over all processes (identity with one process): a list of numbers, or a tensor, which is read
    on the host once, after the sum (a device tensor: one host synchronisation)."""
    if not isinstance(values, torch.Tensor):
        if get_world_size() == 1:
            return list(values)
        values = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    elif get_world_size() > 1:
        values = values.to(_collective_device())
    if get_world_size() > 1:
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


# ----------------------------------------------------------------------------------------------------
# When one process fails alone
# ----------------------------------------------------------------------------------------------------


class PeerWatch:
    """Ends this process within seconds of another one failing alone (an unreadable image, out of memory, a full
    disk on rank 0), with that process's exit code; rank 0 reports its line. Without it the others would wait in
    a collective: NCCL does not notice a dead or silent peer on the same node, and they would hang for
    --dist-timeout, then abort.

    The processes tell each other through the launcher's rendezvous store (torchrun's agent; rank 0 under srun),
    on a connection of their own: a failing process posts (rank, exit code, line) there, and a thread here polls
    it every `poll_seconds`. Losing the store (its host died) ends this process too. At the end every process
    counts itself out, and rank 0, which holds the store under srun, waits (at most `leave_seconds`) until all
    have, so that none loses the store while it still reads it."""

    FAILURE, LEFT = 'failure', 'left'

    def __init__(
        self,
        rank: int,
        world_size: int,
        address: str,
        port: int,
        prefix: str,
        poll_seconds: float = 1.0,
        leave_seconds: float = 10.0,
    ):
        self.rank, self.world_size = rank, world_size
        self.poll_seconds, self.leave_seconds = poll_seconds, leave_seconds
        client = dist.TCPStore(address, port, is_master=False, timeout=datetime.timedelta(seconds=30))
        self.store = dist.PrefixStore(prefix, client)
        self.ending = threading.RLock()  # taken by whichever ends this process: the main thread or the watch
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name='peer-watch', daemon=True)
        self.thread.start()

    def posted(self) -> Optional[Tuple[int, int, str]]:
        """(rank, exit code, line) of the first process that failed alone, or None."""
        if not self.store.check([self.FAILURE]):
            return None
        rank, code, line = self.store.get(self.FAILURE).decode().split('\n', 2)
        return int(rank), int(code), line

    def _watch(self):
        while not self.stopped.wait(self.poll_seconds):
            try:
                failure = self.posted()
            except RuntimeError:  # the store's host is gone (DistNetworkError)
                if self.stopped.is_set():
                    return
                failure = (
                    None,
                    EXIT_FAILURE,
                    'error: lost contact with the other processes (the rendezvous store, '
                    'on rank 0 or the launcher, is gone: see their output)',
                )
            if failure is None or failure[0] == self.rank:
                continue
            if not self.ending.acquire(blocking=False):
                return  # the main thread is ending this process itself
            rank, code, line = failure
            if rank is None and self.rank == 1 or rank is not None and self.rank == 0:
                label, _, text = line.partition(': ')
                report_line(f'{label}: rank {rank}: {text}' if rank is not None else line)
            self._leave()
            os._exit(code)

    def _leave(self):
        try:
            left = self.store.add(self.LEFT, 1)
            deadline = time.monotonic() + self.leave_seconds
            while self.rank == 0 and left < self.world_size and time.monotonic() < deadline:
                time.sleep(0.05)
                left = self.store.add(self.LEFT, 0)
        except RuntimeError:
            pass  # the store is gone: nobody is left to read it

    def end(self, failure: Optional[Tuple[int, str]] = None):
        """The main thread ends this process (then `leave`s); `failure` (exit code, line) when it failed alone: the
        other processes end with it (the first failure posted is the one they report)."""
        self.ending.acquire()  # if the watch holds it, it is ending the process: this waits for the exit
        self.stopped.set()
        if failure is not None:
            try:
                self.store.compare_set(self.FAILURE, '', f'{self.rank}\n{failure[0]}\n{failure[1]}')
            except RuntimeError:
                pass

    def leave(self):
        """Count this process out (rank 0 waits for the others: see the class)."""
        self.end()
        self._leave()


_peer_watch: Optional[PeerWatch] = None


def watch_peers(rank: int, world_size: int):
    """Start the PeerWatch of this process (under torchrun or srun: MASTER_ADDR and MASTER_PORT name the store)."""
    global _peer_watch
    if 'MASTER_ADDR' in os.environ and 'MASTER_PORT' in os.environ:
        attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')  # torchrun's store outlives a restart
        _peer_watch = PeerWatch(
            rank, world_size, os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), f'ravlt/peers/{attempt}'
        )


def peer_failure() -> Optional[Tuple[int, int, str]]:
    """(rank, exit code, line) of another process that failed alone, or None."""
    if _peer_watch is None:
        return None
    try:
        failure = _peer_watch.posted()
    except RuntimeError:
        return None
    return failure if failure is not None and failure[0] != get_rank() else None


def end_process(failure: Optional[Tuple[int, str]] = None):
    """This process ends (cli.run_cli calls it before it reports anything); `failure` (exit code, line) when it
    failed alone, so that the others end too. cleanup_distributed then counts it out."""
    if _peer_watch is not None:
        _peer_watch.end(failure)
