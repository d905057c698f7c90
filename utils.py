"""Helpers shared by the training and evaluation entry points: distributed setup, metric logging,
atomic checkpoints, safe checkpoint loading, RNG state, and the command-line error policy
(bad input ends in one line on stderr and a non-zero exit, never a traceback)."""
import argparse
import builtins
import datetime
import functools
import json
import os
import pickle
import random
import re
import sys
import tempfile
import time
import warnings
from collections import defaultdict, deque
from typing import Optional

import numpy as np
import timm
import torch
import torch.distributed as dist

import models


class UsageError(Exception):
    """Bad input (flags, files, checkpoints): `run_cli` prints the message as one line and exits with 2."""


def run_cli(main_fn, args):
    """Run `main_fn(args)` as a command: a UsageError becomes one line on stderr and exit code 2, a
    non-finite loss (FloatingPointError) or running out of memory one line and exit code 1; no traceback.
    The process group is destroyed in every case."""
    code = 0
    try:
        main_fn(args)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        code = 2
    except FloatingPointError as e:
        print(f'error: {e}', file=sys.stderr)
        code = 1
    except torch.OutOfMemoryError:
        print('error: out of memory; lower --batch-size (or use --amp bf16/fp16)', file=sys.stderr)
        code = 1
    finally:
        cleanup_distributed()
    if code:
        sys.exit(code)


# ----------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------

def init_distributed_mode(args):
    """Set up the device and, under torchrun (WORLD_SIZE > 1), the process group.

    Sets `args.distributed`, `args.rank`, `args.world_size`, `args.local_rank` and `args.device` (a
    torch.device built from `args.device`: 'cpu', 'cuda' or None for CUDA when available). The backend
    is NCCL on CUDA and gloo on the CPU. Afterwards only rank 0 prints.
    """
    args.rank = int(os.environ.get('RANK', 0))
    args.world_size = int(os.environ.get('WORLD_SIZE', 1))
    args.local_rank = int(os.environ.get('LOCAL_RANK', 0))
    args.distributed = args.world_size > 1
    requested = getattr(args, 'device', None) or ('cuda' if torch.cuda.is_available() else 'cpu')
    requested = torch.device(requested).type
    if requested == 'cuda':
        if not torch.cuda.is_available():
            raise UsageError('--device cuda was asked for but CUDA is not available; use --device cpu')
        torch.cuda.set_device(args.local_rank)
        args.device = torch.device('cuda', args.local_rank)
    elif requested == 'cpu':
        args.device = torch.device('cpu')
    else:
        raise UsageError(f'unsupported --device {requested!r}; choose cpu or cuda')
    if args.distributed:
        backend = 'nccl' if args.device.type == 'cuda' else 'gloo'
        dist.init_process_group(backend=backend, init_method='env://', world_size=args.world_size,
                                rank=args.rank, device_id=args.device if backend == 'nccl' else None)
        _silence_unless_main(args.rank == 0)
        restarts = int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', 0))
        if restarts and os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
            print('warning: with torchrun --max-restarts, also set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: restarted '
                  "workers can otherwise read the killed workers' addresses from torchrun's store and hang "
                  '(pytorch/pytorch#135712)')


def _silence_unless_main(is_main: bool):
    if is_main:
        return
    builtins.print = lambda *a, **k: None
    warnings.filterwarnings('ignore')


