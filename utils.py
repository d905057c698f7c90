"""Small helpers of the run and the loops: files replaced atomically, precision, seeding, data loaders whose every
random draw is a function of (seed, epoch, rank, position), and metric logging."""

import atexit
import contextlib
import ctypes
import datetime
import errno
import glob
import multiprocessing
import os
import random
import signal
import tempfile
import time
from collections import defaultdict, deque
from typing import List, Optional

import numpy as np
import torch

from errors import UsageError

# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def check_output_file(path, flag: str, suffixes=()):
    """Refuse, before any work, an output file that is not a regular file (a folder, /dev/null: a rename would
    replace it), whose folder is missing, or whose name lacks the expected suffix (a figure written over
    checkpoint.pth)."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        raise UsageError(f'{flag} {path} exists and is not a regular file: give a file name')
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UsageError(f'{flag} {path}: its folder does not exist')
    if suffixes and not path.endswith(tuple(suffixes)):
        raise UsageError(f'{flag} {path}: expected a file name ending in {" or ".join(suffixes)}')


@contextlib.contextmanager
def atomic_file(path, mode: str = 'wb'):
    """Open `path` for writing such that it always holds a whole file: a temporary file beside it, fsynced and
    renamed over it when the block ends. A symbolic link is followed; only a regular file is replaced."""
    target = os.path.realpath(path)
    if os.path.exists(target) and not os.path.isfile(target):
        raise UsageError(f'refusing to replace {path}: it is not a regular file')
    directory = os.path.dirname(target)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(target)}.', suffix='.tmp')
    except OSError as e:  # named by the file, never by its temporary one (a folder removed, not writable)
        raise OSError(e.errno, e.strerror, os.fspath(path)) from None
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        os.remove(tmp)
        # torch.save reports a failed write as a RuntimeError: say what it was when the disk is full.
        if isinstance(e, (RuntimeError, OSError)) and _disk_is_full(directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path)) from None
        if isinstance(e, OSError) and e.errno is not None:  # a rename refused (EPERM) ...: the file, not its temporary
            raise OSError(e.errno, e.strerror, os.fspath(path)) from None
        raise
    sync_folder(directory)  # the rename itself survives a crash


def _disk_is_full(directory: str) -> bool:
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize < 64 * 2**20


def sync_folder(directory: str):
    """fsync a folder: the renames and links made in it survive a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(folder) -> List[str]:
    """Delete the temporary files that killed writes left in `folder` (only while no other process writes there:
    a run holds its output folder's lock); returns their names."""
    stale = sorted(glob.glob(os.path.join(glob.escape(os.fspath(folder)), '.*.tmp')))
    for path in stale:
        os.remove(path)
    return [os.path.basename(p) for p in stale]


# ----------------------------------------------------------------------------------------------------
# Memory and precision
# ----------------------------------------------------------------------------------------------------


def keep_freed_memory():
    """Keep freed memory in the process (glibc): every large block is otherwise mapped on its own and handed back
    when freed, so each eager step faults in and zeroes its temporaries again (about 200,000 minor page faults per
    RAVLT-S eval step at batch 16, 224²; a few thousand with this: docs/performance.md). Leaves the user's own
    allocator settings alone, and RAVLT_KEEP_HEAP=0 turns it off."""
    own = any(k.startswith('MALLOC_') for k in os.environ) or 'malloc' in os.environ.get('LD_PRELOAD', '')
    if own or os.environ.get('RAVLT_KEEP_HEAP', '1') == '0':
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no block mapped on its own
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD (a C int): the top of the heap is kept


AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}  # --amp


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """torch.amp.autocast for `device`; nothing when `amp_dtype` is None (full precision)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type=device.type, dtype=amp_dtype)


def module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


def non_finite_tensors(*modules: torch.nn.Module) -> List[str]:
    """Names of the floating-point weights and buffers holding a NaN or an infinity (one read on the host)."""
    named = [(name, t) for module in modules for name, t in module.state_dict().items() if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all().to(named[0][1].device) for _, t in named]).tolist() if named else []
    return [name for (name, _), ok in zip(named, finite) if not ok]


# ----------------------------------------------------------------------------------------------------
# Seeding: every generator is seeded from (seed, epoch, rank, position), so no generator state is saved and a
# run resumed at an epoch boundary or mid-epoch, with any number of data-loading workers, draws exactly the
# numbers an uninterrupted one draws.
# ----------------------------------------------------------------------------------------------------


def derive_seed(*keys: int) -> int:
    """A 32-bit seed that is a function of the integer keys alone."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SeededSampler(torch.utils.data.Sampler):
    """Wraps a sampler: yields (index, (seed, epoch, rank, position)), from which SeededDataset seeds the sample's
    transform. `skip(n)` starts the current epoch at position n (a mid-epoch resume)."""

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


class LoadError:
    """A sample that could not be loaded, as it travels in a batch: the message names its file."""

    def __init__(self, message: str):
        self.message = message


