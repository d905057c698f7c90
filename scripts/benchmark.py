"""Throughput and peak memory of RAVLT beside other models, measured side by side in one run.

Each model takes `--warmup` untimed steps, then `--iters` timed steps; the models take turns step by step
(every other round in reverse order), so a busy machine slows them alike. We report the median images/s and
the spread (25th-75th percentile). An eval step is a forward pass under `torch.no_grad()`; a train step is
forward, cross-entropy on random labels and backward (no optimizer step, no fp16 loss scaling). On CUDA every
step is timed between `torch.cuda.synchronize()` calls.

Peak memory (`--memory`), after one untimed step: on CUDA, `torch.cuda.max_memory_allocated()` during one
step above what was allocated before it. On the CPU each model and mode runs in a fresh Python process: it
builds the model and input, runs one step, returns freed memory to the OS (`malloc_trim`), resets the
kernel's peak-RSS counter (`/proc/self/clear_refs`), runs one step and reads `VmHWM` from
`/proc/self/status`: the figure is that peak above the RSS just before the step (weights and input
excluded; everything the step allocates, activations and temporaries, included).

    python scripts/benchmark.py --model RAVLT_T RAVLT_S convnext_tiny --threads 2
    python scripts/benchmark.py --model RAVLT_S --mode eval --input-size 1024 --batch-size 1 --memory --iters 0
    python scripts/benchmark.py --model RAVLT_S --compile --amp bf16 --channels-last --json out.json
    # beside the authors' implementation (their classfication/RALA.py, which needs einops):
    python scripts/benchmark.py --authors-file ~/RALA/classfication/RALA.py --model RAVLT_S authors:RAVLT_S

Our models accept the authors' names (RAVLT_S) and ours (ravlt_s); other names are timm models. With
`--authors-file`, `authors:RAVLT_S` builds the authors' model from that file and copies the weights of our
`ravlt_s` (same seed) into it, so both compute the same function.
"""
import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import timm

import models  # registers the RAVLT models

AUTHORS_PREFIX = 'authors:'


class BenchmarkError(Exception):
    """A problem with the command line or the environment, reported as one line."""


def get_args_parser():
    parser = argparse.ArgumentParser('RAVLT benchmark', add_help=True)
    parser.add_argument('--model', nargs='+', default=['RAVLT_T', 'RAVLT_S', 'convnext_tiny'],
                        help='our names (RAVLT_S, ravlt_s), timm names, or authors:RAVLT_S with --authors-file')
    parser.add_argument('--mode', nargs='+', choices=['eval', 'train'], default=['eval', 'train'])
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--input-size', type=int, nargs='+', default=[224], help='H [W]')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument('--amp', choices=['none', 'bf16', 'fp16'], default='none', help='autocast dtype')
    parser.add_argument('--compile', action='store_true', help='torch.compile every model')
    parser.add_argument('--channels-last', action='store_true', help='channels-last weights and input for every model')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU)')
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps per model and mode')
    parser.add_argument('--iters', type=int, default=10, help='timed steps per model and mode (0: memory only)')
    parser.add_argument('--memory', action='store_true', help='also measure the peak memory of one step')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--authors-file', default=None, help="a local copy of the authors' classfication/RALA.py")
    parser.add_argument('--authors-path-extra', nargs='*', default=[],
                        help="folders to put on sys.path for the authors' file (e.g. where einops is)")
    parser.add_argument('--json', default=None, help='also write the results to this JSON file')
    parser.add_argument('--memory-child', action='store_true', help=argparse.SUPPRESS)
    return parser


