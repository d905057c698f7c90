"""Throughput and peak memory of RAVLT beside other models and backends, measured side by side in one run: --model
takes ours (RAVLT_S or ravlt_s), timm's, and with --authors-file the authors' (authors:RAVLT_S).

The table gives each contender's (model x backend x mode) median images/s with its spread; --memory adds the peak
memory of one step, --matmul-rate the arithmetic rate as a fraction of a matrix product timed in the same rounds.
Backends: eager, compile (torch.compile), onnxruntime (eval only: the graph of scripts/export_onnx.py on ONNX
Runtime's CPU provider; the onnx packages). authors:RAVLT_S is the authors' implementation (their
classfication/RALA.py, which needs einops) with the weights of our model from the same seed. --input-size is
H [W]. scripts/resolution.py and ablation.py measure with this file.

- Timing: each contender takes `warmup` untimed steps, then `iters` timed steps, the contenders taking turns step
  by step (every other round in reverse order), so a busy machine slows them alike; a row holds the median
  images/s and the 25th-75th percentiles. An eval step is a forward pass under `torch.no_grad()` of the model's
  inference form (model_factory.inference_form); a train step is forward, cross-entropy on random labels and
  backward (no optimizer step). On CUDA each step is timed between `torch.cuda.synchronize()` calls.
- Peak memory: each contender in a fresh Python process builds itself, runs one untimed step, frees what it left
  (gradients, Python garbage, on the CPU freed C memory with `malloc_trim`), reads the baseline, runs one step and
  reads the peak: on CUDA `torch.cuda.max_memory_allocated()` above `memory_allocated()`, on the CPU the kernel's
  peak RSS (`VmHWM`, reset through `/proc/self/clear_refs`) above the RSS. Weights and input are excluded;
  everything the step allocates (activations, temporaries, in training the gradients) is included. ONNX Runtime
  runs without its memory arena there.
- Reference rate: a matrix product (2048 x 2048 on the CPU, 8192 x 8192 on CUDA; float32 or the autocast dtype)
  timed in the same rounds; a model's GFLOP/s = img/s x FLOPs per image (scripts/flops.py's count at 2 per
  multiply-add, a train step as 3 forward passes).

    python scripts/benchmark.py --model RAVLT_T RAVLT_S convnext_tiny --threads 2
    python scripts/benchmark.py --model RAVLT_S --mode eval --backend eager compile onnxruntime --matmul-rate
    python scripts/benchmark.py --model RAVLT_S --mode eval --input-size 1024 --batch-size 1 --memory --iters 0
    python scripts/benchmark.py --model RAVLT_S --device cuda --backend eager compile --amp bf16 --channels-last
    python scripts/benchmark.py --authors-file ~/RALA/classfication/RALA.py --model RAVLT_S authors:RAVLT_S
"""

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
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import torch
import torch.nn.functional as F

import models
from cli import COUNT, NON_NEGATIVE_INT, ArgumentParser, json_object, one_line_errors
from errors import UsageError
from flops import count_flops, input_size, markdown_table
from model_factory import compile_model, create_model, inference_form
from utils import AMP_DTYPES, atomic_file, autocast, check_output_file, keep_freed_memory

AUTHORS_PREFIX = 'authors:'
BACKENDS = ('eager', 'compile', 'onnxruntime')
MATMUL_SIZE = {'cpu': 2048, 'cuda': 8192}
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (gradients of the inputs and of the weights)


def first_line(e: BaseException) -> str:
    return f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0]}'


# ---- What is measured ----

_START = time.perf_counter()


def progress(message: str):
    """One line on stderr, at once: long runs say what they are doing."""
    elapsed = int(time.perf_counter() - _START)
    print(f'[{elapsed // 60}:{elapsed % 60:02d}] {message}', file=sys.stderr, flush=True)


def add_arguments(parser, *, batch_size: int, warmup: int, iters: int, authors: bool = True):
    """The flags of a measurement that every measuring script shares."""
    parser.add_argument('--batch-size', type=COUNT, default=batch_size, help='images per step')
    parser.add_argument('--threads', type=COUNT, default=None, help='torch threads (and ONNX Runtime threads)')
    parser.add_argument('--warmup', type=COUNT, default=warmup, help='untimed steps per contender')
    parser.add_argument('--iters', type=NON_NEGATIVE_INT, default=iters, help='timed steps per contender')
    parser.add_argument('--seed', type=NON_NEGATIVE_INT, default=0, help="seed of the models' random weights")
    if authors:
        parser.add_argument('--authors-file', default=None, help="a local copy of the authors' classfication/RALA.py")
        parser.add_argument('--authors-path-extra', nargs='*', default=[], help='folders on sys.path for that file')


