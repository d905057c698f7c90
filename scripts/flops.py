"""Parameters and FLOPs of RAVLT, counted with fvcore beside the paper's table.

Convention (the authors'): fvcore's FlopCountAnalysis with its default handles, where one multiply-add
counts as one FLOP; element-wise work (activations, softmax, RoPE) is not counted. We report the total
with the attention matrix products (q.k^T, attn.v, the linear-attention KV products) and without them
(convolutions, norms and pooling only). fvcore does not know `scaled_dot_product_attention`, which our
softmax blocks call, so it is counted (profiling.py) as its two matrix products.

    python scripts/flops.py                       # all four variants at 224x224
    python scripts/flops.py --model RAVLT_S --input-size 384
    python scripts/flops.py --input-size 512 768 --json           # height 512, width 768
    python scripts/flops.py --model RAVLT_S --model-kwargs '{"attn_types": ["rala", "rala", "rala", "rala"]}'

Sizes are `--input-size H [W]`: height then width, one number for a square input.
"""

import json
import sys

import timm
import torch

import models
from cli import ArgumentParser, json_object, run_cli
from errors import UsageError
from model_factory import create_dense_model, create_model
from models.dense import DENSE_INPUT_SIZE, DENSE_PUBLISHED, DENSE_TASKS, FlopsForward
from profiling import count_flops, count_params


def measure(name: str, input_size=(224, 224), task: str = 'classification', model_kwargs=None) -> dict:
    """Params and FLOPs of one model at batch 1: a classifier, or a dense model (models/dense.py) whose
    FLOPs count what the authors' mmdet / mmseg count (FlopsForward). `model_kwargs` go to
    timm.create_model (to the backbone of a dense model)."""
    if task == 'classification':
        model = counted = create_model(name, model_kwargs)
    else:
        model = create_dense_model(task, name, model_kwargs=model_kwargs)
        counted = FlopsForward(model)
    flops = count_flops(counted, torch.randn(1, 3, *input_size))
    row = {
        'model': name,
        'input_size': list(input_size),
        'params': count_params(model),
        'flops': flops['total'],
        'flops_no_attn': flops['total'] - flops['attention'],
    }
    return row if task == 'classification' else {'task': task, **row}


def format_table(rows, task: str = 'classification', modified: bool = False) -> str:
    """The table; `modified` (--model-kwargs given): the paper's columns do not apply."""
    lines = [
        '| model | input | params (M) | GFLOPs | GFLOPs w/o attn products | paper params (M) | paper GFLOPs |',
        '|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        if modified:
            paper = ('-', '-')
        elif task == 'classification':
            published = models.PAPER_RESULTS.get(models.resolve_model_name(r['model']), {})
            paper = (published.get('params', '-'), published.get('gflops', '-'))
        else:
            published = DENSE_PUBLISHED[task].get(models.resolve_model_name(r['model']), {})
            paper = (published.get('params', '-'), published.get('gflops') or '-')
        lines.append(
            f'| {r["model"]} | {r["input_size"][0]}x{r["input_size"][1]} | {r["params"] / 1e6:.2f} | '
            f'{r["flops"] / 1e9:.3f} | {r["flops_no_attn"] / 1e9:.3f} | {paper[0]} | {paper[1]} |'
        )
    return '\n'.join(lines)


def get_args_parser():
    parser = ArgumentParser('RAVLT params and FLOPs', add_help=True)
    parser.add_argument(
        '--model',
        nargs='+',
        default=['RAVLT_T', 'RAVLT_S', 'RAVLT_B', 'RAVLT_L'],
        help='RAVLT_T ... RAVLT_L, ravlt_t ... or any timm model name',
    )
    parser.add_argument(
        '--model-kwargs',
        type=json_object,
        default=None,
        help='JSON object passed to timm.create_model for every model, e.g. \'{"depths": [1, 1, 2, 1]}\'',
    )
    parser.add_argument(
        '--input-size',
        nargs='+',
        type=int,
        default=None,
        metavar='H [W]',
        help='exact input size, height then width (one number for a square input; default 224, '
        'for detection 800 1280, for segmentation 512 2048)',
    )
    parser.add_argument(
        '--task',
        default='classification',
        choices=('classification',) + DENSE_TASKS,
        help='count a classifier or a RetinaNet / Mask R-CNN / Semantic FPN / UperNet model',
    )
    parser.add_argument('--json', action='store_true', help='print a JSON list instead of a table')
    return parser


def main(argv) -> list:
    args = get_args_parser().parse(argv)
    if args.input_size is not None and (len(args.input_size) > 2 or min(args.input_size) < 1):
        raise UsageError('--input-size takes one or two positive integers (H [W], height then width)')
    size = (args.input_size[0], args.input_size[-1]) if args.input_size else DENSE_INPUT_SIZE.get(args.task, (224, 224))
    known = set(timm.list_models()) if args.task == 'classification' else set(models.RAVLT_CONFIGS)
    unknown = [m for m in args.model if models.resolve_model_name(m) not in known]
    if unknown:
        raise UsageError(
            f'unknown model(s) {", ".join(unknown)}; choose RAVLT_T, RAVLT_S, RAVLT_B, RAVLT_L or a timm model name'
        )
    rows = [measure(m, size, args.task, args.model_kwargs) for m in args.model]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows, args.task, modified=bool(args.model_kwargs)))
        print(
            "\nFLOPs: fvcore, one multiply-add = one FLOP, element-wise ops not counted; the paper's "
            'figures sit near the column without the attention matrix products.'
        )
    return rows


if __name__ == '__main__':
    run_cli(main, sys.argv[1:])
