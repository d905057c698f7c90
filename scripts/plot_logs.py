"""Training curves of one or more runs in one PNG, per epoch: train loss, learning rate, and the metrics the
runs evaluated (test acc@1 and EMA acc@1 of main.py, box and mask AP of main_det.py, mIoU of main_seg.py).

Each run is an output folder holding `log.txt` (one JSON object per epoch). A panel appears when some run logged
its metric; `null` values (a metric COCO could not apply) are gaps; an epoch logged twice counts its later line.

    python scripts/plot_logs.py output/run_a [output/run_b ...] [--labels a b] [--output curves.png]
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import figures
from cli import ArgumentParser, one_line_errors
from errors import UsageError
from utils import check_output_file

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
    parser = ArgumentParser('plot_logs.py', description=__doc__.split('\n\n')[0], with_config=False)
    parser.add_argument('runs', nargs='+', help='output folders, each with a log.txt')
    parser.add_argument('--labels', nargs='+', default=None, help='one legend label per run (default: folder names)')
    parser.add_argument('--output', default='', help='the .png to write (default: curves.png in the first run)')
    return parser


def read_log(run) -> dict:
    """{epoch: log entry} from run/log.txt; a missing log or a line that is no log entry is a one-line UsageError."""
    log = Path(run) / 'log.txt'
    if not log.is_file():
        raise UsageError(f'{log} does not exist; pass the output folders of training runs (--output_dir)')
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
    plt = figures.pyplot()
    panels = logged_panels(logs)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for run, (log, label) in enumerate(zip(logs, labels)):
            values = [(epoch, entry[key]) for epoch, entry in log.items() if key in entry]
            values = [(e, v if isinstance(v, (int, float)) else float('nan')) for e, v in values]
            if values:  # a run keeps its colour across panels even where another run has no curve
                ax.plot(*zip(*values), color=f'C{run}', marker='.' if len(values) < 30 else None, label=label)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(title)
        ax.set_xlabel('epoch')
    fig.tight_layout()
    figures.save(fig, path)


def best(log: dict, key: str):
    values = [e[key] for e in log.values() if isinstance(e.get(key), (int, float))]
    return max(values) if values else None


def main(args):
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise UsageError(f'{len(args.labels)} --labels for {len(args.runs)} runs; give one label per run or none')
    logs = [read_log(run) for run in args.runs]
    output = args.output or os.path.join(args.runs[0], 'curves.png')
    check_output_file(output, '--output', suffixes=('.png',))
    labels = args.labels or [Path(run).resolve().name for run in args.runs]
    plot(logs, labels, output)
    for label, log in zip(labels, logs):
        bests = {title.split(' (')[0]: best(log, key) for key, title in PANELS[2:]}
        print(f'{label}: {len(log)} epochs' + ''.join(f', best {k} {v:.2f}' for k, v in bests.items() if v is not None))
    print(f'wrote {output}')


if __name__ == '__main__':
    with one_line_errors():
        main(get_args_parser().parse_args())