class SeededDataset(torch.utils.data.Dataset):
    """Takes SeededSampler's (index, keys): the global generators are seeded from the keys before each sample's
    transform, whichever worker loads it. A sample that fails to load becomes a LoadError naming its file."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, keys = item
        seed_everything(derive_seed(*keys))
        try:
            return self.dataset[index]
        except Exception as e:
            if isinstance(e, MemoryError) or "can't allocate memory" in str(e):
                raise  # the machine's, not the sample's (cli.one_line_errors says so)
            dataset = self.dataset
            while isinstance(dataset, torch.utils.data.Subset):
                dataset, index = dataset.dataset, dataset.indices[index]
            name = dataset.sample_path(index) if hasattr(dataset, 'sample_path') else f'sample {index}'
            name = dataset.samples[index][0] if hasattr(dataset, 'samples') else name
            return LoadError(f'cannot load {name}: {" ".join(str(e).split()) or type(e).__name__}')


def collate_or_error(collate_fn):
    """A collate function that passes a batch's first LoadError on instead of collating."""

    def collate(batch):
        return next((s for s in batch if isinstance(s, LoadError)), None) or collate_fn(batch)

    return collate


def checked(batch):
    """A batch, or the one-line error of the sample in it that could not be loaded."""
    if isinstance(batch, LoadError):
        raise UsageError(batch.message)
    return batch


def _ignore_stop_signals(worker_id: int):
    """Loader workers leave a cluster's stop signal to their process, which saves and then ends them (torch's
    worker handler would die of a SIGTERM that does not come from the parent; SIGUSR1 ends a process)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


@atexit.register  # runs before multiprocessing's own exit handler, registered when torch was imported
def _end_loader_workers():
    """Kill the daemonic children (loader workers) still alive at exit, as when an exception ends the process with a
    traceback that keeps their loader referenced: multiprocessing's exit handler would end them with a SIGTERM,
    which loader workers ignore, and then wait for them forever."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report their end as a failure
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def data_loader(dataset, sampler, batch_size: int, args, collate_fn=None, drop_last: bool = False):
    """A DataLoader whose samples are seeded from (--seed, epoch, rank, position), with --num_workers persistent
    workers (pinned memory on CUDA)."""
    return torch.utils.data.DataLoader(
        SeededDataset(dataset),
        sampler=SeededSampler(sampler, args.seed, args.rank),
        batch_size=batch_size,
        num_workers=args.num_workers,
        drop_last=drop_last,
        persistent_workers=args.num_workers > 0,
        pin_memory=args.pin_mem and args.device.type == 'cuda',
        collate_fn=collate_or_error(collate_fn or torch.utils.data.default_collate),
        worker_init_fn=_ignore_stop_signals,
    )


# ----------------------------------------------------------------------------------------------------
# Metric logging (DeiT's)
# ----------------------------------------------------------------------------------------------------


def format_metrics(stats: dict) -> str:
    """'acc1 99.722, acc5 100.000, loss 0.034'; a metric that does not apply is null, as in the JSON files."""
    return ', '.join(f'{k} {"null" if v is None else f"{v:.3f}"}' for k, v in stats.items())


class SmoothedValue:
    """A series of values: the median over a recent window and the (weighted) global average."""

    def __init__(self, window_size: int = 20, fmt: str = '{median:.4f} ({global_avg:.4f})'):
        self.deque, self.total, self.count, self.fmt = deque(maxlen=window_size), 0.0, 0, fmt

    def update(self, value: float, n: int = 1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    def __str__(self) -> str:
        median = float(np.median(self.deque)) if self.deque else 0.0
        avg = float(np.mean(self.deque)) if self.deque else 0.0
        value = self.deque[-1] if self.deque else 0.0
        return self.fmt.format(median=median, avg=avg, global_avg=self.global_avg, value=value)


class MetricLogger:
    """Named SmoothedValues and a loop wrapper (`log_every`) that prints them with progress and ETA."""

    def __init__(self, delimiter: str = '  '):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, n: int = 1, **values):
        for name, value in values.items():
            self.meters[name].update(float(value), n)

    def totals(self) -> dict:
        """{name: [total, count]}: what `restore` continues from (a mid-epoch resume)."""
        return {name: [meter.total, meter.count] for name, meter in self.meters.items()}

    def restore(self, totals: dict):
        for name, (total, count) in totals.items():
            self.meters[name].total, self.meters[name].count = total, int(count)

    def averages(self) -> dict:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def __str__(self) -> str:
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def log_every(self, iterable, print_freq: int, header: str = '', start: int = 0, total: Optional[int] = None):
        """Yield from `iterable`, printing every `print_freq` steps (and at the last) the step, ETA, the meters and
        the time per step and for data. `start`: the first step's number (a resumed epoch); `total`: the steps of
        a whole epoch."""
        total = start + len(iterable) if total is None else total
        step_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue(fmt='{avg:.4f}')
        begin = end = time.time()
        for i, obj in enumerate(iterable, start=start):
            data_time.update(time.time() - end)
            yield obj
            step_time.update(time.time() - end)
            if (i + 1) % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(step_time.global_avg * (total - i - 1)))
                parts = [f'{header} [{i:>{len(str(total))}}/{total}]', f'eta: {eta}', str(self)]
                parts += [f'time: {step_time}', f'data: {data_time}']
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    parts.append(f'max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB')
                print(self.delimiter.join(p for p in parts if p), flush=True)
            end = time.time()
        elapsed = time.time() - begin
        per_step = elapsed / max(step_time.count, 1)
        print(f'{header} Total time: {datetime.timedelta(seconds=int(elapsed))} ({per_step:.4f} s / it)', flush=True)