def load_authors_module(path: str, extra_paths):
    """Import the authors' RALA.py from a file; any import failure becomes one clear line."""
    if not os.path.isfile(path):
        raise BenchmarkError(f"--authors-file {path!r} does not exist; point it at the authors' classfication/RALA.py")
    sys.path[:0] = [os.path.abspath(p) for p in extra_paths]
    spec = importlib.util.spec_from_file_location('authors_rala', path)
    module = importlib.util.module_from_spec(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # old timm import paths warn
            spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        raise BenchmarkError(f"the authors' file needs the package {e.name!r}: pip install {e.name} "
                             f"(or give its folder with --authors-path-extra)") from None
    except ImportError as e:
        raise BenchmarkError(f"the authors' file does not import with this timm ({e}); edit its import lines to "
                             f"today's paths (e.g. timm.layers instead of timm.models.layers)") from None
    return module


def build_model(name: str, args, authors_module=None) -> torch.nn.Module:
    """Our model, a timm model, or the authors' model carrying our model's weights (same seed)."""
    if name.startswith(AUTHORS_PREFIX):
        variant = name[len(AUTHORS_PREFIX):].upper()
        if authors_module is None:
            raise BenchmarkError(f'{name} needs --authors-file PATH/TO/RALA.py')
        if not hasattr(authors_module, variant) or variant.lower() not in models.RAVLT_CONFIGS:
            raise BenchmarkError(f"the authors' file has no model {variant!r}; use one of "
                                 f"{', '.join(AUTHORS_PREFIX + n.upper() for n in models.RAVLT_CONFIGS)}")
        model = getattr(authors_module, variant)()
        torch.manual_seed(args.seed)
        model.load_state_dict(timm.create_model(variant.lower()).state_dict(), strict=True)
        return model
    torch.manual_seed(args.seed)
    try:
        return timm.create_model(models.resolve_model_name(name))
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise BenchmarkError(f'unknown model {name!r}: use RAVLT_T/S/B/L, a timm model name, '
                                 f'or authors:RAVLT_S with --authors-file') from None
        raise


class Runner:
    """One model in one mode: its input, autocast and step function."""

    def __init__(self, name: str, mode: str, model: torch.nn.Module, args):
        self.name, self.mode = name, mode
        self.device = torch.device(args.device)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        model = model.to(self.device, memory_format=fmt).train(mode == 'train')
        self.model = torch.compile(model) if args.compile else model
        self.module = model  # uncompiled, for its parameters
        size = args.input_size * 2 if len(args.input_size) == 1 else args.input_size
        self.x = torch.randn(args.batch_size, 3, *size, device=self.device).contiguous(memory_format=fmt)
        self.target = torch.randint(0, 1000, (args.batch_size,), device=self.device)
        self.amp = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[args.amp]
        self.batch_size = args.batch_size

    def step(self):
        autocast = (torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None
                    else contextlib.nullcontext())
        if self.mode == 'eval':
            with torch.no_grad(), autocast:
                self.model(self.x)
        else:
            self.module.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(self.model(self.x).float(), self.target)
            loss.backward()

    def sync(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)


def read_status_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise BenchmarkError(f'/proc/self/status has no {field}: CPU peak memory needs Linux')


def release_freed_memory():
    """Hand memory freed by Python and the C allocator back to the OS, so RSS counts only live memory."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL('libc.so.6').malloc_trim(0)  # glibc keeps freed blocks otherwise


def peak_memory_mib(runner: Runner) -> float:
    """Peak memory of one step above what was in use just before it (see the module docstring).

    One untimed step first (compilation, lazy initialisation), then the measured step."""
    first_step(runner)
    if runner.device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(runner.device)
        before = torch.cuda.memory_allocated(runner.device)
        runner.step()
        runner.sync()
        return (torch.cuda.max_memory_allocated(runner.device) - before) / 2 ** 20
    if runner.mode == 'train':
        runner.module.zero_grad(set_to_none=True)  # the gradients are part of the step
    release_freed_memory()
    before = read_status_kib('VmRSS')
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # reset the peak-RSS counter (VmHWM) to the current RSS
    except OSError as e:
        raise BenchmarkError(f'cannot reset the peak-RSS counter ({e}); CPU peak memory needs Linux >= 4.0') from None
    runner.step()
    return (read_status_kib('VmHWM') - before) / 1024


def measure_memory_in_child(name: str, mode: str, argv) -> float:
    """Run this script for one model and mode in a fresh process and return its peak memory (MiB)."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, '--model', name, '--mode', mode, '--memory-child']
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise BenchmarkError(f'memory run of {name} ({mode}) failed: {lines[-1] if lines else result.returncode}')
    return json.loads(result.stdout.strip().splitlines()[-1])['peak_mib']


def child_argv(argv):
    """The parent's arguments minus --model, --mode, --json and --memory (the child gets its own)."""
    out, skip = [], False
    for arg in argv:
        if arg in ('--model', '--mode', '--json'):
            skip = True
            continue
        if arg.startswith('--'):
            skip = False
        if not skip and arg != '--memory':
            out.append(arg)
    return out


def first_step(runner: Runner):
    """One untimed step; a model that rejects the settings (e.g. a fixed input size) is reported in one line."""
    try:
        runner.step()
    except (RuntimeError, AssertionError, ValueError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BenchmarkError(f'{runner.name} ({runner.mode}) failed with these settings: {message}') from None
    runner.sync()


def time_runners(runners, args):
    """Warm up each runner, then time them in turns; returns {runner: [seconds per step]}."""
    for runner in runners:
        first_step(runner)
        for _ in range(args.warmup - 1):
            runner.step()
        runner.sync()
    times = {runner: [] for runner in runners}
    for i in range(args.iters):
        # Every other round in reverse order: a step's speed depends on what ran just before it (the
        # allocator's state, the caches), and alternating shares that effect out evenly.
        for runner in (runners if i % 2 == 0 else runners[::-1]):
            runner.sync()
            start = time.perf_counter()
            runner.step()
            runner.sync()
            times[runner].append(time.perf_counter() - start)
    return times


def summarize(runner: Runner, seconds) -> dict:
    row = {'model': runner.name, 'mode': runner.mode}
    if seconds:
        q1, median, q3 = statistics.quantiles(seconds, n=4, method='inclusive') if len(seconds) > 1 else seconds * 3
        row.update(img_per_s=runner.batch_size / median, img_per_s_p25=runner.batch_size / q3,
                   img_per_s_p75=runner.batch_size / q1, ms_per_step=median * 1e3)
    return row


def format_table(rows, settings: str) -> str:
    lines = [settings, '', '| model | mode | img/s (median) | img/s (p25-p75) | ms/step | peak MiB |',
             '|---|---|---|---|---|---|']
    for r in rows:
        speed = (f"{r['img_per_s']:.1f}", f"{r['img_per_s_p25']:.1f}-{r['img_per_s_p75']:.1f}",
                 f"{r['ms_per_step']:.0f}") if 'img_per_s' in r else ('-', '-', '-')
        peak = f"{r['peak_mib']:.0f}" if 'peak_mib' in r else '-'
        lines.append(f"| {r['model']} | {r['mode']} | {' | '.join(speed)} | {peak} |")
    return '\n'.join(lines)


def main(args, argv):
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise BenchmarkError('--device cuda but CUDA is not available; use --device cpu')
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if len(args.input_size) not in (1, 2) or min(args.input_size) < 1:
        raise BenchmarkError('--input-size takes H or H W (positive)')
    if args.batch_size < 1 or args.warmup < 1 or args.iters < 0:
        raise BenchmarkError('--batch-size and --warmup must be at least 1, --iters at least 0')
    if args.iters == 0 and not (args.memory or args.memory_child):
        raise BenchmarkError('--iters 0 measures nothing without --memory')
    authors = (load_authors_module(args.authors_file, args.authors_path_extra) if args.authors_file
               else None)
    runners = [Runner(name, mode, build_model(name, args, authors), args)
               for name in args.model for mode in args.mode]
    if args.memory_child:
        print(json.dumps({'peak_mib': peak_memory_mib(runners[0])}))
        return []
    times = time_runners(runners, args) if args.iters > 0 else {r: [] for r in runners}
    rows = [summarize(r, times[r]) for r in runners]
    if args.memory:
        for row, runner in zip(rows, runners):
            row['peak_mib'] = (peak_memory_mib(runner) if args.device == 'cuda'
                               else measure_memory_in_child(runner.name, runner.mode, child_argv(argv)))
    settings = (f"device {args.device} ({torch.get_num_threads()} threads), batch {args.batch_size}, input "
                f"{'x'.join(map(str, args.input_size * (3 - len(args.input_size))))}, amp {args.amp}, "
                f"compile {args.compile}, channels-last {args.channels_last}, torch {torch.__version__}, "
                f"{args.warmup} warm-up + {args.iters} timed steps")
    print(format_table(rows, settings))
    if args.json:
        with open(args.json + '.tmp', 'w') as f:
            json.dump({'settings': vars(args), 'torch': torch.__version__, 'threads': torch.get_num_threads(),
                       'results': rows}, f, indent=1)
        os.replace(args.json + '.tmp', args.json)
    return rows


if __name__ == '__main__':
    argv = sys.argv[1:]
    try:
        main(get_args_parser().parse_args(argv), argv)
    except BenchmarkError as e:
        sys.exit(f'error: {e}')
