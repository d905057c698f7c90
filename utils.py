"""Helpers of the run and the loops: process-group queries and collectives, seeding, the data-loading
wrappers that make every random draw a function of (seed, epoch, rank, position), and metric logging."""
import builtins
import datetime
import random
import time
import warnings
from collections import defaultdict, deque
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------------

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


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are (the CPU for a module without any)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device('cpu')


# ----------------------------------------------------------------------------------------------------
# Seeding: every generator is seeded from (seed, epoch, rank, position), so no generator state is ever
# saved and a resumed run, at an epoch boundary or mid-epoch, with any number of data-loading workers,
# draws exactly the numbers an uninterrupted one draws.
# ----------------------------------------------------------------------------------------------------

def derive_seed(*keys: int) -> int:
    """A 32-bit seed that is a function of the integer keys alone."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_everything(seed: int):
    """Seed python's, numpy's and torch's global generators (torch's on every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class LoadError:
    """What a sample that could not be loaded becomes in a batch: the message, naming the file."""

    def __init__(self, message: str):
        self.message = message


def describe_sample(dataset, index: int) -> str:
    """The file behind a sample, for error messages: `dataset.sample_path(index)` through Subsets."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    describe = getattr(dataset, 'sample_path', None)
    return describe(index) if describe is not None else f'sample {index} of {type(dataset).__name__}'


class SeededSampler(torch.utils.data.Sampler):
    """Wraps a sampler: yields (index, seed) pairs, the seed a function of (seed, epoch, rank, position in
    the epoch). `skip(n)` starts the current epoch at position n (a mid-epoch resume)."""

    def __init__(self, sampler, seed: int, rank: int):
        self.sampler, self.seed, self.rank = sampler, seed, rank
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int):
        self.epoch, self.start = epoch, 0
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def skip(self, positions: int):
        self.start = positions

    def __iter__(self):
        for position, index in enumerate(self.sampler):
            if position >= self.start:
                yield index, derive_seed(self.seed, self.epoch, self.rank, position)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.start, 0)


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset to take (index, seed) pairs: the global generators are seeded before each sample's
    transform, so its augmentation depends neither on the worker that loads it nor on what that worker
    loaded before. A sample that fails to load becomes a LoadError naming its file."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        seed_everything(seed)
        try:
            return self.dataset[index]
        except Exception as e:  # any failure of a sample: reported with its file, in one line
            detail = ' '.join(str(e).split()) or type(e).__name__
            return LoadError(f'{describe_sample(self.dataset, index)}: {detail}')


def collate_or_error(collate_fn):
    """A collate function that passes a batch's first LoadError on instead of collating."""
    def collate(batch):
        error = next((s for s in batch if isinstance(s, LoadError)), None)
        return error if error is not None else collate_fn(batch)
    return collate


# ----------------------------------------------------------------------------------------------------
# Metric logging
# ----------------------------------------------------------------------------------------------------

class SmoothedValue:
    """A series of values: the median and mean over a recent window and the global average."""

    def __init__(self, window_size: int = 20, fmt: str = '{median:.4f} ({global_avg:.4f})'):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self) -> float:
        return float(np.median(self.deque)) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return float(np.mean(self.deque)) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """Named SmoothedValues and a loop wrapper (`log_every`) that prints them with progress and ETA."""

    def __init__(self, delimiter: str = '  '):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[name].update(float(value))

    def add_meter(self, name: str, meter: SmoothedValue):
        self.meters[name] = meter

    def totals(self) -> dict:
        """{name: [total, count]}: what `restore` needs to continue the global averages (a mid-epoch resume)."""
        return {name: [meter.total, meter.count] for name, meter in self.meters.items()}

    def restore(self, totals: dict):
        for name, (total, count) in totals.items():
            self.meters[name].total, self.meters[name].count = total, int(count)

    def averages(self) -> dict:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def __str__(self) -> str:
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def log_every(self, iterable, print_freq: int, header: str = '', start: int = 0, total: Optional[int] = None):
        """Yield from `iterable`, printing every `print_freq` steps (and at the last) the step, ETA, the
        meters, the time per step and the data-loading time. `start`: the first step's number (a resumed
        epoch); `total`: the steps of a whole epoch."""
        total = total if total is not None else start + len(iterable)
        width = len(str(total))
        step_time = SmoothedValue(fmt='{avg:.4f}')
        data_time = SmoothedValue(fmt='{avg:.4f}')
        begin = end = time.time()
        for i, obj in enumerate(iterable, start=start):
            data_time.update(time.time() - end)
            yield obj
            step_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(step_time.global_avg * (total - i - 1)))
                parts = [f'{header} [{i:>{width}}/{total}]', f'eta: {eta}', str(self),
                         f'time: {step_time}', f'data: {data_time}']
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    parts.append(f'max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}MB')
                print(self.delimiter.join(p for p in parts if p), flush=True)
            end = time.time()
        steps = max(step_time.count, 1)
        elapsed = datetime.timedelta(seconds=int(time.time() - begin))
        print(f'{header} Total time: {elapsed} ({(time.time() - begin) / steps:.4f} s / it)', flush=True)


def non_finite_tensors(*modules: torch.nn.Module) -> List[str]:
    """Names of the floating-point weights and buffers that hold a NaN or an infinity."""
    return [name for module in modules for name, t in module.state_dict().items()
            if t.is_floating_point() and not torch.isfinite(t).all()]
