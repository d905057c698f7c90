"""Throughput and peak memory of RAVLT beside other models and backends, measured side by side in one run.

The contenders (every model x backend x mode given) take turns step by step, and the table gives each one's
median images/s with its spread; `--memory` adds the peak memory of one step, measured in a fresh process;
`--matmul-rate` adds each model's arithmetic rate as a fraction of a matrix product timed in the same
rounds. The method (what a step is, what memory counts) is written once, in profiling.py's docstring.
Progress goes to stderr as it happens.

Backends (`--backend`, several at once): `eager`; `compile` (`torch.compile`, default Inductor);
`onnxruntime` (eval only: the model exported as scripts/export_onnx.py exports it, with a dynamic batch
and size, run by ONNX Runtime's CPU provider with every graph optimisation; needs the optional `onnx`
extra). `--amp` and `--channels-last` apply to the PyTorch backends.

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

import json
import sys

if __name__ == '__main__':  # first, before the libraries load: freed memory stays in the process (allocator.py)
    from allocator import keep_freed_memory

    keep_freed_memory()

import torch

from cli import ArgumentParser, json_object, run_cli
from errors import UsageError
from profiling import BACKENDS, Contender, Settings, benchmark, load_authors_module
from utils import atomic_file, check_output_file


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser('RAVLT benchmark', add_help=True)
    parser.add_argument(
        '--model',
        nargs='+',
        default=['RAVLT_T', 'RAVLT_S', 'convnext_tiny'],
        help='our names (RAVLT_S, ravlt_s), timm names, or authors:RAVLT_S with --authors-file',
    )
    parser.add_argument(
        '--model-kwargs',
        type=json_object,
        default=None,
        help="JSON object passed to timm.create_model for every model but the authors', "
        'e.g. \'{"attn_types": ["rala", "rala", "rala", "rala"]}\'',
    )
    parser.add_argument('--mode', nargs='+', choices=['eval', 'train'], default=['eval', 'train'])
    parser.add_argument(
        '--backend',
        nargs='+',
        choices=BACKENDS,
        default=['eager'],
        help='eager, compile (torch.compile), onnxruntime (eval only; the onnx extra)',
    )
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument(
        '--input-size',
        type=int,
        nargs='+',
        default=[224],
        metavar='H [W]',
        help='input height and width (one number for a square input)',
    )
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument('--amp', choices=['none', 'bf16', 'fp16'], default='none', help='autocast dtype')
    parser.add_argument(
        '--channels-last', action='store_true', help='channels-last weights and input for the PyTorch backends'
    )
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads and ONNX Runtime threads')
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps per contender')
    parser.add_argument('--iters', type=int, default=10, help='timed steps per contender (0: memory only)')
    parser.add_argument('--memory', action='store_true', help='also measure the peak memory of one step')
    parser.add_argument(
        '--matmul-rate',
        action='store_true',
        help="time a matrix product alongside and print each model's GFLOP/s as a fraction of it",
    )
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--authors-file', default=None, help="a local copy of the authors' classfication/RALA.py")
    parser.add_argument(
        '--authors-path-extra',
        nargs='*',
        default=[],
        help="folders to put on sys.path for the authors' file (e.g. where einops is)",
    )
    parser.add_argument('--json', default=None, help='also write the results to this JSON file')
    return parser


def format_table(rows, settings: str) -> str:
    rate = any('gflop_per_s' in r for r in rows)
    header = ['model', 'backend', 'mode', 'img/s (median)', 'img/s (p25-p75)', 'ms/step', 'peak MiB']
    header += ['GFLOP/s', 'of matmul'] if rate else []
    lines = [settings, '', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for r in rows:
        cells = [r['model'], r['backend'], r['mode']]
        cells += (
            [f'{r["img_per_s"]:.1f}', f'{r["img_per_s_p25"]:.1f}-{r["img_per_s_p75"]:.1f}', f'{r["ms_per_step"]:.0f}']
            if 'img_per_s' in r
            else ['-', '-', '-']
        )
        cells.append(f'{r["peak_mib"]:.0f}' if 'peak_mib' in r else '-')
        if rate:
            cells += [
                f'{r["gflop_per_s"]:.0f}' if 'gflop_per_s' in r else '-',
                f'{r["matmul_fraction"]:.0%}' if 'matmul_fraction' in r else '-',
            ]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def contenders_of(args) -> list:
    out = []
    for name in args.model:
        for backend in args.backend:
            for mode in args.mode:
                if backend == 'onnxruntime' and mode == 'train':
                    continue  # inference only
                out.append(Contender(name, mode, backend, args.model_kwargs))
    return out


def settings_of(args) -> Settings:
    size = args.input_size * 2 if len(args.input_size) == 1 else args.input_size  # one number: a square
    settings = Settings.from_args(args, input_size=size)
    if args.iters == 0 and not args.memory:
        raise UsageError('--iters 0 measures nothing without --memory')
    if 'onnxruntime' in args.backend and (args.device != 'cpu' or args.amp != 'none'):
        raise UsageError('the onnxruntime backend runs float32 on the CPU: use --device cpu --amp none')
    return settings


def main(argv):
    args = get_args_parser().parse(argv)
    settings = settings_of(args)
    if args.json:
        check_output_file(args.json, '--json')  # before the measurement, not after it
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    authors = load_authors_module(args.authors_file, args.authors_path_extra) if args.authors_file else None
    contenders = contenders_of(args)
    if not contenders:
        raise UsageError('the onnxruntime backend measures eval only: add --mode eval')
    rows = benchmark(contenders, settings, authors, matmul=args.matmul_rate)
    print(format_table(rows, settings.describe()), flush=True)
    if args.json:
        with atomic_file(args.json, 'w') as f:
            json.dump(
                {
                    'settings': {k: v for k, v in vars(args).items() if k != 'given'},
                    'torch': torch.__version__,
                    'threads': torch.get_num_threads(),
                    'results': rows,
                },
                f,
                indent=1,
            )
    return rows


if __name__ == '__main__':
    run_cli(main, sys.argv[1:])
