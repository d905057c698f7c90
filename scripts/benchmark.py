"""Throughput and peak memory of RAVLT beside other models and backends, measured side by side in one run.

The contenders (every model x backend x mode given) take turns step by step, and the table gives each one's
median images/s with its spread; --memory adds the peak memory of one step, measured in a fresh process;
--matmul-rate adds each model's arithmetic rate as a fraction of a matrix product timed in the same rounds.
The method is written once, in scripts/profiling.py's docstring. Progress goes to stderr.

Backends (--backend, several at once): eager; compile (torch.compile, default Inductor); onnxruntime (eval
only: the model exported as scripts/export_onnx.py exports it, run by ONNX Runtime's CPU provider; needs the
optional onnx packages). --amp and --channels-last apply to the PyTorch backends.

    python scripts/benchmark.py --model RAVLT_T RAVLT_S convnext_tiny --threads 2
    python scripts/benchmark.py --model RAVLT_S --mode eval --backend eager compile onnxruntime --matmul-rate
    python scripts/benchmark.py --model RAVLT_S --mode eval --input-size 1024 --batch-size 1 --memory --iters 0
    python scripts/benchmark.py --model RAVLT_S --device cuda --backend eager compile --amp bf16 --channels-last
    python scripts/benchmark.py --authors-file ~/RALA/classfication/RALA.py --model RAVLT_S authors:RAVLT_S

Our models take the authors' names (RAVLT_S) and ours (ravlt_s); other names are timm models. With
--authors-file, authors:RAVLT_S is the authors' model from that file (it needs einops) with the weights of our
ravlt_s (same seed), so both compute the same function. --input-size is H [W]: one number for a square.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import torch

from cli import COUNT, ArgumentParser, json_object, one_line_errors
from errors import UsageError
from profiling import BACKENDS, Contender, Settings, add_arguments, benchmark, input_size, load_authors_module
from utils import AMP_DTYPES, atomic_file, check_output_file, keep_freed_memory


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser('benchmark.py', description=__doc__.split('\n\n')[0], with_config=False)
    parser.add_argument(
        '--model',
        nargs='+',
        default=['RAVLT_T', 'RAVLT_S', 'convnext_tiny'],
        help='our names (RAVLT_S, ravlt_s), timm names, or authors:RAVLT_S with --authors-file',
    )
    parser.add_argument('--model-kwargs', type=json_object, default=None, metavar='JSON', help="for all but authors'")
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
    rate = any('gflop_per_s' in r for r in rows)
    header = ['model', 'backend', 'mode', 'img/s (median)', 'img/s (p25-p75)', 'ms/step', 'peak MiB']
    header += ['GFLOP/s', 'of matmul'] if rate else []
    lines = [settings, '', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for r in rows:
        cells = [r['model'], r['backend'], r['mode']]
        if 'img_per_s' in r:
            cells += [f'{r["img_per_s"]:.1f}', f'{r["img_per_s_p25"]:.1f}-{r["img_per_s_p75"]:.1f}']
            cells.append(f'{r["ms_per_step"]:.0f}')
        else:
            cells += ['-'] * 3
        cells.append(f'{r["peak_mib"]:.0f}' if 'peak_mib' in r else '-')
        if rate:
            cells.append(f'{r["gflop_per_s"]:.0f}' if 'gflop_per_s' in r else '-')
            cells.append(f'{r["matmul_fraction"]:.0%}' if 'matmul_fraction' in r else '-')
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


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
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    authors = load_authors_module(args.authors_file, args.authors_path_extra) if args.authors_file else None
    rows = benchmark(contenders, settings, authors, matmul=args.matmul_rate)
    print(format_table(rows, settings.describe()), flush=True)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != 'given'}
        result = {'settings': settings, 'torch': torch.__version__, 'threads': torch.get_num_threads(), 'results': rows}
        with atomic_file(args.json, 'w') as f:
            json.dump(result, f, indent=1)
    return rows


if __name__ == '__main__':
    keep_freed_memory()  # freed memory stays in the process: eager steps reuse it (docs/performance.md)
    with one_line_errors():
        main(get_args_parser().parse_args())