def cleanup_distributed():
    """Destroy the process group if one was initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def _reduce_device() -> torch.device:
    """Where collective tensors must live: NCCL needs CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def all_reduce_sum(values) -> list:
    """Sum a list of numbers over all processes (identity when not distributed)."""
    if get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(*modules: torch.nn.Module):
    """Give every process rank 0's buffers (BatchNorm statistics). Without SyncBatchNorm (not available
    on the CPU) each process ends an epoch with the statistics of its own last batch."""
    if get_world_size() == 1:
        return
    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


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

    def synchronize_between_processes(self):
        """Make the global average cover all processes (the window stays local)."""
        self.count, self.total = all_reduce_sum([self.count, self.total])
        self.count = int(self.count)

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

    def __getattr__(self, name: str):
        meters = self.__dict__.get('meters', {})
        if name in meters:
            return meters[name]
        raise AttributeError(f"'MetricLogger' has no attribute {name!r}")

    def __str__(self) -> str:
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable, print_freq: int, header: str = ''):
        """Yield from `iterable`, printing every `print_freq` steps (and at the last) the step, ETA,
        the meters, the time per step and the data-loading time."""
        total = len(iterable)
        width = len(str(total))
        step_time = SmoothedValue(fmt='{avg:.4f}')
        data_time = SmoothedValue(fmt='{avg:.4f}')
        start = end = time.time()
        for i, obj in enumerate(iterable):
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
        elapsed = datetime.timedelta(seconds=int(time.time() - start))
        print(f'{header} Total time: {elapsed} ({(time.time() - start) / max(total, 1):.4f} s / it)', flush=True)


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------

def save_checkpoint(obj, path):
    """torch.save `obj` to `path` on the main process only, atomically: a temporary file in the same
    directory is written and fsynced, then renamed over `path`, so `path` is always whole."""
    if not is_main_process():
        return
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates the file private (0600)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, map_location='cpu') -> dict:
    """Load a checkpoint dict with `torch.load(weights_only=True)`: tensors, containers, numbers and
    `argparse.Namespace` (the authors' `args`) only; no pickled code ever runs. A missing, empty,
    unreadable or code-carrying file raises UsageError with one line saying so."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f'checkpoint {path} does not exist')
    if os.path.isdir(path):
        raise UsageError(f'checkpoint {path} is a directory; give the .pth file')
    if os.path.getsize(path) == 0:
        raise UsageError(f'checkpoint {path} is empty (0 bytes); was its download or copy interrupted?')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # e.g. "Detected pickle protocol 4" on a file that is no checkpoint
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r'GLOBAL ([\w.]+)', str(e))
        if found:
            raise UsageError(f'checkpoint {path} needs code execution to unpickle (it references {found.group(1)}); '
                             'refusing to load it: save plain state dicts (tensors, numbers, strings)') from None
        raise UsageError(f'{path} is not a PyTorch checkpoint (unreadable by torch.load)') from None
    except Exception as e:  # torch.load raises many types for files that are no checkpoints
        detail = _first_line(e) if isinstance(e, RuntimeError) else 'unreadable by torch.load'
        raise UsageError(f'{path} is not a PyTorch checkpoint ({detail})') from None
    if not isinstance(checkpoint, dict):
        raise UsageError(f'{path} is not a checkpoint: it holds a {type(checkpoint).__name__}, not a dict of '
                         'state dicts')
    return checkpoint


def _first_line(error: Exception) -> str:
    """The first sentence of an error message, for one-line reports."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ''
    return f'{type(error).__name__}: {text.split(". ")[0]}' if text else type(error).__name__


def find_resume_checkpoint(output_dir) -> Optional[str]:
    """The checkpoint to resume from automatically: `output_dir/checkpoint.pth` if it exists."""
    if not output_dir:
        return None
    path = os.path.join(output_dir, 'checkpoint.pth')
    return path if os.path.isfile(path) else None


def append_log(output_dir, stats: dict):
    """Append `stats` as one JSON line to `output_dir/log.txt` (main process only)."""
    if not output_dir or not is_main_process():
        return
    with open(os.path.join(output_dir, 'log.txt'), 'a') as f:
        f.write(json.dumps(stats) + '\n')