def setup(args):
    """Apply --threads; returns the authors' module of --authors-file, or None."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return load_authors_module(args.authors_file, args.authors_path_extra) if args.authors_file else None


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


@dataclass
class Settings:
    """How every contender of one measurement runs."""

    batch_size: int = 16
    input_size: tuple = (224, 224)  # height, width
    device: str = 'cpu'
    amp: str = 'none'
    channels_last: bool = False
    threads: Optional[int] = None
    warmup: int = 3
    iters: int = 10
    memory: bool = False
    seed: int = 0
    authors_file: Optional[str] = None
    authors_path_extra: list = field(default_factory=list)

    def __post_init__(self):
        self.input_size = tuple(self.input_size)
        if self.device == 'cuda' and not torch.cuda.is_available():
            raise UsageError('--device cuda but CUDA is not available; use --device cpu')

    @classmethod
    def from_args(cls, args, **values) -> 'Settings':
        """The settings of a script's flags (those named as a field here), `values` overriding them."""
        return cls(**{**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}, **values})

    def describe(self) -> str:
        return (
            f'device {self.device} ({torch.get_num_threads()} threads), batch {self.batch_size}, input '
            f'{self.input_size[0]}x{self.input_size[1]} (HxW), amp {self.amp}, channels-last '
            f'{self.channels_last}, torch {torch.__version__}, {self.warmup} warm-up + {self.iters} timed steps'
        )


