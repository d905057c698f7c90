"""Small helpers of the run and the loops: files replaced atomically, autocast precision, the data-loading
wrappers that make every random draw a function of (seed, epoch, rank, position), and metric logging."""
import contextlib
import datetime
import errno
import glob
import os
import random
import tempfile
import time
from collections import defaultdict, deque
from typing import List, Optional

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_file(path, mode: str = 'wb'):
    """Open a temporary file beside `path` for writing; when the block ends, fsync it and rename it over
    `path`, so `path` always holds a whole file (the old one until the new one is complete). On an error the
    temporary file is removed; a full disk raises OSError(ENOSPC) naming `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates the file private (0600)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # torch.save reports a failed write as a RuntimeError ("unexpected pos ..."): say what it was.
        if isinstance(e, (RuntimeError, OSError)) and _disk_is_full(directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from None
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def _disk_is_full(directory: str) -> bool:
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize < 64 * 2 ** 20


def remove_stale_temporaries(folder) -> List[str]:
    """Delete the temporary files (see atomic_file) that killed writes left in `folder` (call only while no
    other process writes there: a run holds its output folder's lock). Returns their names."""
    stale = sorted(glob.glob(os.path.join(glob.escape(os.fspath(folder)), '.*.tmp')))
    for path in stale:
        os.remove(path)
    return [os.path.basename(p) for p in stale]


# ----------------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------------

AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}  # --amp


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """torch.amp.autocast for `device`; nothing when `amp_dtype` is None (full precision)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type=device.type, dtype=amp_dtype)


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
    """Wraps a sampler: yields (index, keys) pairs, the keys (seed, epoch, rank, position in the epoch) from which
    SeededDataset derives the sample's seed (in the data-loading worker: nothing per sample in the training
    process). `skip(n)` starts the current epoch at position n (a mid-epoch resume)."""

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
                yield index, (self.seed, self.epoch, self.rank, position)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.start, 0)


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset to take (index, keys) pairs (SeededSampler's): the global generators are seeded from the
    keys before each sample's transform, so its augmentation depends neither on the worker that loads it nor on
    what that worker loaded before (workers kept across epochs included). A sample that fails to load becomes a
    LoadError naming its file."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, keys = item
        seed_everything(derive_seed(*keys))
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
        """Yield from `iterable`, printing after every `print_freq`-th step (and the last) the step, ETA, the
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
            if (i + 1) % print_freq == 0 or i == total - 1:
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
    """Names of the floating-point weights and buffers that hold a NaN or an infinity (one read on the host)."""
    named = [(name, t) for module in modules for name, t in module.state_dict().items() if t.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all().to(named[0][1].device) for _, t in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]
