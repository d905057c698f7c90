"""Resolution scaling: throughput, peak memory and FLOPs of RAVLT and its peers from 224 px to detection sizes.

At each size the models are measured side by side as scripts/benchmark.py measures them (profiling.py: models
take turns step by step; with `--memory`, each model's peak memory in a fresh process) and their FLOPs are
counted as scripts/flops.py counts them (fvcore, one multiply-add = one FLOP, attention products included). The
results go to a table (stdout), a JSON file and a figure of the three quantities against the pixel count.

    python scripts/resolution.py --memory --threads 2 --figure docs/resolution_scaling.png --json resolution.json
    python scripts/resolution.py --models RAVLT_S convnext_tiny --sizes 224 512 800x1280 --mode train
    # with the authors' implementation (their classfication/RALA.py, which needs einops):
    python scripts/resolution.py --authors-file path/to/RALA.py --authors-path-extra path/to/einops_folder

Sizes are H or HxW (height then width): 800x1280 is the detection input (1280 wide, 800 high). The batch
is 1 at every size (`--batch-size`). Models (`--models`, default all but the authors' unless
`--authors-file` is given): RAVLT_T, RAVLT_S, RAVLT_S-linear (`attn_types=('rala',) * 4`: every stage
linear), authors:RAVLT_S (the authors' code with our weights), convnext_tiny and swin_tiny (timm's
swin_tiny_patch4_window7_224 built for each input size; its windows are padded where the size needs it).
"""

import json
import os
import re
import sys

if __name__ == '__main__':  # first, before the libraries load: freed memory stays in the process (allocator.py)
    from allocator import keep_freed_memory

    keep_freed_memory()

import torch

from cli import ArgumentParser, run_cli
from errors import UsageError
from profiling import Contender, Settings, benchmark, forward_macs, load_authors_module, progress
from utils import atomic_file, check_output_file

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
    parser = ArgumentParser('RAVLT resolution scaling', add_help=True)
    parser.add_argument(
        '--models',
        nargs='+',
        default=None,
        metavar='MODEL',
        help=f'any of {", ".join(MODELS)} (default: all; authors:RAVLT_S with --authors-file)',
    )
    parser.add_argument(
        '--sizes',
        nargs='+',
        default=DEFAULT_SIZES,
        metavar='H[xW]',
        help='input sizes, H or HxW (height then width); default ' + ' '.join(DEFAULT_SIZES),
    )
    parser.add_argument('--mode', choices=['eval', 'train'], default='eval')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per model and size')
    parser.add_argument('--iters', type=int, default=5, help='timed steps per model and size')
    parser.add_argument('--memory', action='store_true', help='also measure peak memory (a fresh process each)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--authors-file', default=None, help="a local copy of the authors' classfication/RALA.py")
    parser.add_argument(
        '--authors-path-extra',
        nargs='*',
        default=[],
        help="folders to put on sys.path for the authors' file (e.g. where einops is)",
    )
    parser.add_argument('--json', default=None, help='write the results to this JSON file')
    parser.add_argument('--figure', default=None, help='draw the results into this image file (.png, .svg, .pdf)')
    return parser


FIGURE_FORMATS = ('png', 'svg', 'pdf')


def figure_format(path: str) -> str:
    return os.path.splitext(path)[1][1:].lower()


def parse_size(text: str) -> tuple:
    match = re.fullmatch(r'(\d+)(?:x(\d+))?', text)
    if not match or int(match.group(1)) < 1 or int(match.group(2) or 1) < 1:
        raise UsageError(f'--sizes {text!r}: give H or HxW (height then width), e.g. 512 or 800x1280')
    return int(match.group(1)), int(match.group(2) or match.group(1))


def settings_at(args, size) -> Settings:
    return Settings.from_args(args, input_size=size)