def load_authors_module(path: str, extra_paths):
    """Import the authors' RALA.py from a file; a failure is one line."""
    if not path.endswith('.py') or not os.path.isfile(path):
        raise UsageError(
            f"--authors-file {path!r} is not a Python file; point it at the authors' classfication/RALA.py"
        )
    sys.path[:0] = [os.path.abspath(p) for p in extra_paths]
    spec = importlib.util.spec_from_file_location('authors_rala', path)
    # As an import does: timm's register_model looks its caller's module up in sys.modules while it executes.
    module = sys.modules['authors_rala'] = importlib.util.module_from_spec(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # old timm import paths warn, and so does registering a name again
            spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        raise UsageError(
            f"the authors' file needs the package {e.name!r}: pip install {e.name} "
            '(or give its folder with --authors-path-extra)'
        ) from None
    except Exception as e:  # the file's own code failed (an old timm import path ...): whatever it raised
        raise UsageError(f'--authors-file {path!r} fails to run ({first_line(e)})') from None
    return module


def build_model(name: str, seed: int, model_kwargs=None, authors_module=None) -> torch.nn.Module:
    """Our model, a timm model, or the authors' model carrying our model's weights (same seed)."""
    if not name.startswith(AUTHORS_PREFIX):
        torch.manual_seed(seed)
        return create_model(name, model_kwargs)
    variant = name[len(AUTHORS_PREFIX) :].upper()
    if authors_module is None:
        raise UsageError(f'{name} needs --authors-file PATH/TO/RALA.py')
    if model_kwargs:
        raise UsageError(f"{name}: the authors' models take no --model-kwargs")
    if not hasattr(authors_module, variant) or variant.lower() not in models.RAVLT_CONFIGS:
        raise UsageError(f"the authors' file has no model {variant!r}; use authors:RAVLT_T ... authors:RAVLT_L")
    model = getattr(authors_module, variant)()
    torch.manual_seed(seed)
    model.load_state_dict(create_model(variant).state_dict(), strict=True)
    return model


def forward_macs(contender: Contender, settings: Settings, authors_module=None) -> int:
    """Multiply-adds of one image's forward pass (fvcore's count, scripts/flops.py's "GFLOPs")."""
    model = build_model(contender.name, settings.seed, contender.model_kwargs, authors_module)
    return count_flops(model, torch.randn(1, 3, *settings.input_size))['total']


# ---- Runners: one step of a contender ----
class Runner:
    """One step of a contender (`step`); `sync` waits for the device, `prepare_measured_step` frees what the
    previous step left."""

    device = torch.device('cpu')

    def prepare_measured_step(self):
        pass

    def sync(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)


class TorchRunner(Runner):
    """A model in eager mode or under torch.compile: its input, autocast and step function."""

    def __init__(self, contender: Contender, model: torch.nn.Module, settings: Settings):
        self.contender, self.mode = contender, contender.mode
        self.device = torch.device(settings.device)
        fmt = torch.channels_last if settings.channels_last else torch.contiguous_format
        model = model.to(self.device, memory_format=fmt).train()
        if self.mode == 'eval':
            model = inference_form(model, inplace=True)
        self.module = model  # uncompiled, for its parameters
        self.model = compile_model(model, self.device) if contender.backend == 'compile' else model
        self.x = torch.randn(settings.batch_size, 3, *settings.input_size, device=self.device).to(memory_format=fmt)
        self.target = torch.randint(0, 1000, (settings.batch_size,), device=self.device)
        self.amp_dtype = AMP_DTYPES[settings.amp]

    def step(self):
        if self.mode == 'eval':
            with torch.no_grad(), autocast(self.device, self.amp_dtype):
                self.model(self.x)
            return
        self.module.zero_grad(set_to_none=True)  # as a training loop does: each step allocates its gradients
        with autocast(self.device, self.amp_dtype):
            loss = F.cross_entropy(self.model(self.x).float(), self.target)
        loss.backward()

    def prepare_measured_step(self):
        self.module.zero_grad(set_to_none=True)  # the measured step allocates its gradients anew


class OnnxRuntimeRunner(Runner):
    """The eval model exported to ONNX and run by ONNX Runtime (CPU)."""

    def __init__(self, contender: Contender, onnx_file: str, settings: Settings, arena: bool = True):
        from export_onnx import INPUT_NAME, create_session

        self.contender, self.mode = contender, 'eval'
        # No spinning: its idle threads would slow the contender that runs next.
        self.session = create_session(onnx_file, settings.threads, arena=arena, spin=False)
        self.feed = {INPUT_NAME: torch.randn(settings.batch_size, 3, *settings.input_size).numpy()}

    def step(self):
        self.session.run(None, self.feed)


class MatmulRunner(Runner):
    """The machine's reference rate: an n x n matrix product, in the models' (autocast) dtype."""

    def __init__(self, settings: Settings):
        self.device = torch.device(settings.device)
        n = MATMUL_SIZE[self.device.type]
        dtype = AMP_DTYPES[settings.amp] or torch.float32
        self.a, self.b = (torch.randn(n, n, device=self.device, dtype=dtype) for _ in range(2))
        self.c = torch.empty_like(self.a)
        self.flops = 2 * n**3
        self.contender = Contender(f'matmul {n}x{n} {str(dtype).split(".")[1]}', mode='-', backend='-')

    def step(self):
        torch.mm(self.a, self.b, out=self.c)


def export_for_onnxruntime(contender: Contender, settings: Settings, authors_module, folder: str) -> str:
    """Export the contender's eval model (the same weights as its PyTorch runs) into `folder`."""
    from export_onnx import export

    model = inference_form(build_model(contender.name, settings.seed, contender.model_kwargs, authors_module))
    path = os.path.join(folder, f'{len(os.listdir(folder))}.onnx')
    progress(f'{contender.title}: exporting to ONNX')
    export(model, path, settings.input_size)
    return path


def make_runner(contender: Contender, settings: Settings, authors_module=None, onnx_file=None, arena=True):
    if contender.backend == 'onnxruntime':
        return OnnxRuntimeRunner(contender, onnx_file, settings, arena)
    model = build_model(contender.name, settings.seed, contender.model_kwargs, authors_module)
    return TorchRunner(contender, model, settings)


def first_step(runner):
    """One untimed step; a model that rejects the settings (e.g. a fixed input size) is reported in one line."""
    try:
        runner.step()
    except (RuntimeError, AssertionError, ValueError) as e:
        raise UsageError(f'{runner.contender.title} failed with these settings: {first_line(e)}') from None
    runner.sync()


# ---- Peak memory ----
def read_status_kib(field_name: str) -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field_name + ':'))


