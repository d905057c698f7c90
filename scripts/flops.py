"""Parameters and FLOPs of RAVLT, counted with fvcore beside the paper's table.

The authors' convention: fvcore's FlopCountAnalysis, one multiply-add = one FLOP, element-wise work (activations,
softmax, RoPE) not counted, and `scaled_dot_product_attention` (unknown to fvcore) as its two matrix products; the
table gives the total with the attention matrix products (q.k^T, attn.v, the KV products) and without them.
--input-size is H [W]; --config takes main.py's configs (their model, model-kwargs and input-size; the training
keys are ignored); --task counts the dense models (the dense extra). The other measuring scripts count with this.

    python scripts/flops.py                       # all four variants at 224x224
    python scripts/flops.py --model RAVLT_S --input-size 512 768 --json
    python scripts/flops.py --model RAVLT_S --model-kwargs '{"attn_types": ["rala", "rala", "rala", "rala"]}'
    python scripts/flops.py --config configs/demo_digits.yaml
    python scripts/flops.py --task retinanet
"""

import json
import os
import sys
import warnings
from math import prod

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import torch

import models
from cli import COUNT, ArgumentParser, config_tokens, json_object, one_line_errors, read_config
from errors import UsageError
from model_factory import create_dense_model, create_model

warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated')  # raised by fvcore's import
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

# Operators that compute attention products (RAVLT has no linear layers, so these are all attention).
ATTENTION_OPS = ('matmul', 'bmm', 'einsum', 'mm', 'baddbmm', 'scaled_dot_product_attention')
TASKS = ('classification', 'retinanet', 'maskrcnn', 'semfpn', 'upernet')  # models/dense.py's DENSE_TASKS
CONFIG_KEYS = ('model', 'model-kwargs', 'input-size')  # what --config takes from main.py's configs


def dense():
    """models.dense, or a one-line UsageError saying how to install the dense extra."""
    try:
        import models.dense
    except ImportError as e:
        raise UsageError(f'the dense models need {e.name}: pip install -e ".[dense]"') from None
    return models.dense


def sdpa_flop_jit(inputs, outputs) -> int:
    """q.k^T and attn.v of scaled_dot_product_attention: B*h*Lq*Lk*(E + Ev) multiply-adds."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def count_flops(model: torch.nn.Module, inputs) -> dict:
    """fvcore FLOPs (multiply-adds) of model(inputs): in total, and of the attention products (ATTENTION_OPS)."""
    model.eval()
    analysis = (
        FlopCountAnalysis(model, inputs)
        .set_op_handle('aten::scaled_dot_product_attention', sdpa_flop_jit)
        .unsupported_ops_warnings(False)
        .uncalled_modules_warnings(False)
    )
    with torch.no_grad():
        by_operator = analysis.by_operator()
        return {'total': analysis.total(), 'attention': sum(v for k, v in by_operator.items() if k in ATTENTION_OPS)}


def input_size(values) -> tuple:
    """--input-size H [W] as (height, width)."""
    if len(values) > 2:
        raise UsageError(f'--input-size takes H or H W (height then width), got {len(values)} numbers')
    return values[0], values[-1]


def markdown_table(header, rows) -> str:
    """A Markdown table; None cells print as '-'."""
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join('-' if c is None else str(c) for c in row) + ' |' for row in rows])


def measure(name: str, size=(224, 224), task: str = 'classification', model_kwargs=None) -> dict:
    """Params and FLOPs of one model at batch 1: a classifier, or a dense model (models/dense.py) whose FLOPs
    count what the authors' mmdet / mmseg count (FlopsForward). `model_kwargs` go to the (backbone) model."""
    if task == 'classification':
        model = counted = create_model(name, model_kwargs)
    else:
        model = create_dense_model(task, name, model_kwargs=model_kwargs)
        counted = dense().FlopsForward(model)
    flops = count_flops(counted, torch.randn(1, 3, *size))
    row = {
        'model': name,
        'input_size': list(size),
        'params': sum(p.numel() for p in model.parameters()),
        'flops': flops['total'],
    }
    row['flops_no_attn'] = flops['total'] - flops['attention']
    return row if task == 'classification' else {'task': task, **row}


def format_table(rows, task: str = 'classification', modified: bool = False) -> str:
    """The table; `modified` (--model-kwargs given): the paper's columns do not apply."""
    published = models.PAPER_RESULTS if task == 'classification' else dense().DENSE_PUBLISHED[task]
    header = ['model', 'input', 'params (M)', 'GFLOPs', 'GFLOPs w/o attn products', 'paper params (M)', 'paper GFLOPs']
    cells = []
    for r in rows:
        paper = {} if modified else published.get(models.resolve_model_name(r['model']), {})
        size, values = f'{r["input_size"][0]}x{r["input_size"][1]}', (r['flops'] / 1e9, r['flops_no_attn'] / 1e9)
        cells.append([r['model'], size, f'{r["params"] / 1e6:.2f}', *(f'{v:.3f}' for v in values)])
        cells[-1] += [paper.get('params'), paper.get('gflops')]
    return markdown_table(header, cells)


def get_args_parser():
    parser = ArgumentParser('flops.py', description=__doc__.split('\n\n')[0], with_config=False)
    parser.add_argument('--model', nargs='+', default=['RAVLT_T', 'RAVLT_S', 'RAVLT_B', 'RAVLT_L'], help='or timm')
    parser.add_argument('--model-kwargs', type=json_object, default=None, metavar='JSON', help='for every model')
    sizes = 'height [width]; without it 224, for detection 800 1280, for segmentation 512 2048'
    parser.add_argument('--input-size', nargs='+', type=COUNT, default=None, metavar=('H', 'W'), help=sizes)
    parser.add_argument('--task', default='classification', choices=TASKS, help='a classifier or a dense model')
    parser.add_argument('--config', default='', help='a main.py config: its model, model-kwargs and input-size')
    parser.add_argument('--json', action='store_true', help='print a JSON list instead of a table')
    return parser


def main(args) -> list:
    if args.config:  # the flags it gives that the command line does not
        parser = get_args_parser()
        values = {k: v for k, v in read_config(args.config).items() if k in CONFIG_KEYS}
        from_config = parser.parse_args(config_tokens(values, parser, args.config))
        for dest in from_config.given - args.given:
            setattr(args, dest, getattr(from_config, dest))
    if args.input_size:
        size = input_size(args.input_size)
    else:
        size = (224, 224) if args.task == 'classification' else dense().DENSE_INPUT_SIZE[args.task]
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
    with one_line_errors():
        main(get_args_parser().parse_args())
