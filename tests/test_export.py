"""scripts/export_onnx.py: a tiny RAVLT exported with a dynamic batch, height and width runs in ONNX Runtime
as in PyTorch; the weights come from every kind of checkpoint; a failed check writes nothing; bad input
is one line."""

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys

import pytest
import torch

import export_onnx
from checkpoints import load_checkpoint
from errors import UsageError
from helpers import ROOT
from model_factory import create_model, model_from_checkpoint

pytestmark = pytest.mark.usefixtures('one_thread')
TINY = {'embed_dims': [16, 32, 64, 128], 'depths': [1, 1, 1, 1], 'num_heads': [1, 1, 2, 4]}


def run(*argv):
    return export_onnx.main(export_onnx.get_args_parser().parse_args(argv))


def tiny_state(seed: int, num_classes: int = 10) -> dict:
    torch.manual_seed(seed)
    model = create_model('RAVLT_T', TINY, num_classes=num_classes)
    for m in model.modules():  # non-trivial BatchNorm statistics, so that folding them is checked too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.state_dict()


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """Our training checkpoint (weights, EMA weights, the flags with --model and --model-kwargs) exported with
    --ema, the model taken from the checkpoint; returns (checkpoint, file, what the script printed)."""
    folder = tmp_path_factory.mktemp('export')
    checkpoint = folder / 'checkpoint.pth'
    torch.save(
        {
            'model': tiny_state(0),
            'model_ema': tiny_state(1),
            'epoch': 3,
            'args': {'model': 'RAVLT_T', 'model-kwargs': TINY},
        },
        checkpoint,
    )
    output = folder / 'tiny.onnx'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run('--checkpoint', checkpoint, '--ema', '--output', output, *'--check-sizes 64 64 96 160'.split())
    torch.set_num_threads(threads)
    return checkpoint, output, printed.getvalue()


@pytest.mark.slow
def test_the_model_comes_from_the_checkpoint(exported):
    """No --model: the checkpoint's narrow RAVLT-T (its --model and --model-kwargs), named as such."""
    assert exported[2].startswith('exported RAVLT_T in ')


@pytest.mark.slow
def test_onnx_runtime_matches_pytorch_at_any_batch_and_size(exported):
    checkpoint, output, _ = exported
    assert output.is_file() and not [p for p in os.listdir(output.parent) if p.endswith('.tmp.onnx')]
    ema = create_model('RAVLT_T', TINY, num_classes=10).eval()
    ema.load_state_dict(tiny_state(1))  # --ema: the EMA weights, and the class count of the checkpoint
    session = export_onnx.create_session(str(output), threads=1)
    inputs = session.get_inputs()[0]
    assert inputs.name == 'image' and isinstance(inputs.shape[0], str)  # a named, dynamic batch
    for batch, size in ((3, (96, 128)), (1, (32, 224))):  # neither is an exported or checked size
        assert export_onnx.relative_difference(ema, session, size, batch, seed=5) <= 1e-5
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        not_ema = create_model('RAVLT_T', TINY, num_classes=10).eval()
        not_ema.load_state_dict(tiny_state(0))  # the same architecture with the other weights
        assert (ema(x) - not_ema(x)).abs().max() > 1e-3


@pytest.mark.slow
def test_failed_check_writes_nothing(exported, tmp_path, monkeypatch):
    """The file from the EMA weights checked against the model's weights: the check fails, nothing is left."""
    checkpoint, output, _ = exported
    monkeypatch.setattr(export_onnx, 'export', lambda model, path: shutil.copyfile(output, path))
    target = tmp_path / 'out.onnx'
    with pytest.raises(UsageError, match=r'ONNX Runtime differs from PyTorch by .* nothing written'):
        run('--model', 'RAVLT_T', '--checkpoint', checkpoint, '--output', target)
    assert os.listdir(tmp_path) == []