def peak_memory_mib(runner) -> float:
    """Peak memory of one step above what was in use just before it: one untimed step (compilation, lazy
    initialisation), then what it left is freed, the baseline read, and one step measured. On CUDA the allocator's
    peak above what it had allocated; on the CPU (Linux) the peak resident set above the resident set."""
    first_step(runner)
    runner.prepare_measured_step()
    gc.collect()
    if runner.device.type == 'cuda':
        torch.cuda.synchronize(runner.device)
        torch.cuda.reset_peak_memory_stats(runner.device)
        before = torch.cuda.memory_allocated(runner.device)
        runner.step()
        torch.cuda.synchronize(runner.device)
        return (torch.cuda.max_memory_allocated(runner.device) - before) / 2**20
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL('libc.so.6').malloc_trim(0)  # glibc: hand freed memory back, so RSS counts live memory
    before = read_status_kib('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset the peak-RSS counter (VmHWM) to the current RSS
    runner.step()
    return (read_status_kib('VmHWM') - before) / 1024


def measure_memory_in_child(contender: Contender, settings: Settings, onnx_file=None) -> float:
    """Peak memory (MiB) of one step of the contender, measured in a fresh process (this script)."""
    job = json.dumps({'contender': asdict(contender), 'settings': asdict(settings), 'onnx_file': onnx_file})
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), '--memory-child', job], capture_output=True, text=True
    )
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise UsageError(f'memory run of {contender.title} failed: {lines[-1] if lines else result.returncode}')
    return json.loads(result.stdout.strip().splitlines()[-1])['peak_mib']


def memory_child(job: str):
    """The fresh process of measure_memory_in_child: prints {"peak_mib": ...}."""
    job = json.loads(job)
    settings, contender = Settings(**job['settings']), Contender(**job['contender'])
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    authors = load_authors_module(settings.authors_file, settings.authors_path_extra) if settings.authors_file else None
    runner = make_runner(contender, settings, authors, job['onnx_file'], arena=False)
    print(json.dumps({'peak_mib': peak_memory_mib(runner)}))


# ---- Timing ----
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
        for runner in runners if i % 2 == 0 else runners[::-1]:
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
        row.update(img_per_s=batch_size / median, img_per_s_p25=batch_size / q3, img_per_s_p75=batch_size / q1)
        row['ms_per_step'] = median * 1e3
    return row


def add_matmul_fractions(rows, contenders, reference: MatmulRunner, seconds, settings: Settings, authors_module):
    """Each timed row's GFLOP/s and its fraction of the matrix product's rate; returns the matmul row."""
    matmul_row = {'model': reference.contender.label, 'backend': '-', 'mode': '-'}
    if not seconds:
        return matmul_row
    rate = reference.flops / statistics.median(seconds)
    matmul_row['gflop_per_s'] = rate / 1e9
    counted = {}
    for row, c in zip(rows, contenders):
        if 'img_per_s' in row:
            key = (c.name, json.dumps(c.model_kwargs, sort_keys=True))
            if key not in counted:
                progress(f'{c.label}: counting FLOPs')
                counted[key] = 2 * forward_macs(c, settings, authors_module)  # 2 FLOPs per multiply-add
            per_image = counted[key] * (TRAIN_FLOPS_PER_FORWARD if c.mode == 'train' else 1)
            row['gflop_per_s'] = row['img_per_s'] * per_image / 1e9
            row['matmul_fraction'] = row['gflop_per_s'] * 1e9 / rate
    return matmul_row


def benchmark(contenders, settings: Settings, authors_module=None, matmul: bool = False):
    """Time (and with settings.memory, measure the memory of) the contenders side by side; returns their rows,
    and the matrix product's row last when `matmul`."""
    with tempfile.TemporaryDirectory(prefix='ravlt_onnx_') as folder:
        exported = [c for c in contenders if c.backend == 'onnxruntime']
        onnx_files = {c: export_for_onnxruntime(c, settings, authors_module, folder) for c in exported}
        runners = []
        for c in contenders:
            progress(f'{c.title}: building')
            runners.append(make_runner(c, settings, authors_module, onnx_files.get(c)))
        reference = MatmulRunner(settings) if matmul else None
        timed = runners + ([reference] if reference else [])
        times = time_runners(timed, settings.warmup, settings.iters) if settings.iters > 0 else {r: [] for r in timed}
        rows = [summarize(r.contender, times[r], settings.batch_size) for r in runners]
        matmul_seconds = times.get(reference, [])
        del runners, timed, times  # the memory runs below start fresh processes: free this one's models first
        if settings.memory:
            for row, c in zip(rows, contenders):
                progress(f'{c.title}: measuring peak memory in a fresh process')
                row['peak_mib'] = measure_memory_in_child(c, settings, onnx_files.get(c))
    if reference is not None:
        rows.append(add_matmul_fractions(rows, contenders, reference, matmul_seconds, settings, authors_module))
    return rows


