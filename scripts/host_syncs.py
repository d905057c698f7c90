"""Count the host synchronisations of training steps on CUDA: runs main.py as a script (in this process, one
process, the flags after `--`) with torch's CUDA sync debug mode on during each training epoch, and writes how many
synchronising calls there were, per step and where (file:line of the Python caller), to a JSON file.

    python scripts/host_syncs.py --json out/host_syncs.json -- --model RAVLT_T --data-set FAKE --device cuda ...

Exits 1 when there were more than one per --print-freq steps (and one at the epoch's end), the run's budget."""

import argparse
import collections
import json
import math
import os
import runpy
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if __name__ == '__main__':  # as main.py does, before the libraries load (allocator.py)
    from allocator import keep_freed_memory

    keep_freed_memory()

import torch

import engine
from utils import atomic_file


def count(argv) -> dict:
    """Train main.py with `argv`, counting synchronisations inside engine.train_one_epoch."""
    train_one_epoch, optimizer_step = engine.train_one_epoch, engine.optimizer_step
    places, steps, epochs, print_freqs = collections.Counter(), [0], [], set()

    def counted_step(*args, **kwargs):
        steps[0] += 1
        return optimizer_step(*args, **kwargs)

    def counted_epoch(*args, **kwargs):
        print_freqs.add(kwargs['print_freq'])
        before = sum(places.values())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
            try:
                result = train_one_epoch(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode('default')
        for warning in caught:
            if 'synchronizing' in str(warning.message):
                places[f'{os.path.relpath(warning.filename)}:{warning.lineno}'] += 1
        epochs.append({'steps': result.steps - kwargs.get('first_step', 0), 'syncs': sum(places.values()) - before})
        return result

    engine.train_one_epoch, engine.optimizer_step = counted_epoch, counted_step
    argv_before = sys.argv
    sys.argv = [os.path.join(ROOT, 'main.py'), *argv]
    try:
        runpy.run_path(sys.argv[0], run_name='__main__')  # main.py's engine is the one patched here
    finally:
        engine.train_one_epoch, engine.optimizer_step = train_one_epoch, optimizer_step
        sys.argv = argv_before
    (print_freq,) = print_freqs
    budget = sum(math.ceil(e['steps'] / print_freq) + 1 for e in epochs)
    return {
        'steps': steps[0],
        'syncs': sum(places.values()),
        'budget': budget,
        'print_freq': print_freq,
        'epochs': epochs,
        'where': dict(places.most_common()),
    }


def command(args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--json', required=True, help='where to write the counts')
    parser.add_argument('argv', nargs=argparse.REMAINDER, help='-- then main.py flags')
    args = parser.parse_args(args)
    if not torch.cuda.is_available():
        sys.exit('error: no CUDA device is visible; this counts CUDA synchronisations')
    argv = args.argv[1:] if args.argv[:1] == ['--'] else args.argv
    counts = count(argv)
    with atomic_file(args.json, 'w') as f:
        json.dump(counts, f, indent=2)
    print(json.dumps(counts))
    if counts['syncs'] > counts['budget']:
        sys.exit(
            f'error: {counts["syncs"]} host synchronisations in {counts["steps"]} steps, more than '
            f'{counts["budget"]} (one per --print-freq {counts["print_freq"]} steps and one per epoch)'
        )


if __name__ == '__main__':
    command()
