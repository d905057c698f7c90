"""Resolution scaling: throughput, peak memory and FLOPs of RAVLT and its peers from 224 px to detection sizes.

At each size the models are measured side by side as scripts/benchmark.py measures them (with --memory, each
one's peak memory in a fresh process) and their FLOPs counted as scripts/flops.py counts them; the results go to
tables (stdout), a JSON file and a figure against the pixel count. Sizes are H or HxW (height then width). Models:
RAVLT_T, RAVLT_S, RAVLT_S-linear (rala in every stage), authors:RAVLT_S (the authors' code with our weights, with
--authors-file), convnext_tiny, swin_tiny (timm's swin_tiny_patch4_window7_224 built for each size).

    python scripts/resolution.py --memory --threads 2 --figure docs/resolution_scaling.png --json resolution.json
    python scripts/resolution.py --models RAVLT_S convnext_tiny --sizes 224 512 800x1280 --mode train
    python scripts/resolution.py --authors-file path/to/RALA.py --authors-path-extra path/to/einops_folder
"""

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import torch

import figures
from benchmark import Contender, Settings, add_arguments, benchmark, forward_macs, progress, setup
from cli import ArgumentParser, one_line_errors
from errors import UsageError
from flops import markdown_table
from utils import atomic_file, check_output_file, keep_freed_memory

# label -> (model name, model kwargs for an input of height h and width w)
MODELS = {
    'RAVLT_T': ('RAVLT_T', lambda h, w: None),
    'RAVLT_S': ('RAVLT_S', lambda h, w: None),
    'RAVLT_S-linear': ('RAVLT_S', lambda h, w: {'attn_types': ['rala'] * 4}),
    'authors:RAVLT_S': ('authors:RAVLT_S', lambda h, w: None),
    'convnext_tiny': ('convnext_tiny', lambda h, w: None),
    'swin_tiny': ('swin_tiny_patch4_window7_224', lambda h, w: {'img_size': [h, w]}),
}
DEFAULT_SIZES = ['224', '384', '512', '768', '1024', '800x1280']
QUANTITIES = (('img_per_s', 'img/s', '{:.3g}'), ('peak_mib', 'peak MiB', '{:.0f}'), ('gmacs', 'GFLOPs', '{:.1f}'))


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser('resolution.py', description=__doc__.split('\n\n')[0], with_config=False)
    parser.add_argument('--models', nargs='+', choices=list(MODELS), default=None, metavar='MODEL', help='default: all')
    parser.add_argument('--sizes', nargs='+', default=DEFAULT_SIZES, metavar='H[xW]', help='height, or height x width')
    parser.add_argument('--mode', choices=['eval', 'train'], default='eval')
    add_arguments(parser, batch_size=1, warmup=2, iters=5)
    parser.add_argument('--memory', action='store_true', help='also measure peak memory (a fresh process each)')
    parser.add_argument('--json', default=None, help='write the results to this .json file')
    parser.add_argument('--figure', default=None, help='draw the results into this .png, .svg or .pdf file')
    return parser


def parse_size(text: str) -> tuple:
    match = re.fullmatch(r'([1-9]\d*)(?:x([1-9]\d*))?', text)
    if not match:
        raise UsageError(f'--sizes {text!r}: give H or HxW (height then width), e.g. 512 or 800x1280')
    return int(match.group(1)), int(match.group(2) or match.group(1))


def sweep(labels, sizes, args, authors_module=None) -> list:
    """One row per model and size: img/s (and spread), peak MiB with args.memory, GMACs ("GFLOPs")."""
    rows = []
    for size in sizes:
        settings = Settings.from_args(args, input_size=size)
        contenders = [
            Contender(MODELS[label][0], args.mode, 'eager', MODELS[label][1](*size), label) for label in labels
        ]
        progress(f'size {size[0]}x{size[1]}: {", ".join(labels)}')
        for row, contender in zip(benchmark(contenders, settings, authors_module), contenders):
            progress(f'{contender.label} at {size[0]}x{size[1]}: counting FLOPs')
            macs = forward_macs(contender, settings, authors_module)
            rows.append({**row, 'input_size': list(size), 'gmacs': macs / 1e9})
    return rows


