"""Throughput and peak memory of RAVLT beside other models and backends, measured side by side in one run.

Each contender (a model in a mode on a backend) takes `--warmup` untimed steps, then `--iters` timed steps;
the contenders take turns step by step (every other round in reverse order), so a busy machine slows them
alike. We report the median images/s and the spread (25th-75th percentile). An eval step is a forward pass
under `torch.no_grad()` of the model after `timm.utils.reparameterize_model`; a train step is forward,
cross-entropy on random labels and backward (no optimizer step, no fp16 loss scaling). On CUDA every step
is timed between `torch.cuda.synchronize()` calls. Progress goes to stderr as it happens.

Backends (`--backend`, several at once): `eager`; `compile` (`torch.compile`, default Inductor);
`onnxruntime` (eval only: the model exported by scripts/export_onnx.py's `export`, with a dynamic batch
and size, run by ONNX Runtime's CPU provider with every graph optimisation; needs the optional `onnx`
extra). `--amp` and `--channels-last` apply to the PyTorch backends.

Peak memory (`--memory`): each contender runs in a fresh Python process, which builds it, runs one untimed
step, frees what it left (gradients set to None, Python garbage collected, on the CPU freed C memory
returned to the OS with `malloc_trim`), reads the baseline, runs one step and reads the peak. On
CUDA the figure is `torch.cuda.max_memory_allocated()` above `memory_allocated()` before the step; on the
CPU the kernel's peak RSS (`VmHWM`, reset through `/proc/self/clear_refs`) above the RSS before it. Weights
and input are excluded; everything the step allocates (activations, temporaries and, in training, the
gradients) is included. ONNX Runtime runs without its memory arena there, so its RSS follows its use.

`--matmul-rate` times a float32 matrix product (2048 x 2048 on the CPU, 8192 x 8192 on CUDA; in the
autocast dtype with `--amp`) in the same rounds and prints each contender's arithmetic rate as a fraction
of it: GFLOP/s = img/s x FLOPs per image, counted with fvcore as in scripts/flops.py (attention products
included) at 2 FLOPs per multiply-add, a train step counted as 3 forward passes.

    python scripts/benchmark.py --model RAVLT_T RAVLT_S convnext_tiny --threads 2
    python scripts/benchmark.py --model RAVLT_S --mode eval --backend eager compile onnxruntime --matmul-rate
    python scripts/benchmark.py --model RAVLT_S --mode eval --input-size 1024 --batch-size 1 --memory --iters 0
    python scripts/benchmark.py --model RAVLT_S --device cuda --backend eager compile --amp bf16 --channels-last
    # beside the authors' implementation (their classfication/RALA.py, which needs einops):
    python scripts/benchmark.py --authors-file ~/RALA/classfication/RALA.py --model RAVLT_S authors:RAVLT_S

Our models accept the authors' names (RAVLT_S) and ours (ravlt_s); other names are timm models. With
`--authors-file`, `authors:RAVLT_S` builds the authors' model from that file and copies the weights of our
`ravlt_s` (same seed) into it, so both compute the same function. Sizes: `--input-size H [W]` (height then
width; one number for a square input).
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
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import timm.utils
import torch
import torch.nn.functional as F

import models  # registers the RAVLT models
from cli import ArgumentParser, UsageError, json_object, run_cli
from run import create_model

AUTHORS_PREFIX = 'authors:'
BACKENDS = ('eager', 'compile', 'onnxruntime')
MATMUL_SIZE = {'cpu': 2048, 'cuda': 8192}
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (gradients of the inputs and of the weights)


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser('RAVLT benchmark', add_help=True)
    parser.add_argument('--model', nargs='+', default=['RAVLT_T', 'RAVLT_S', 'convnext_tiny'],
                        help='our names (RAVLT_S, ravlt_s), timm names, or authors:RAVLT_S with --authors-file')
    parser.add_argument('--model-kwargs', type=json_object, default=None,
                        help='JSON object passed to timm.create_model for every model but the authors\', '
                        'e.g. \'{"attn_types": ["rala", "rala", "rala", "rala"]}\'')
    parser.add_argument('--mode', nargs='+', choices=['eval', 'train'], default=['eval', 'train'])
    parser.add_argument('--backend', nargs='+', choices=BACKENDS, default=['eager'],
                        help='eager, compile (torch.compile), onnxruntime (eval only; the onnx extra)')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--input-size', type=int, nargs='+', default=[224], metavar='H [W]',
                        help='input height and width (one number for a square input)')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument('--amp', choices=['none', 'bf16', 'fp16'], default='none', help='autocast dtype')
    parser.add_argument('--channels-last', action='store_true',
                        help='channels-last weights and input for the PyTorch backends')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads and ONNX Runtime threads')
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps per contender')
    parser.add_argument('--iters', type=int, default=10, help='timed steps per contender (0: memory only)')
    parser.add_argument('--memory', action='store_true', help='also measure the peak memory of one step')
    parser.add_argument('--matmul-rate', action='store_true',
                        help='time a matrix product alongside and print each model\'s GFLOP/s as a fraction of it')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--authors-file', default=None, help="a local copy of the authors' classfication/RALA.py")
    parser.add_argument('--authors-path-extra', nargs='*', default=[],
                        help="folders to put on sys.path for the authors' file (e.g. where einops is)")
    parser.add_argument('--json', default=None, help='also write the results to this JSON file')
    parser.add_argument('--memory-child', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--onnx-file', default=None, help=argparse.SUPPRESS)  # the parent's export, reused
    return parser


_START = time.perf_counter()


def progress(message: str):
    """One line on stderr, at once: long runs say what they are doing."""
    elapsed = int(time.perf_counter() - _START)
    print(f'[benchmark {elapsed // 60}:{elapsed % 60:02d}] {message}', file=sys.stderr, flush=True)


@dataclass(eq=False)
class Contender:
    """One model in one mode on one backend; `label` names it in the table (the model name by default)."""
    name: str
    mode: str = 'eval'
    backend: str = 'eager'
    model_kwargs: Optional[dict] = None
    label: str = ''

    def __post_init__(self):
        self.label = self.label or self.name

    @property
    def title(self) -> str:
        return self.label if self.backend == '-' else f'{self.label} {self.mode} ({self.backend})'


def load_authors_module(path: str, extra_paths):
    """Import the authors' RALA.py from a file; any import failure becomes one clear line."""
    if not os.path.isfile(path):
        raise UsageError(f"--authors-file {path!r} does not exist; point it at the authors' classfication/RALA.py")
    sys.path[:0] = [os.path.abspath(p) for p in extra_paths]
    spec = importlib.util.spec_from_file_location('authors_rala', path)
    module = importlib.util.module_from_spec(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # old timm import paths warn
            spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        raise UsageError(f"the authors' file needs the package {e.name!r}: pip install {e.name} "
                         f"(or give its folder with --authors-path-extra)") from None
    except ImportError as e:
        raise UsageError(f"the authors' file does not import with this timm ({e}); edit its import lines to "
                         f"today's paths (e.g. timm.layers instead of timm.models.layers)") from None
    return module


def build_model(name: str, seed: int, model_kwargs=None, authors_module=None) -> torch.nn.Module:
    """Our model, a timm model, or the authors' model carrying our model's weights (same seed)."""
    if name.startswith(AUTHORS_PREFIX):
        variant = name[len(AUTHORS_PREFIX):].upper()
        if authors_module is None:
            raise UsageError(f'{name} needs --authors-file PATH/TO/RALA.py')
        if model_kwargs:
            raise UsageError(f"{name}: the authors' models take no --model-kwargs")
        if not hasattr(authors_module, variant) or variant.lower() not in models.RAVLT_CONFIGS:
            raise UsageError(f"the authors' file has no model {variant!r}; use one of "
                             f"{', '.join(AUTHORS_PREFIX + n.upper() for n in models.RAVLT_CONFIGS)}")
        model = getattr(authors_module, variant)()
        torch.manual_seed(seed)
        model.load_state_dict(create_model(variant).state_dict(), strict=True)
        return model
    torch.manual_seed(seed)
    return create_model(name, model_kwargs)


def autocast_context(device: torch.device, amp: str):
    dtype = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def input_shape(args) -> tuple:
    return (args.batch_size, 3, args.input_size[0], args.input_size[-1])


class TorchRunner:
    """A model in eager mode or under torch.compile: its input, autocast and step function."""

    def __init__(self, contender: Contender, model: torch.nn.Module, args):
        self.contender, self.mode = contender, contender.mode
        self.device = torch.device(args.device)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        model = model.to(self.device, memory_format=fmt).train(self.mode == 'train')
        if self.mode == 'eval':
            model = timm.utils.reparameterize_model(model, inplace=True)
        self.module = model  # uncompiled, for its parameters
        self.model = torch.compile(model) if contender.backend == 'compile' else model
        self.x = torch.randn(*input_shape(args), device=self.device).contiguous(memory_format=fmt)
        self.target = torch.randint(0, 1000, (args.batch_size,), device=self.device)
        self.amp = args.amp

    def step(self):
        if self.mode == 'eval':
            with torch.no_grad(), autocast_context(self.device, self.amp):
                self.model(self.x)
            return
        self.module.zero_grad(set_to_none=True)  # as a training loop does: each step allocates its gradients
        with autocast_context(self.device, self.amp):
            loss = F.cross_entropy(self.model(self.x).float(), self.target)
        loss.backward()

    def prepare_measured_step(self):
        """Free what the previous step left (its gradients): the measured step then allocates them anew."""
        self.module.zero_grad(set_to_none=True)

    def sync(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)


class OnnxRuntimeRunner:
    """The eval model exported to ONNX and run by ONNX Runtime (CPU)."""

    def __init__(self, contender: Contender, onnx_file: str, args, arena: bool = True):
        from scripts.export_onnx import INPUT_NAME, create_session
        self.contender, self.mode, self.device = contender, 'eval', torch.device('cpu')
        self.session = create_session(onnx_file, args.threads, arena=arena)
        self.feed = {INPUT_NAME: torch.randn(*input_shape(args)).numpy()}

    def step(self):
        self.session.run(None, self.feed)

    def prepare_measured_step(self):
        pass

    def sync(self):
        pass


class MatmulRunner:
    """The machine's reference rate: an n x n matrix product, in the models' (autocast) dtype."""

    def __init__(self, args):
        self.device = torch.device(args.device)
        self.n = MATMUL_SIZE[self.device.type]
        dtype = {'none': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}[args.amp]
        self.a, self.b = (torch.randn(self.n, self.n, device=self.device, dtype=dtype) for _ in range(2))
        self.c = torch.empty_like(self.a)
        self.flops = 2 * self.n ** 3
        self.contender = Contender(f'matmul {self.n}x{self.n} {str(dtype).split(".")[1]}', mode='-', backend='-')

    def step(self):
        torch.mm(self.a, self.b, out=self.c)

    def sync(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)


def export_for_onnxruntime(contender: Contender, args, authors_module, folder: str) -> str:
    """Export the contender's eval model (the same weights as its PyTorch runs) into `folder`."""
    from scripts.export_onnx import export, import_onnxruntime
    import_onnxruntime()
    model = build_model(contender.name, args.seed, contender.model_kwargs, authors_module).eval()
    model = timm.utils.reparameterize_model(model, inplace=True)
    path = os.path.join(folder, f'{len(os.listdir(folder))}.onnx')
    progress(f'{contender.title}: exporting to ONNX')
    export(model, path, tuple(args.input_size * (3 - len(args.input_size))))
    return path


def make_runner(contender: Contender, args, authors_module, onnx_file=None, arena=True):
    if contender.backend == 'onnxruntime':
        return OnnxRuntimeRunner(contender, onnx_file, args, arena)
    return TorchRunner(contender, build_model(contender.name, args.seed, contender.model_kwargs, authors_module),
                       args)


# ----------------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------------

def read_status_kib(field_name: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field_name + ':'):
                return int(line.split()[1])
    raise UsageError(f'/proc/self/status has no {field_name}: CPU peak memory needs Linux')


def release_freed_memory():
    """Hand memory freed by Python and the C allocator back to the OS, so RSS counts only live memory."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL('libc.so.6').malloc_trim(0)  # glibc keeps freed blocks otherwise


class RssMeter:
    """CPU: the peak resident set of the step above the resident set before it."""

    def start(self):
        release_freed_memory()
        self.before = read_status_kib('VmRSS')
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # reset the peak-RSS counter (VmHWM) to the current RSS
        except OSError as e:
            raise UsageError(f'cannot reset the peak-RSS counter ({e}); CPU peak memory needs Linux >= 4.0') from None

    def peak_mib(self) -> float:
        return (read_status_kib('VmHWM') - self.before) / 1024


class CudaMeter:
    """CUDA: the allocator's peak during the step above what was allocated before it."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self):
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.before = torch.cuda.memory_allocated(self.device)

    def peak_mib(self) -> float:
        torch.cuda.synchronize(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - self.before) / 2 ** 20


def peak_memory_mib(runner, meter) -> float:
    """Peak memory of one step above what was in use just before it (see the module docstring): one untimed
    step (compilation, lazy initialisation), then what it left is freed, the baseline read, and one step
    measured. Both devices share this sequence; only the meter differs."""
    first_step(runner)
    runner.prepare_measured_step()
    meter.start()
    runner.step()
    return meter.peak_mib()


def child_command(contender: Contender, args, onnx_file=None) -> list:
    """This script, for one contender, in a fresh process that prints its peak memory as JSON."""
    cmd = [sys.executable, os.path.abspath(__file__), '--memory-child', '--iters', '0',
           '--model', contender.name, '--mode', contender.mode, '--backend', contender.backend,
           '--batch-size', str(args.batch_size), '--input-size', *map(str, args.input_size),
           '--device', args.device, '--amp', args.amp, '--seed', str(args.seed)]
    if contender.model_kwargs:
        cmd += ['--model-kwargs', json.dumps(contender.model_kwargs)]
    if args.threads is not None:
        cmd += ['--threads', str(args.threads)]
    if args.channels_last:
        cmd.append('--channels-last')
    if args.authors_file:
        cmd += ['--authors-file', args.authors_file, '--authors-path-extra', *args.authors_path_extra]
    if onnx_file:
        cmd += ['--onnx-file', onnx_file]
    return cmd


def measure_memory_in_child(contender: Contender, args, onnx_file=None) -> float:
    """Peak memory (MiB) of one step of the contender, measured in a fresh process."""
    result = subprocess.run(child_command(contender, args, onnx_file), capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise UsageError(f'memory run of {contender.title} failed: {lines[-1] if lines else result.returncode}')
    return json.loads(result.stdout.strip().splitlines()[-1])['peak_mib']


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------

def first_step(runner):
    """One untimed step; a model that rejects the settings (e.g. a fixed input size) is reported in one line."""
    try:
        runner.step()
    except (RuntimeError, AssertionError, ValueError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f'{runner.contender.title} failed with these settings: {message}') from None
    runner.sync()


def time_runners(runners, warmup: int, iters: int):
    """Warm up each runner, then time them in turns; returns {runner: [seconds per step]}."""
    for runner in runners:
        progress(f'{runner.contender.title}: warming up ({warmup} steps)')
        first_step(runner)
        for _ in range(warmup - 1):
            runner.step()
        runner.sync()
    times = {runner: [] for runner in runners}
    for i in range(iters):
        progress(f'timing: round {i + 1}/{iters} of {len(runners)} contenders')
        # Every other round in reverse order: a step's speed depends on what ran just before it (the
        # allocator's state, the caches), and alternating shares that effect out evenly.
        for runner in (runners if i % 2 == 0 else runners[::-1]):
            runner.sync()
            start = time.perf_counter()
            runner.step()
            runner.sync()
            times[runner].append(time.perf_counter() - start)
    return times


def summarize(contender: Contender, seconds, batch_size: int) -> dict:
    row = {'model': contender.label, 'backend': contender.backend, 'mode': contender.mode}
    if seconds:
        q1, median, q3 = statistics.quantiles(seconds, n=4, method='inclusive') if len(seconds) > 1 else seconds * 3
        row.update(img_per_s=batch_size / median, img_per_s_p25=batch_size / q3,
                   img_per_s_p75=batch_size / q1, ms_per_step=median * 1e3)
    return row


def forward_macs(contender: Contender, args, authors_module) -> int:
    """Multiply-adds of one image's forward pass: fvcore's count, as scripts/flops.py counts (its "GFLOPs")."""
    from scripts.flops import count_flops
    model = build_model(contender.name, args.seed, contender.model_kwargs, authors_module)
    return count_flops(model, torch.randn(1, 3, args.input_size[0], args.input_size[-1]))['total']


def format_table(rows, settings: str) -> str:
    rate = any('gflop_per_s' in r for r in rows)
    header = ['model', 'backend', 'mode', 'img/s (median)', 'img/s (p25-p75)', 'ms/step', 'peak MiB']
    header += ['GFLOP/s', 'of matmul'] if rate else []
    lines = [settings, '', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for r in rows:
        cells = [r['model'], r['backend'], r['mode']]
        cells += ([f"{r['img_per_s']:.1f}", f"{r['img_per_s_p25']:.1f}-{r['img_per_s_p75']:.1f}",
                   f"{r['ms_per_step']:.0f}"] if 'img_per_s' in r else ['-', '-', '-'])
        cells.append(f"{r['peak_mib']:.0f}" if 'peak_mib' in r else '-')
        if rate:
            cells += [f"{r['gflop_per_s']:.0f}" if 'gflop_per_s' in r else '-',
                      f"{r['matmul_fraction']:.0%}" if 'matmul_fraction' in r else '-']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def check_args(args):
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UsageError('--device cuda but CUDA is not available; use --device cpu')
    if len(args.input_size) not in (1, 2) or min(args.input_size) < 1:
        raise UsageError('--input-size takes H or H W (height then width, positive)')
    if args.batch_size < 1 or args.warmup < 1 or args.iters < 0:
        raise UsageError('--batch-size and --warmup must be at least 1, --iters at least 0')
    if args.iters == 0 and not (args.memory or args.memory_child):
        raise UsageError('--iters 0 measures nothing without --memory')
    if args.threads is not None and args.threads < 1:
        raise UsageError('--threads must be at least 1')
    if 'onnxruntime' in args.backend and (args.device != 'cpu' or args.amp != 'none'):
        raise UsageError('the onnxruntime backend runs float32 on the CPU: use --device cpu --amp none')


def benchmark(contenders, args, authors_module=None, matmul: bool = False):
    """Time (and with args.memory, measure the memory of) the contenders side by side; returns the rows,
    and the matmul row last when `matmul`. args: the parser's settings (batch, size, device, ...)."""
    with tempfile.TemporaryDirectory(prefix='ravlt_onnx_') as folder:
        onnx_files = {c: export_for_onnxruntime(c, args, authors_module, folder)
                      for c in contenders if c.backend == 'onnxruntime'}
        runners = []
        for c in contenders:
            progress(f'{c.title}: building')
            runners.append(make_runner(c, args, authors_module, onnx_files.get(c)))
        reference = MatmulRunner(args) if matmul else None
        timed = runners + ([reference] if reference else [])
        times = time_runners(timed, args.warmup, args.iters) if args.iters > 0 else {r: [] for r in timed}
        rows = [summarize(r.contender, times[r], args.batch_size) for r in runners]
        matmul_seconds = times.get(reference, [])
        del runners, timed, times  # the memory runs below start fresh processes: free this one's models first
        if args.memory:
            for row, c in zip(rows, contenders):
                progress(f'{c.title}: measuring peak memory in a fresh process')
                row['peak_mib'] = measure_memory_in_child(c, args, onnx_files.get(c))
    if reference is not None:
        rate = reference.flops / statistics.median(matmul_seconds) if matmul_seconds else None
        matmul_row = {'model': reference.contender.label, 'backend': '-', 'mode': '-'}
        if rate:
            matmul_row['gflop_per_s'] = rate / 1e9
            counted = {}
            for row, c in zip(rows, contenders):
                if 'img_per_s' in row:
                    key = (c.name, json.dumps(c.model_kwargs, sort_keys=True))
                    if key not in counted:
                        progress(f'{c.label}: counting FLOPs')
                        counted[key] = 2 * forward_macs(c, args, authors_module)  # 2 FLOPs per multiply-add
                    per_image = counted[key] * (TRAIN_FLOPS_PER_FORWARD if c.mode == 'train' else 1)
                    row['gflop_per_s'] = row['img_per_s'] * per_image / 1e9
                    row['matmul_fraction'] = row['gflop_per_s'] * 1e9 / rate
        rows.append(matmul_row)
    return rows


def settings_line(args) -> str:
    return (f"device {args.device} ({torch.get_num_threads()} threads), batch {args.batch_size}, input "
            f"{args.input_size[0]}x{args.input_size[-1]} (HxW), amp {args.amp}, channels-last "
            f"{args.channels_last}, torch {torch.__version__}, {args.warmup} warm-up + {args.iters} timed steps")


def contenders_of(args) -> list:
    out = []
    for name in args.model:
        for backend in args.backend:
            for mode in args.mode:
                if backend == 'onnxruntime' and mode == 'train':
                    continue  # inference only
                out.append(Contender(name, mode, backend, args.model_kwargs))
    return out


def main(argv):
    args = get_args_parser().parse(argv)
    check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    authors = load_authors_module(args.authors_file, args.authors_path_extra) if args.authors_file else None
    contenders = contenders_of(args)
    if not contenders:
        raise UsageError('the onnxruntime backend measures eval only: add --mode eval')
    if args.memory_child:
        runner = make_runner(contenders[0], args, authors, args.onnx_file, arena=False)
        meter = CudaMeter(runner.device) if runner.device.type == 'cuda' else RssMeter()
        print(json.dumps({'peak_mib': peak_memory_mib(runner, meter)}))
        return []
    rows = benchmark(contenders, args, authors, matmul=args.matmul_rate)
    print(format_table(rows, settings_line(args)), flush=True)
    if args.json:
        with open(args.json + '.tmp', 'w') as f:
            json.dump({'settings': {k: v for k, v in vars(args).items() if k != 'given'}, 'torch': torch.__version__,
                       'threads': torch.get_num_threads(), 'results': rows}, f, indent=1)
        os.replace(args.json + '.tmp', args.json)
    return rows


if __name__ == '__main__':
    run_cli(main, sys.argv[1:])
