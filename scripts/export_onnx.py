"""Export a RAVLT classifier (or any timm model) to ONNX, then check ONNX Runtime against PyTorch.

The graph comes from `torch.onnx.export(..., dynamo=True)` of the model's inference form: input `image` (float32,
N x 3 x H x W; N, H and W dynamic, H and W multiples of 32), output `logits`. Before the file is kept, ONNX Runtime
and PyTorch run the same random input at the --check-sizes (batches 2 and 1), and the relative difference of the
logits must stay within --tolerance. Weights: our checkpoints (`model`, or `model_ema` with --ema), the authors'
files or raw state dicts, whose model, --model-kwargs and class count apply unless given; without --checkpoint,
random. Needs onnx, onnxruntime and onnxscript (pip install -e ".[onnx]"). The benchmark's onnxruntime backend
uses this file's export and sessions.

    python scripts/export_onnx.py --checkpoint RAVLT_S.pth --output ravlt_s.onnx
    python scripts/export_onnx.py --checkpoint out/checkpoint.pth --ema --output ravlt_s_ema.onnx
    python scripts/export_onnx.py --model RAVLT_T --model-kwargs '{"attn_types": ["rala", "rala", "rala", "rala"]}' \
        --output ravlt_t_linear.onnx
"""

import os
import shutil
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import torch

from checkpoints import load_checkpoint
from cli import COUNT, NON_NEGATIVE, ArgumentParser, json_object, one_line_errors
from errors import UsageError
from model_factory import create_model, inference_form, model_from_checkpoint
from utils import atomic_file, check_output_file

STRIDE = 32  # RAVLT's total stride: the exported height and width are multiples of it
INPUT_NAME, OUTPUT_NAME = 'image', 'logits'


def import_onnxruntime():
    """onnxruntime, once onnx, onnxscript (the exporter's) and onnxruntime import; else a one-line UsageError."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UsageError(
            f'ONNX needs the optional packages onnx, onnxruntime and onnxscript ({e.name} is missing): '
            'pip install "onnx>=1.16" "onnxruntime>=1.18" "onnxscript>=0.2"'
        ) from None
    return onnxruntime


def export(model: torch.nn.Module, path: str, example_size=(224, 224)):
    """Write `model` (eval) to `path` as ONNX with a dynamic batch, height and width (multiples of STRIDE).
    The example batch is 2, not 1: torch.export specialises dimensions of size 1."""
    batch = torch.export.Dim('batch', min=1)
    height, width = torch.export.Dim('height_div32', min=1), torch.export.Dim('width_div32', min=1)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')  # the exporter's deprecation and tracing notes
        try:
            program = torch.onnx.export(
                model,
                (torch.randn(2, 3, *example_size),),
                dynamo=True,
                verbose=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch, 2: STRIDE * height, 3: STRIDE * width},),
            )
        except Exception as e:  # the exporter raises many types; the first line says which operator or guard
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UsageError(f'torch.onnx.export failed with a dynamic batch, height and width: {first}') from None
    program.save(path, external_data=False)  # one self-contained file (every variant is far below 2 GB)


def create_session(path: str, threads: int = None, arena: bool = True, spin: bool = True):
    """An ONNX Runtime CPU session with every graph optimisation (layout transforms and fusions included).
    `spin=False`: its worker threads sleep when a run ends instead of spinning for the next one, so they take
    no CPU from other work (a benchmark's other contenders) between runs."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.add_session_config_entry('session.intra_op.allow_spinning', '1' if spin else '0')
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = arena
    options.log_severity_level = 3  # errors only: no warnings about unused initializers
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def relative_difference(model: torch.nn.Module, session, size, batch: int, seed: int = 0) -> float:
    """||ort - torch|| / ||torch|| of the logits on one random input."""
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(x).double()
    got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]).double()
    return ((got - expected).norm() / expected.norm()).item()


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser('export_onnx.py', description=__doc__.split('\n\n')[0], with_config=False)
    parser.add_argument('--model', default=None, help="RAVLT_T ... RAVLT_L or a timm name (default: the checkpoint's)")
    parser.add_argument('--checkpoint', default='', help="weights: ours, the authors' or a raw state dict")
    parser.add_argument('--ema', action='store_true', help="export the checkpoint's EMA weights (model_ema)")
    parser.add_argument('--model-kwargs', type=json_object, default=None, metavar='JSON', help='model arguments')
    parser.add_argument('--output', required=True, help='the .onnx file to write')
    sizes = 'input sizes of the check: pairs of height and width, multiples of 32'
    parser.add_argument('--check-sizes', type=COUNT, nargs='+', default=[224, 224, 160, 256], metavar='H W', help=sizes)
    parser.add_argument('--tolerance', type=NON_NEGATIVE, default=1e-5, help='largest relative difference accepted')
    return parser


def main(args):
    sizes = list(zip(args.check_sizes[::2], args.check_sizes[1::2]))
    if len(args.check_sizes) % 2 or any(h % STRIDE or w % STRIDE for h, w in sizes):
        raise UsageError(f'--check-sizes takes pairs H W (height then width), multiples of {STRIDE}')
    check_output_file(args.output, '--output', suffixes=('.onnx',))
    if args.ema and not args.checkpoint:
        raise UsageError('--ema needs --checkpoint')
    import_onnxruntime()  # before the long export: fail early when the extra is missing
    if args.checkpoint:
        checkpoint = load_checkpoint(args.checkpoint)
        model, name = model_from_checkpoint(checkpoint, args.checkpoint, args.model, args.model_kwargs, args.ema)
    else:
        name = args.model or 'RAVLT_S'
        model = create_model(name, args.model_kwargs)
    model = inference_form(model, inplace=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='ravlt_export_') as folder:
        temporary = os.path.join(folder, 'model.onnx')
        export(model, temporary)
        print(f'exported {name} in {time.perf_counter() - start:.0f} s; checking ONNX Runtime against PyTorch')
        session = create_session(temporary)
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
    with one_line_errors():
        main(get_args_parser().parse_args())
