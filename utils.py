"""Small helpers of the run and the loops: files replaced atomically, autocast precision, the data-loading
wrappers that make every random draw a function of (seed, epoch, rank, position), and metric logging."""

import contextlib
import datetime
import errno
import glob
import os
import random
import signal
import stat
import tempfile
import threading
import time
from collections import defaultdict, deque
from typing import List, Optional

import numpy as np
import torch

from errors import UsageError, is_out_of_memory

# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def output_kind(path) -> str:
    """How atomic_file writes `path`: 'replace' (a regular file, or none yet: a temporary file renamed over it)
    or 'stream' (a character device or a FIFO, such as /dev/null, a terminal or a pipe: written in place, never
    replaced). A folder, a block device or a socket is refused with a one-line UsageError: replacing one would
    destroy it, and writing into a disk device destroys what it holds."""
    try:
        mode = os.stat(path).st_mode  # through symbolic links: what a link points to is what gets written
    except FileNotFoundError:
        return 'replace'
    except OSError as e:
        raise UsageError(f'cannot write {path} ({e.strerror.lower()})') from None
    if stat.S_ISREG(mode):
        return 'replace'
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return 'stream'
    if stat.S_ISDIR(mode):
        raise UsageError(f'cannot write {path}: it is a folder; give a file name')
    kind = 'a block device' if stat.S_ISBLK(mode) else 'a socket' if stat.S_ISSOCK(mode) else 'not a file'
    raise UsageError(
        f'refusing to write {path}: it is {kind} (outputs go to regular files, or to character '
        'devices and FIFOs such as /dev/null or a pipe)'
    )


def check_output_file(path, flag: str):
    """Refuse, before any work, an output file that atomic_file could not write: a folder, a block device, a
    socket, or a file whose folder is missing or not writable (one-line UsageErrors naming `flag`)."""
    try:
        if output_kind(path) == 'stream':
            return
    except UsageError as e:
        raise UsageError(f'{flag}: {e}') from None
    folder = os.path.dirname(os.path.realpath(path))
    if not os.path.isdir(folder):
        raise UsageError(f'{flag} {path}: the folder {folder} does not exist')
    if not os.access(folder, os.W_OK):
        raise UsageError(f'{flag} {path}: the folder {folder} is not writable')


@contextlib.contextmanager
def atomic_file(path, mode: str = 'wb'):
    """Open `path` for writing such that it always holds a whole file: a temporary file beside it, fsynced and
    renamed over it when the block ends (the old file stays until the new one is complete; a symbolic link is
    followed, so the file it points to is replaced). On an error the temporary file is removed; a full disk
    raises OSError(ENOSPC) naming `path`. A character device or a FIFO is written in place, a folder, block
    device or socket refused (see output_kind). Ctrl-C during the write lets it finish first (a second Ctrl-C
    stops it at once, the temporary file removed), then raises KeyboardInterrupt."""
    path = os.fspath(path)
    kind = output_kind(path)
    with _ctrl_c_deferred():
        if kind == 'stream':
            with _open_stream(path, mode) as f:
                yield f
        else:
            with _replacing(os.path.realpath(path), path, mode) as f:
                yield f


@contextlib.contextmanager
def _open_stream(path: str, mode: str):
    flags = os.O_WRONLY | os.O_NONBLOCK  # a FIFO nobody reads: ENXIO at once instead of waiting forever
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise UsageError(f'cannot write {path}: it is a FIFO that no process reads') from None
        raise
    os.set_blocking(fd, True)
    with os.fdopen(fd, mode) as f:
        yield f


@contextlib.contextmanager
def _replacing(target: str, named: str, mode: str):
    directory = os.path.dirname(target)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(target)}.', suffix='.tmp')
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates the file private (0600)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # torch.save reports a failed write as a RuntimeError ("unexpected pos ..."): say what it was.
        if isinstance(e, (RuntimeError, OSError)) and _disk_is_full(directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), named) from None
        raise
    sync_folder(directory)  # the rename itself survives a crash


def sync_folder(directory: str):
    """fsync a folder: the renames and links made in it survive a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _ctrl_c_deferred():
    """Ctrl-C (SIGINT) while a file is written: noted, and raised as KeyboardInterrupt once the write is done, so
    that torch.save is never cut off inside its C++ writer (which turns the interrupt into "unexpected pos" or
    aborts). A second Ctrl-C interrupts at once; whatever the write then raises becomes KeyboardInterrupt.
    Only where Python's own SIGINT handler is installed, in the main thread."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    pressed = []

    def note(signum, frame):
        pressed.append(signum)
        if len(pressed) > 1:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    try:
        yield
    except BaseException:
        if pressed:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt


def _disk_is_full(directory: str) -> bool:
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize < 64 * 2**20


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
    """What a sample that could not be loaded becomes in a batch: the message, naming the file;
    `out_of_memory`: the failure was memory running out while loading it, not the file."""

    def __init__(self, message: str, out_of_memory: bool = False):
        self.message = message
        self.out_of_memory = out_of_memory


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
            return LoadError(f'{describe_sample(self.dataset, index)}: {detail}', is_out_of_memory(e))


def collate_or_error(collate_fn):
    """A collate function that passes a batch's first LoadError on instead of collating."""

    def collate(batch):
        error = next((s for s in batch if isinstance(s, LoadError)), None)
        return error if error is not None else collate_fn(batch)

    return collate


# ----------------------------------------------------------------------------------------------------
# Metric logging
# ----------------------------------------------------------------------------------------------------


def format_metrics(stats: dict) -> str:
    """'acc1 99.722, acc5 100.000, loss 0.034'; a metric that does not apply is null, as in the JSON files."""
    return ', '.join(
        f'{k} {v:.3f}' if isinstance(v, float) else f'{k} {"null" if v is None else v}' for k, v in stats.items()
    )


class DataWait:
    """When the main process began waiting for the batch it waits for now (time.monotonic()), or None while it
    does anything else: how a stop signal tells a run stuck on its data from a busy one (trainer.StopSignals)."""

    since: Optional[float] = None


def _watched(iterable):
    """Yield from `iterable`, recording in DataWait.since each wait for the next item."""
    DataWait.since = time.monotonic()
    try:
        iterator = iter(iterable)
        while True:
            DataWait.since = time.monotonic()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                DataWait.since = None
            yield item
    finally:
        DataWait.since = None


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
        return self.fmt.format(
            median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max, value=self.value
        )


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
        for i, obj in enumerate(_watched(iterable), start=start):
            data_time.update(time.time() - end)
            yield obj
            step_time.update(time.time() - end)
            if (i + 1) % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(step_time.global_avg * (total - i - 1)))
                parts = [
                    f'{header} [{i:>{width}}/{total}]',
                    f'eta: {eta}',
                    str(self),
                    f'time: {step_time}',
                    f'data: {data_time}',
                ]
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    parts.append(f'max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB')
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