def sweep(labels, sizes, args, authors_module=None, models=MODELS) -> list:
    """One row per model and size: img/s (and spread), peak MiB with args.memory, GMACs ("GFLOPs")."""
    rows = []
    for size in sizes:
        settings = settings_at(args, size)
        contenders = [
            Contender(models[label][0], args.mode, 'eager', models[label][1](*size), label) for label in labels
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
        if not any(key in r for r in rows):
            continue
        out += [
            f'{title}:',
            '',
            '| model | ' + ' | '.join(f'{h}x{w}' for h, w in sizes) + ' |',
            '|---|' + '---|' * len(sizes),
        ]
        for label in labels:
            cells = [by_key.get((label, size), {}).get(key) for size in sizes]
            out.append(f'| {label} | ' + ' | '.join('-' if v is None else fmt.format(v) for v in cells) + ' |')
        out.append('')
    return '\n'.join(out)


def draw(rows, labels, path: str, title: str):
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    shown = [(k, t) for k, t, _ in QUANTITIES if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4.2))
    for ax, (key, name) in zip(axes if len(shown) > 1 else [axes], shown):
        for i, label in enumerate(labels):
            points = sorted(
                (r['input_size'][0] * r['input_size'][1] / 1e6, r[key], r['input_size'])
                for r in rows
                if r['model'] == label and key in r
            )
            square = [p for p in points if p[2][0] == p[2][1]]
            other = [p for p in points if p[2][0] != p[2][1]]  # e.g. 800x1280: beside, not on, the square curve
            color = f'C{i}'
            style = '--' if label.startswith('authors:') else '-'
            ax.plot([p[0] for p in square], [p[1] for p in square], style, color=color, marker='o', ms=3, label=label)
            ax.plot([p[0] for p in other], [p[1] for p in other], 'x', color=color, ms=7)
        ax.set_xscale('log')
        ax.set_yscale('log')
        sizes = sorted({tuple(r['input_size']) for r in rows if r['input_size'][0] == r['input_size'][1]})
        ax.set_xticks([h * w / 1e6 for h, w in sizes], [f'{h}x{w}' for h, w in sizes], rotation=45, fontsize=8)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        others = sorted({f'{h}x{w}' for h, w in (r['input_size'] for r in rows) if h != w})
        ax.set_xlabel('input (HxW), on a scale of pixel count' + (f'; x: {", ".join(others)}' if others else ''))
        ax.set_title(name)
        ax.grid(True, which='both', alpha=0.3)
    (axes[0] if len(shown) > 1 else axes).legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, dpi=110, format=figure_format(path))
    plt.close(fig)


def main(argv):
    args = get_args_parser().parse(argv)
    sizes = [parse_size(s) for s in args.sizes]
    labels = args.models or [m for m in MODELS if args.authors_file or not m.startswith('authors:')]
    unknown = [m for m in labels if m not in MODELS]
    if unknown:
        raise UsageError(f'unknown --models {", ".join(unknown)}; choose from {", ".join(MODELS)}')
    if any(m.startswith('authors:') for m in labels) and not args.authors_file:
        raise UsageError('authors:RAVLT_S needs --authors-file PATH/TO/RALA.py')
    for flag, path in (('--json', args.json), ('--figure', args.figure)):
        if path:
            check_output_file(path, flag)  # before the long run
    if args.figure and figure_format(args.figure) not in FIGURE_FORMATS:
        raise UsageError(f'--figure {args.figure}: name a file ending in .png, .svg or .pdf')
    if args.iters < 1:
        raise UsageError('--iters must be at least 1')
    for size in sizes:
        settings_at(args, size)  # every setting checked before the long run
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    authors = load_authors_module(args.authors_file, args.authors_path_extra) if args.authors_file else None
    rows = sweep(labels, sizes, args, authors)
    line = (
        f'{args.mode}, batch {args.batch_size}, float32, {torch.get_num_threads()} threads, '
        f'{args.warmup} warm-up + {args.iters} timed steps per model and size, torch {torch.__version__}'
    )
    print(line + '\n\n' + format_tables(rows, labels, sizes), flush=True)
    if args.json:
        with atomic_file(args.json, 'w') as f:
            json.dump(
                {'settings': {k: v for k, v in vars(args).items() if k != 'given'}, 'line': line, 'results': rows},
                f,
                indent=1,
            )
    if args.figure:
        draw(rows, labels, args.figure, line)
        print(f'figure: {args.figure}')
    return rows


if __name__ == '__main__':
    run_cli(main, sys.argv[1:])