# ---- The command ----
def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser('benchmark.py', description=__doc__.split('\n\n')[0], with_config=False)
    parser.add_argument('--model', nargs='+', default=['RAVLT_T', 'RAVLT_S', 'convnext_tiny'])
    parser.add_argument('--model-kwargs', type=json_object, default=None, metavar='JSON', help='model arguments')
    parser.add_argument('--mode', nargs='+', choices=['eval', 'train'], default=['eval', 'train'])
    parser.add_argument('--backend', nargs='+', choices=BACKENDS, default=['eager'])
    parser.add_argument('--input-size', type=COUNT, nargs='+', default=[224], metavar=('H', 'W'), help='height, width')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument('--amp', choices=list(AMP_DTYPES), default='none', help='autocast dtype')
    parser.add_argument('--channels-last', action='store_true', help='channels-last weights and input')
    add_arguments(parser, batch_size=16, warmup=3, iters=10)
    parser.add_argument('--memory', action='store_true', help='also measure the peak memory of one step')
    parser.add_argument('--matmul-rate', action='store_true', help='GFLOP/s as a fraction of a matrix product')
    parser.add_argument('--json', default=None, help='also write the results to this .json file')
    return parser


def format_table(rows, settings: str) -> str:
    columns = {'img/s (median)': ('img_per_s', '{:.1f}'), 'img/s (p25-p75)': ('spread', '{}')}  # header: key, format
    columns.update({'ms/step': ('ms_per_step', '{:.0f}'), 'peak MiB': ('peak_mib', '{:.0f}')})
    if any('gflop_per_s' in r for r in rows):
        columns.update({'GFLOP/s': ('gflop_per_s', '{:.0f}'), 'of matmul': ('matmul_fraction', '{:.0%}')})
    cells = []
    for r in rows:
        r = dict(r, spread=f'{r["img_per_s_p25"]:.1f}-{r["img_per_s_p75"]:.1f}') if 'img_per_s' in r else r
        cells.append(
            [r['model'], r['backend'], r['mode']] + [f.format(r[k]) if k in r else None for k, f in columns.values()]
        )
    return settings + '\n\n' + markdown_table(['model', 'backend', 'mode', *columns], cells)


def main(args):
    settings = Settings.from_args(args, input_size=input_size(args.input_size))
    if args.iters == 0 and not args.memory:
        raise UsageError('--iters 0 measures nothing without --memory')
    if 'onnxruntime' in args.backend and (args.device != 'cpu' or args.amp != 'none'):
        raise UsageError('the onnxruntime backend runs float32 on the CPU: use --device cpu --amp none')
    if args.json:
        check_output_file(args.json, '--json', suffixes=('.json',))  # before the measurement, not after it
    contenders = [
        Contender(name, mode, backend, args.model_kwargs)
        for name in args.model
        for backend in args.backend
        for mode in args.mode
        if not (backend == 'onnxruntime' and mode == 'train')  # inference only
    ]
    if not contenders:
        raise UsageError('the onnxruntime backend measures eval only: add --mode eval')
    rows = benchmark(contenders, settings, setup(args), matmul=args.matmul_rate)
    print(format_table(rows, settings.describe()), flush=True)
    if args.json:
        flags = {k: v for k, v in vars(args).items() if k != 'given'}
        result = {'settings': flags, 'torch': torch.__version__, 'threads': torch.get_num_threads(), 'results': rows}
        with atomic_file(args.json, 'w') as f:
            json.dump(result, f, indent=1)
    return rows


if __name__ == '__main__':
    keep_freed_memory()  # freed memory stays in the process: eager steps reuse it (docs/performance.md)
    with one_line_errors():
        if sys.argv[1:2] == ['--memory-child']:  # a fresh process of measure_memory_in_child
            memory_child(sys.argv[2])
        else:
            main(get_args_parser().parse_args())
