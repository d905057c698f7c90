"""Count the host synchronisations of training steps on CUDA, and where in the code they happen.

Runs main.py in this process with the flags after `--`, with torch's CUDA sync debug mode on during each
training epoch (engine.train_one_epoch), and writes the count, the steps, the budget and the places
(file:line of the synchronising call) to the --json file. Exits 1 when there were more synchronisations than
the budget: one per --print-freq steps and one at each epoch's end.

    python scripts/host_syncs.py --json out/host_syncs.json -- --model RAVLT_T --data-set FAKE --device cuda ...
"""

import collections
import json
import math
import os
import runpy
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository's modules

import torch

import engine
from cli import ArgumentParser, one_line_errors
from errors import UsageError
from utils import atomic_file, check_output_file


def count(argv) -> dict:
    """Train main.py with `argv`, counting the synchronisations inside each engine.train_one_epoch."""
    train_one_epoch = engine.train_one_epoch
    places, epochs, print_freqs = collections.Counter(), [], set()

    def counted_epoch(*args, **kwargs):
        print_freqs.add(kwargs['print_freq'])
        cuda = torch.cuda.is_available()  # the debug mode is CUDA's: on the CPU nothing is counted
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            if cuda:
                torch.cuda.set_sync_debug_mode('warn')  # a warning at each synchronising call
            try:
                result = train_one_epoch(*args, **kwargs)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode('default')
        syncs = [w for w in caught if 'synchroniz' in str(w.message)]
        places.update(f'{os.path.relpath(w.filename, ROOT)}:{w.lineno}' for w in syncs)
        epochs.append({'steps': result.steps - kwargs.get('first_step', 0), 'syncs': len(syncs)})
        return result

    engine.train_one_epoch = counted_epoch  # run.py calls engine.train_one_epoch: this one
    argv_before, sys.argv = sys.argv, [os.path.join(ROOT, 'main.py'), *argv]
    try:
        runpy.run_path(sys.argv[0], run_name='__main__')
    finally:
        engine.train_one_epoch, sys.argv = train_one_epoch, argv_before
    (print_freq,) = print_freqs
    return {
        'steps': sum(e['steps'] for e in epochs),
        'syncs': sum(places.values()),
        'budget': sum(math.ceil(e['steps'] / print_freq) + 1 for e in epochs),
        'print_freq': print_freq,
        'epochs': epochs,
        'where': dict(places.most_common()),
    }


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser('host_syncs.py', description=__doc__.split('\n\n')[0], with_config=False)
    parser.add_argument('--json', required=True, help='the .json file of the counts')
    parser.add_argument('argv', nargs='*', metavar='-- MAIN_PY_FLAGS', help="main.py's flags, after --")
    return parser


def main(args):
    check_output_file(args.json, '--json', suffixes=('.json',))
    if not torch.cuda.is_available():
        raise UsageError('no CUDA device is visible; this counts CUDA synchronisations')
    counts = count(args.argv)
    with atomic_file(args.json, 'w') as f:
        json.dump(counts, f, indent=2)
    print(json.dumps(counts))
    if counts['syncs'] > counts['budget']:
        sys.exit(
            f'error: {counts["syncs"]} host synchronisations in {counts["steps"]} steps, more than '
            f'{counts["budget"]} (one per --print-freq {counts["print_freq"]} steps and one per epoch)'
        )


if __name__ == '__main__':
    with one_line_errors():
        main(get_args_parser().parse_args())