def capture_rng_state() -> dict:
    """The python, numpy, torch and CUDA generator states, in a form `torch.load(weights_only=True)` reads."""
    np_state = np.random.get_state(legacy=False)
    state = {
        'python': random.getstate(),
        'numpy': {'key': torch.from_numpy(np_state['state']['key'].astype(np.int64)),
                  'pos': int(np_state['state']['pos']),
                  'has_gauss': int(np_state['has_gauss']), 'gauss': float(np_state['gauss'])},
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict):
    """Restore what `capture_rng_state` returned."""
    python = state['python']
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state['numpy']
    np.random.set_state({'bit_generator': 'MT19937',
                         'state': {'key': numpy['key'].numpy().astype(np.uint32), 'pos': numpy['pos']},
                         'has_gauss': numpy['has_gauss'], 'gauss': numpy['gauss']})
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# ----------------------------------------------------------------------------------------------------
# Model weights
# ----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _variant_shapes() -> dict:
    """{'RAVLT_T': {key: shape}, ...} for the four published variants (built once, on demand, on 'meta')."""
    shapes = {}
    for name in models.RAVLT_CONFIGS:
        with torch.device('meta'):  # shapes only: no memory, no initialisation
            model = timm.create_model(name)
        shapes[name.upper()] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes


def classifier_keys(model: torch.nn.Module) -> set:
    """State-dict keys of the classifier (timm's pretrained_cfg['classifier'], 'head' by default)."""
    classifier = getattr(model, 'pretrained_cfg', {}).get('classifier', 'head')
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return {f'{n}.weight' for n in names} | {f'{n}.bias' for n in names}


def ravlt_variant_of(state_dict: dict, ignore: set = frozenset()) -> Optional[str]:
    """The published variant ('RAVLT_T' ...) whose state dict has exactly these keys and shapes
    (keys in `ignore`, e.g. the classifier, aside), or None."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if k not in ignore and hasattr(v, 'shape')}
    for variant, reference in _variant_shapes().items():
        if {k: v for k, v in reference.items() if k not in ignore} == shapes:
            return variant
    return None


def weights_mismatch_message(model: torch.nn.Module, state_dict: dict, problem: str) -> str:
    """One line: what does not fit, which published variant the weights fit, and what to do."""
    variant = ravlt_variant_of(state_dict, ignore=classifier_keys(model))
    built = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
    if variant is not None and variant.lower() != built:
        return f'the weights are {variant} weights but the model is {built} ({problem}); pass --model {variant}'
    if variant is not None:
        return (f'the weights are {variant} weights with its default shape, but --model-kwargs changed the '
                f'model ({problem}); drop --model-kwargs')
    return (f'the weights do not fit {built} ({problem}) nor any of {", ".join(_variant_shapes())}; '
            'check --model and --model-kwargs')


def load_model_weights(model: torch.nn.Module, checkpoint: dict, prefer_ema: bool = False):
    """Load weights into `model` from a training checkpoint (`model`, `model_ema`, `state_dict`) or a raw
    state dict, with or without DDP's `module.` prefix; `prefer_ema` takes `model_ema` when present.

    Returns (missing_keys, unexpected_keys). Tensors whose shapes differ raise UsageError naming the
    published variant the weights fit (or the class count when only the classifier differs).
    """
    if prefer_ema and isinstance(checkpoint.get('model_ema'), dict):
        checkpoint = checkpoint['model_ema']
    state_dict = models.checkpoint_filter_fn(checkpoint, model)
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items()
                  if k in own and hasattr(v, 'shape') and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        classifier = classifier_keys(model)
        if set(mismatched) <= classifier:
            key = sorted(mismatched)[0]
            raise UsageError(f'the checkpoint classifier has {state_dict[key].shape[0]} classes, the model '
                             f'{own[key].shape[0]}: use --finetune to start from these weights with a new head')
        key = mismatched[0]
        problem = (f'{len(mismatched)} tensors differ in shape, e.g. {key}: '
                   f'{tuple(state_dict[key].shape)} vs {tuple(own[key].shape)}')
        raise UsageError(weights_mismatch_message(model, state_dict, problem))
    result = model.load_state_dict(state_dict, strict=False)
    return result.missing_keys, result.unexpected_keys
