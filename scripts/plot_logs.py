#!/usr/bin/env python
"""Training curves (train loss, learning rate, test acc@1, EMA acc@1 per epoch) of one or more runs in one PNG.

Each run is an output folder of main.py holding `log.txt` (one JSON object per epoch). Keys a run did not
log (e.g. no EMA) leave its curve out. When a resumed run logged an epoch twice, the later line counts.

    python scripts/plot_logs.py output/run_a [output/run_b ...] [--labels a b] [--output curves.png]
"""
import argparse
import json
import os
import sys
from pathlib import Path

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

PANELS = [  # (log key, title)
    ('train_loss', 'train loss'),
    ('train_lr', 'learning rate'),
    ('test_acc1', 'test acc@1 (%)'),
    ('test_ema_acc1', 'EMA test acc@1 (%)'),
]


def get_args_parser():
    parser = argparse.ArgumentParser('Plot training curves from log.txt', add_help=True)
    parser.add_argument('runs', nargs='+', help='output folders, each with a log.txt')
    parser.add_argument('--labels', nargs='+', default=None, help='one legend label per run (default: folder names)')
    parser.add_argument('--output', default='', help='PNG to write (default: curves.png in the first run folder)')
    return parser


def fail(message):
    """Bad input: one line on stderr and exit code 2, as utils.run_cli does (without importing torch)."""
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def read_log(run):
    """{epoch: log entry} from run/log.txt; exits with one line if the folder or log is missing or invalid."""
    log = Path(run) / 'log.txt'
    if not Path(run).is_dir():
        fail(f'{run} is not a folder; pass the output folders of training runs')
    if not log.is_file():
        fail(f'{log} does not exist; pass a training output folder (main.py --output_dir)')
    epochs = {}
    for number, line in enumerate(log.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f'{log} line {number} is not JSON ({e.msg})')
        if not isinstance(entry, dict) or not isinstance(entry.get('epoch'), int):
            fail(f'{log} line {number} has no integer "epoch"')
        epochs[entry['epoch']] = entry
    if not epochs:
        fail(f'{log} is empty; the run has not finished an epoch yet')
    return dict(sorted(epochs.items()))


def write_atomic(path, write):
    """Call write(temporary path) for a file in path's folder, then rename it to path, so an existing file
    is never left half-written. (Not tempfile.mkstemp: its files are private, mode 0600.)"""
    tmp = path.with_name(f'.{path.stem}.{os.getpid()}.tmp{path.suffix}')
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def plot(logs, labels, path):
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.5 * len(PANELS), 3.8))
    for ax, (key, title) in zip(axes, PANELS):
        for run, (log, label) in enumerate(zip(logs, labels)):
            points = [(epoch, entry[key]) for epoch, entry in log.items() if isinstance(entry.get(key), (int, float))]
            if points:  # a run keeps its colour across panels even where another run has no curve
                ax.plot(*zip(*points), color=f'C{run}', marker='.' if len(points) < 30 else None, label=label)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f'no "{key}" in the logs', ha='center', va='center', transform=ax.transAxes)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel('epoch')
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format='png'))
    plt.close(fig)


def main(args):
    if args.labels is not None and len(args.labels) != len(args.runs):
        fail(f'{len(args.labels)} --labels for {len(args.runs)} runs; give one label per run or none')
    logs = [read_log(run) for run in args.runs]
    labels = args.labels or [Path(run).resolve().name for run in args.runs]
    output = Path(args.output) if args.output else Path(args.runs[0]) / 'curves.png'
    if not output.parent.is_dir():
        fail(f'the folder of --output {output} does not exist')
    if output.is_dir():
        fail(f'--output {output} is a folder; give a file name such as {output / "curves.png"}')
    plot(logs, labels, output)
    for label, log in zip(labels, logs):
        last = log[max(log)]
        best = max((e['test_acc1'] for e in log.values() if isinstance(e.get('test_acc1'), (int, float))), default=None)
        print(f'{label}: {len(log)} epochs' + ('' if best is None else f', best test acc@1 {best:.2f}%')
              + ('' if 'test_ema_acc1' not in last else f", last EMA acc@1 {last['test_ema_acc1']:.2f}%"))
    print(f'wrote {output}')


if __name__ == '__main__':
    main(get_args_parser().parse_args())
