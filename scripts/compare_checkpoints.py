"""Whether two checkpoints are bit-identical: e.g. a run stopped and resumed against one never stopped.

Compared: the epoch and step, and every tensor in the files (weights, EMA weights, optimizer and loss-scaler
state; a raw state dict's tensors), bit for bit (a NaN equals a NaN with the same bits). The flags (`args`) are
not compared: they name the output folder. Prints "bit-identical" and exits 0, or says how many entries differ
and what differs first, and exits 1.

    python scripts/compare_checkpoints.py out_a/checkpoint.pth out_b/checkpoint.pth
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import torch

from checkpoints import load_checkpoint
from cli import ArgumentParser, one_line_errors


def tensors(value, name: str = '') -> dict:
    """{path: tensor} of every tensor in nested dicts, lists and tuples (`args` left out)."""
    if isinstance(value, torch.Tensor):
        return {name: value}
    if isinstance(value, dict):
        items = [(k, v) for k, v in value.items() if not (name == '' and k == 'args')]
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    else:
        return {}
    return {path: t for k, v in items for path, t in tensors(v, f'{name}.{k}' if name else str(k)).items()}


def differences(a: dict, b: dict) -> list:
    """What differs between two checkpoints, one line each (empty: bit-identical)."""
    found = [f'{key}: {a.get(key)} vs {b.get(key)}' for key in ('epoch', 'step') if a.get(key) != b.get(key)]
    ta, tb = tensors(a), tensors(b)
    found += [f'{name}: only in {"the first" if name in ta else "the second"}' for name in sorted(set(ta) ^ set(tb))]
    for name in [n for n in ta if n in tb]:
        x, y = ta[name], tb[name]
        if (x.dtype, x.shape) != (y.dtype, y.shape):
            found.append(f'{name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}')
        elif not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):  # the same bits?
            found.append(f'{name}: differs (largest difference {(x.double() - y.double()).abs().max():.3g})')
    return found


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser('compare_checkpoints.py', description=__doc__.split('\n\n')[0], with_config=False)
    parser.add_argument('checkpoints', nargs=2, metavar='CHECKPOINT')
    return parser


def main(args):
    found = differences(*(load_checkpoint(path) for path in args.checkpoints))
    if found:
        print(f'{len(found)} difference{"s" if len(found) > 1 else ""}; first: {found[0]}')
        sys.exit(1)
    print('bit-identical')


if __name__ == '__main__':
    with one_line_errors():
        main(get_args_parser().parse_args())