def test_weights_from_every_kind_of_checkpoint(tmp_path):
    """Raw state dicts with DDP's `module.` prefix, the authors' files (their flags as a Namespace, no
    --model-kwargs in them), EMA or not: the exported model carries exactly those weights."""
    weights, ema = tiny_state(2, 1000), tiny_state(3, 1000)
    raw = tmp_path / 'raw.pth'
    torch.save({f'module.{k}': v for k, v in weights.items()}, raw)
    authors = tmp_path / 'authors.pth'
    torch.save({'model': weights, 'model_ema': ema, 'args': argparse.Namespace(model='RAVLT_T', lr=5e-4)}, authors)
    for path, use_ema, expected in ((raw, False, weights), (authors, False, weights), (authors, True, ema)):
        model, _ = model_from_checkpoint(load_checkpoint(path), str(path), 'RAVLT_T', TINY, ema=use_ema)
        model.eval()
        reference = create_model('RAVLT_T', TINY).eval()
        reference.load_state_dict(expected)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x))


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--model', 'RAVLT_X'], "unknown model 'RAVLT_X'"),
        (['--model', 'RAVLT_T', '--check-sizes', '224', '100'], 'multiples of 32'),
        (['--model', 'RAVLT_T', '--check-sizes', '224'], 'pairs H W'),
        (['--model', 'RAVLT_T', '--ema'], '--ema needs --checkpoint'),
        (['--model', 'RAVLT_T', '--model-kwargs', '{"depths": 2'], 'not valid JSON'),
    ],
)
def test_bad_input_is_a_usage_error(argv, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        run(*argv, '--output', tmp_path / 'x.onnx')


@pytest.mark.slow
def test_bad_input_is_one_line_on_the_command_line(tmp_path):
    command = [sys.executable, os.path.join(ROOT, 'scripts', 'export_onnx.py'), '--model', 'RAVLT_S']
    command += ['--checkpoint', 'MISSING.pth', '--output', str(tmp_path / 'x.onnx')]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ['error: checkpoint MISSING.pth does not exist']


@pytest.mark.slow  # builds RAVLT-S and RAVLT-T at full size
def test_weights_of_another_variant_name_it(tmp_path):
    """RAVLT-T weights (default shape) given for RAVLT-S: one line naming the variant they fit."""
    with torch.device('meta'):
        shapes = create_model('RAVLT_T').state_dict()
    torch.save({'model': {k: torch.zeros(()).expand(v.shape) for k, v in shapes.items()}}, tmp_path / 't.pth')
    with pytest.raises(UsageError, match='the weights are RAVLT_T weights, not RAVLT_S'):
        model_from_checkpoint(load_checkpoint(tmp_path / 't.pth'), 't.pth', 'RAVLT_S')
    model, name = model_from_checkpoint(load_checkpoint(tmp_path / 't.pth'), 't.pth')
    assert name == 'RAVLT_T' and model.num_classes == 1000  # without --model: the variant the weights fit


@pytest.mark.parametrize('package', ['onnxruntime', 'onnxscript'])
def test_a_missing_onnx_package_says_how_to_install(package, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, package, None)  # `import PACKAGE` raises ImportError
    with pytest.raises(UsageError, match=f'\\({package} is missing\\): pip install "onnx>=1.16" "onnxruntime>=1.18"'):
        run('--model', 'RAVLT_T', '--output', tmp_path / 'x.onnx')


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--output', 'DIR/x.onnx'], 'exists and is not a regular file'),
        (['--output', 'DIR/checkpoint.pth'], 'expected a file name ending in .onnx'),  # issue 27
        (['--tolerance', 'nan'], r'argument --tolerance: must be in \[0, inf\), got nan'),
        (['--tolerance', '-1'], r'argument --tolerance: must be in \[0, inf\), got -1'),
        (['--tolerance', 'inf'], r'argument --tolerance: must be in \[0, inf\), got inf'),
    ],
)
def test_bad_outputs_and_tolerances_are_refused_before_the_export(argv, message, tmp_path, monkeypatch):
    def exported(*args, **kwargs):
        raise AssertionError('exported before the input was checked')

    monkeypatch.setattr(export_onnx, 'export', exported)
    (tmp_path / 'x.onnx').mkdir()
    (tmp_path / 'checkpoint.pth').write_text('precious')
    argv = [a.replace('DIR', str(tmp_path)) for a in argv]
    with pytest.raises(UsageError, match=message):
        run('--model', 'RAVLT_T', '--model-kwargs', '{"depths": [1, 1, 1, 1]}', '--output', tmp_path / 'y.onnx', *argv)
    assert sorted(os.listdir(tmp_path)) == ['checkpoint.pth', 'x.onnx'] and os.listdir(tmp_path / 'x.onnx') == []
    assert (tmp_path / 'checkpoint.pth').read_text() == 'precious'
