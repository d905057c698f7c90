"""ONNX export and ONNX Runtime sessions, shared by scripts/export_onnx.py and the benchmark's onnxruntime backend.

The graph comes from `torch.onnx.export(..., dynamo=True)` (torch.export, then ONNX). Its input `image`
(float32, N x 3 x H x W) has a dynamic batch and a dynamic height and width, each a multiple of STRIDE; its
output is `logits`. onnx, onnxruntime and onnxscript are the optional `onnx` extra, imported only here.
"""

import warnings

import torch

from errors import UsageError, first_line

STRIDE = 32  # RAVLT's total stride: the exported height and width are multiples of it
INPUT_NAME, OUTPUT_NAME = 'image', 'logits'


def import_onnxruntime():
    """onnxruntime, or a one-line UsageError saying how to install the optional extra."""
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(
            'ONNX export needs the optional packages onnx, onnxruntime and onnxscript: '
            'pip install "onnx>=1.16" "onnxruntime>=1.18" "onnxscript>=0.2"'
        ) from None
    return onnxruntime


def export(model: torch.nn.Module, path: str, example_size=(224, 224)):
    """Write `model` (eval) to `path` as ONNX with a dynamic batch, height and width (multiples of STRIDE).

    The example batch is 2, not 1: torch.export specialises dimensions of size 1."""
    example = torch.randn(2, 3, *example_size)
    batch = torch.export.Dim('batch', min=1)
    height, width = torch.export.Dim('height_div32', min=1), torch.export.Dim('width_div32', min=1)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')  # the exporter's deprecation and tracing notes
        try:
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                verbose=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch, 2: STRIDE * height, 3: STRIDE * width},),
            )
        except Exception as e:  # the exporter raises many types; the first line says which operator or guard
            raise UsageError(
                f'torch.onnx.export failed for {type(model).__name__} with a dynamic batch, height '
                f'and width: {first_line(e)}'
            ) from None
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
    try:
        with torch.no_grad():
            expected = model(x).double()
    except (RuntimeError, AssertionError, ValueError) as e:
        raise UsageError(
            f'the PyTorch model rejects a {size[0]}x{size[1]} input ({first_line(e)}); choose --check-sizes it takes'
        ) from None
    try:
        got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]).double()
    except Exception as e:  # onnxruntime's errors have no common base class
        raise UsageError(f'ONNX Runtime fails on a {batch}x3x{size[0]}x{size[1]} input: {first_line(e)}') from None
    if got.shape != expected.shape:
        raise UsageError(
            f'ONNX Runtime gives logits of shape {tuple(got.shape)} for input {tuple(x.shape)}, '
            f'PyTorch {tuple(expected.shape)}'
        )
    return ((got - expected).norm() / expected.norm()).item()
