#!/usr/bin/env python
"""Training curves of one or more runs in one PNG: train loss, learning rate, and whatever metrics the runs
evaluated: test acc@1 and EMA acc@1 (main.py), box and mask AP (main_det.py), mIoU (main_seg.py), per epoch.

Each run is an output folder holding `log.txt` (one JSON object per epoch). A panel appears when some run
logged its metric; a run that did not (e.g. no EMA) has no curve in it; `null` values (a metric COCO could not
apply) are gaps. When an epoch was logged twice, the later line counts.

    python scripts/plot_logs.py output/run_a [output/run_b ...] [--labels a b] [--output curves.png]
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from cli import ArgumentParser, run_cli
from errors import UsageError
from utils import atomic_file, check_output_file

PANELS = [  # (log key, title)
    ('train_loss', 'train loss'),
    ('train_lr', 'learning rate'),
    ('test_acc1', 'test acc@1 (%)'),
    ('test_ema_acc1', 'EMA test acc@1 (%)'),
    ('test_bbox_AP', 'box AP (%)'),
    ('test_segm_AP', 'mask AP (%)'),
    ('test_mIoU', 'mIoU (%)'),
]


def get_args_parser():
    parser = ArgumentParser('plot_logs.py', description='Plot training curves from log.txt', with_config=False)
    parser.add_argument('runs', nargs='+', help='output folders, each with a log.txt')
    parser.add_argument('--labels', nargs='+', default=None, help='one legend label per run (default: folder names)')
    parser.add_argument('--output', default='', help='PNG to write (default: curves.png in the first run folder)')
    return parser


def read_log(run):
    """{epoch: log entry} from run/log.txt; a missing folder or log, or a line that is no log entry, is a
    one-line UsageError."""
    log = Path(run) / 'log.txt'
    if not Path(run).is_dir():
        raise UsageError(f'{run} is not a folder; pass the output folders of training runs')
    if not log.is_file():
        raise UsageError(f'{log} does not exist; pass a training output folder (main.py --output_dir)')
    epochs = {}
    for number, line in enumerate(log.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f'{log} line {number} is not JSON ({e.msg})') from None
        if not isinstance(entry, dict) or not isinstance(entry.get('epoch'), int):
            raise UsageError(f'{log} line {number} has no integer "epoch"')
        epochs[entry['epoch']] = entry
    if not epochs:
        raise UsageError(f'{log} is empty; the run has not finished an epoch yet')
    return dict(sorted(epochs.items()))


def logged_panels(logs) -> list:
    """The PANELS some run logged."""
    return [(key, title) for key, title in PANELS if any(key in entry for log in logs for entry in log.values())]


def plot(logs, labels, path):
    panels = logged_panels(logs)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for run, (log, label) in enumerate(zip(logs, labels)):
            points = [(epoch, entry[key]) for epoch, entry in log.items() if key in entry]
            values = [(e, v if isinstance(v, (int, float)) else float('nan')) for e, v in points]
            if values:  # a run keeps its colour across panels even where another run has no curve
                ax.plot(*zip(*values), color=f'C{run}', marker='.' if len(values) < 30 else None, label=label)
        ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel('epoch')
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, dpi=100, format='png')
    plt.close(fig)


def best(log: dict, key: str):
    values = [e[key] for e in log.values() if isinstance(e.get(key), (int, float))]
    return max(values) if values else None


def main(args):
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise UsageError(f'{len(args.labels)} --labels for {len(args.runs)} runs; give one label per run or none')
    logs = [read_log(run) for run in args.runs]
    labels = args.labels or [Path(run).resolve().name for run in args.runs]
    output = Path(args.output) if args.output else Path(args.runs[0]) / 'curves.png'
    check_output_file(output, '--output')
    plot(logs, labels, output)
    for label, log in zip(labels, logs):
        found = [
            f'best {title.split(" (")[0]} {best(log, key):.2f}'
            for key, title in PANELS[2:]
            if best(log, key) is not None
        ]
        print(f'{label}: {len(log)} epochs' + ''.join(f', {f}' for f in found))
    print(f'wrote {output}')


if __name__ == '__main__':
    run_cli(lambda argv: main(get_args_parser().parse(argv)), sys.argv[1:])
