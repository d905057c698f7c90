"""Export a RAVLT classifier (or any timm model) to ONNX, then check ONNX Runtime against PyTorch.

The graph comes from `torch.onnx.export(..., dynamo=True)` (torch.export, then ONNX) of the eval model after
`timm.utils.reparameterize_model`. Its input `image` (float32, N x 3 x H x W) has a dynamic batch and a
dynamic height and width, each a multiple of 32 (RAVLT's total stride); its output is `logits`. The file is
checked before it is kept: ONNX Runtime and PyTorch run the same random input at two sizes (different batch,
height and width), and the relative difference ||ort - torch|| / ||torch|| of the logits must stay within
`--tolerance` (1e-5 in float32). Only a file that passes is written to `--output`.

    python scripts/export_onnx.py --checkpoint RAVLT_S.pth --output ravlt_s.onnx
    python scripts/export_onnx.py --checkpoint out/checkpoint.pth --ema --output ravlt_s_ema.onnx
    python scripts/export_onnx.py --model RAVLT_T --model-kwargs '{"attn_types": ["rala", "rala", "rala", "rala"]}' \
        --output ravlt_t_linear.onnx

Weights: our checkpoints (`model`, or `model_ema` with `--ema`), the authors' files, raw state dicts, with
or without `module.` prefixes; without `--checkpoint` the model keeps its random initialisation. The
model, its --model-kwargs and its class count come from the checkpoint (as `main.py --eval` takes them) unless
the command line gives them.
Needs the optional `onnx` extra (onnx, onnxruntime, onnxscript). Sizes are `--check-sizes H [W]` pairs
(height then width).
"""

import os
import shutil
import sys
import tempfile
import time

from checkpoints import load_checkpoint
from cli import NON_NEGATIVE, ArgumentParser, json_object, run_cli
from deploy import INPUT_NAME, OUTPUT_NAME, STRIDE, create_session, export, import_onnxruntime, relative_difference
from errors import UsageError
from model_factory import create_model, for_inference, model_from_checkpoint
from utils import atomic_file, check_output_file

DEFAULT_MODEL = 'RAVLT_S'


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser('Export a RAVLT model to ONNX', add_help=True)
    parser.add_argument(
        '--model',
        default=None,
        help=f"RAVLT_T ... RAVLT_L, ravlt_t ... or a timm model name (default: the checkpoint's, else {DEFAULT_MODEL})",
    )
    parser.add_argument('--checkpoint', default='', help="weights: ours, the authors' or a raw state dict")
    parser.add_argument('--ema', action='store_true', help="export the checkpoint's EMA weights (model_ema)")
    parser.add_argument(
        '--model-kwargs',
        type=json_object,
        default=None,
        help='JSON object passed to timm.create_model, e.g. \'{"depths": [1, 1, 2, 1]}\'',
    )
    parser.add_argument('--output', required=True, help='the .onnx file to write')
    parser.add_argument(
        '--check-sizes',
        type=int,
        nargs='+',
        default=[224, 224, 160, 256],
        metavar='H W',
        help='input sizes of the ONNX Runtime check, height then width, as pairs (multiples of '
        f'{STRIDE}); default 224 224 160 256',
    )
    parser.add_argument(
        '--tolerance',
        type=NON_NEGATIVE,
        default=1e-5,
        help='largest relative difference of the logits accepted between ONNX Runtime and PyTorch',
    )
    return parser


def build_model(args, parser):
    """(the inference form of the model, its name): with --checkpoint, the checkpoint's model, keyword arguments
    (checked as `parser` checks --model and --model-kwargs) and class count unless --model / --model-kwargs are
    given, as `main.py --eval` takes them; else --model."""
    if args.checkpoint:
        model, name = model_from_checkpoint(
            load_checkpoint(args.checkpoint),
            args.checkpoint,
            args.model,
            args.model_kwargs,
            ema=args.ema,
            parser=parser,
        )
    else:
        name = args.model or DEFAULT_MODEL
        model = create_model(name, args.model_kwargs)
    return for_inference(model, inplace=True), name


def check_sizes(values) -> list:
    if len(values) % 2 or not values:
        raise UsageError(f'--check-sizes takes pairs H W (height then width), got {len(values)} numbers')
    sizes = [tuple(values[i : i + 2]) for i in range(0, len(values), 2)]
    bad = [f'{h}x{w}' for h, w in sizes if h < STRIDE or w < STRIDE or h % STRIDE or w % STRIDE]
    if bad:
        raise UsageError(f'--check-sizes {", ".join(bad)}: height and width must be positive multiples of {STRIDE}')
    return sizes


def main(argv) -> None:
    parser = get_args_parser()
    args = parser.parse(argv)
    sizes = check_sizes(args.check_sizes)
    if not args.output.endswith('.onnx'):
        raise UsageError(f'--output {args.output!r} should end in .onnx')
    check_output_file(args.output, '--output')  # before the long export
    if args.ema and not args.checkpoint:
        raise UsageError('--ema needs --checkpoint')
    import_onnxruntime()  # before the long export: fail early when the extra is missing
    model, name = build_model(args, parser)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='ravlt_export_') as folder:
        temporary = os.path.join(folder, 'model.onnx')
        export(model, temporary)
        print(
            f'exported {name} in {time.perf_counter() - start:.0f} s; checking ONNX Runtime against PyTorch', flush=True
        )
        session = create_session(temporary)
        shape = session.get_inputs()[0].shape  # symbolic dimensions are names, fixed ones numbers
        fixed = [name for name, i in (('batch', 0), ('height', 2), ('width', 3)) if not isinstance(shape[i], str)]
        if fixed:
            raise UsageError(
                f'the exported graph has a fixed {" and ".join(fixed)}: {name} does not take '
                'other sizes (its code checks or uses them as constants)'
            )
        for i, size in enumerate(sizes):
            batch = 2 - i % 2  # batches 2 and 1: the batch is dynamic too
            diff = relative_difference(model, session, size, batch)
            print(f'batch {batch}, {size[0]}x{size[1]}: relative difference {diff:.2e}', flush=True)
            if not diff <= args.tolerance:
                raise UsageError(
                    f'ONNX Runtime differs from PyTorch by {diff:.2e} (relative) at batch {batch}, '
                    f'{size[0]}x{size[1]}, above --tolerance {args.tolerance:g}; nothing written'
                )
        with open(temporary, 'rb') as source, atomic_file(args.output) as f:
            shutil.copyfileobj(source, f)
        megabytes = os.path.getsize(temporary) / 2**20
    print(
        f'wrote {args.output} ({megabytes:.1f} MiB): input {INPUT_NAME!r} float32 N x 3 x H x W (N, H, W dynamic; '
        f'H and W multiples of {STRIDE}), output {OUTPUT_NAME!r}'
    )


if __name__ == '__main__':
    run_cli(main, sys.argv[1:])
