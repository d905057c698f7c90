"""Whether two training checkpoints are bit-identical (the same epoch and step; every tensor of the weights, the
EMA weights and the optimizer state equal): e.g. a run stopped and resumed against one never stopped.

    python scripts/compare_checkpoints.py out_a/checkpoint.pth out_b/checkpoint.pth

Prints "bit-identical", exit code 0; or what differs first (and how many tensors differ), exit code 1."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import checkpoints
import cli


def tensors(checkpoint: dict) -> dict:
    """{name: tensor} of the weights, the EMA weights and the optimizer state."""
    found = {f'model.{k}': v for k, v in checkpoint.get('model', {}).items()}
    found.update({f'model_ema.{k}': v for k, v in (checkpoint.get('model_ema') or {}).items()})
    for index, state in checkpoint.get('optimizer', {}).get('state', {}).items():
        found.update({f'optimizer.{index}.{k}': v for k, v in state.items() if isinstance(v, torch.Tensor)})
    return found


def differences(a: dict, b: dict) -> list:
    """What differs between two checkpoints, one line each (empty: bit-identical)."""
    found = [f'{key}: {a.get(key)} vs {b.get(key)}' for key in ('epoch', 'step') if a.get(key) != b.get(key)]
    ta, tb = tensors(a), tensors(b)
    found += [f'{name}: only in one' for name in sorted(set(ta) ^ set(tb))]
    found += [
        f'{name}: differs (largest difference {(ta[name].double() - tb[name].double()).abs().max():.3g})'
        for name in ta
        if name in tb and not torch.equal(ta[name], tb[name])
    ]
    return found


def command(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('checkpoints', nargs=2, metavar='CHECKPOINT')
    args = parser.parse_args(argv)
    found = differences(*(checkpoints.load_checkpoint(path) for path in args.checkpoints))
    if found:
        print(f'{len(found)} differences; first: {found[0]}')
        sys.exit(1)
    print('bit-identical')


if __name__ == '__main__':
    with cli.one_line_errors():
        command()