def format_tables(rows, labels, sizes) -> str:
    """One table per quantity: a row per model, a column per size."""
    by_key = {(r['model'], tuple(r['input_size'])): r for r in rows}
    out = []
    for key, title, fmt in QUANTITIES:
        if any(key in r for r in rows):
            cells = [[label] + [by_key.get((label, size), {}).get(key) for size in sizes] for label in labels]
            cells = [[c if c is None or i == 0 else fmt.format(c) for i, c in enumerate(row)] for row in cells]
            out.append(f'{title}:\n\n' + markdown_table(['model'] + [f'{h}x{w}' for h, w in sizes], cells) + '\n')
    return '\n'.join(out)


def draw(rows, labels, path: str, title: str):
    plt = figures.pyplot()
    shown = [(k, t) for k, t, _ in QUANTITIES if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4.2), squeeze=False)
    squares = sorted({tuple(r['input_size']) for r in rows if r['input_size'][0] == r['input_size'][1]})
    others = sorted({f'{h}x{w}' for h, w in (r['input_size'] for r in rows) if h != w})
    for ax, (key, name) in zip(axes[0], shown):
        for i, label in enumerate(labels):
            mine = [r for r in rows if r['model'] == label and key in r]
            points = sorted((r['input_size'][0] * r['input_size'][1] / 1e6, r[key], r['input_size']) for r in mine)
            square = [p for p in points if p[2][0] == p[2][1]]
            other = [p for p in points if p[2][0] != p[2][1]]  # e.g. 800x1280: beside, not on, the square curve
            style = '--' if label.startswith('authors:') else '-'
            ax.plot([p[0] for p in square], [p[1] for p in square], style, color=f'C{i}', marker='o', ms=3, label=label)
            ax.plot([p[0] for p in other], [p[1] for p in other], 'x', color=f'C{i}', ms=7)
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xticks([h * w / 1e6 for h, w in squares], [f'{h}x{w}' for h, w in squares], rotation=45, fontsize=8)
        ax.tick_params(axis='x', which='minor', bottom=False, labelbottom=False)
        ax.set_xlabel('input (HxW), on a scale of pixel count' + (f'; x: {", ".join(others)}' if others else ''))
        ax.set_title(name)
        ax.grid(True, which='both', alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    figures.save(fig, path, dpi=110)


def main(args):
    sizes = [parse_size(s) for s in args.sizes]
    labels = args.models or [m for m in MODELS if args.authors_file or not m.startswith('authors:')]
    if args.json:
        check_output_file(args.json, '--json', suffixes=('.json',))  # before the long run
    if args.figure:
        check_output_file(args.figure, '--figure', suffixes=('.png', '.svg', '.pdf'))
        figures.pyplot()
    rows = sweep(labels, sizes, args, setup(args))
    line = (
        f'{args.mode}, batch {args.batch_size}, float32, {torch.get_num_threads()} threads, '
        f'{args.warmup} warm-up + {args.iters} timed steps per model and size, torch {torch.__version__}'
    )
    print(line + '\n\n' + format_tables(rows, labels, sizes), flush=True)
    if args.json:
        with atomic_file(args.json, 'w') as f:
            settings = {k: v for k, v in vars(args).items() if k != 'given'}
            json.dump({'settings': settings, 'line': line, 'results': rows}, f, indent=1)
    if args.figure:
        draw(rows, labels, args.figure, line)
        print(f'figure: {args.figure}')
    return rows


if __name__ == '__main__':
    keep_freed_memory()  # freed memory stays in the process: eager steps reuse it (docs/performance.md)
    with one_line_errors():
        main(get_args_parser().parse_args())
