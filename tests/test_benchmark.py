"""scripts/benchmark.py and scripts/benchmark.py: rows for every model, mode and backend, JSON, --model-kwargs, the
authors' file with our weights, peak memory from a fresh process with the gradients counted, the ONNX Runtime
backend, the matrix-product reference rate, progress on stderr, and one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import benchmark
from errors import UsageError
from helpers import ROOT

pytestmark = pytest.mark.usefixtures('one_thread')
TINY = json.dumps({'embed_dims': [16, 32, 64, 128], 'depths': [1, 1, 1, 1], 'num_heads': [1, 1, 2, 4]})
FAKE_AUTHORS = """
import timm
import models  # registers ravlt_t
def RAVLT_T(args=None):
    return timm.create_model('ravlt_t')
"""
# As the authors' RALA.py registers its models: the decorator looks the module up in sys.modules while it loads.
REGISTERING_AUTHORS = """
import timm
from timm.models.registry import register_model
import models  # registers ravlt_t

@register_model
def RAVLT_T(pretrained=False, **kwargs):
    return timm.create_model('ravlt_t')
"""


def run(*argv):
    return benchmark.main(benchmark.get_args_parser().parse_args(argv))


def run_script(*argv) -> subprocess.CompletedProcess:
    """`python scripts/benchmark.py ARGV` on one thread."""
    command = [sys.executable, os.path.join(ROOT, 'scripts', 'benchmark.py'), *map(str, argv)]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def weights_mib(name: str) -> float:
    return sum(p.numel() * 4 for p in benchmark.build_model(name, 0).parameters()) / 2**20


@pytest.mark.slow
def test_rows_json_and_authors_models_get_our_weights(tmp_path, capsys):
    authors = tmp_path / 'RALA.py'
    authors.write_text(FAKE_AUTHORS)
    out = tmp_path / 'bench.json'
    rows = run(
        *'--model RAVLT_T authors:RAVLT_T --mode eval train --batch-size 1 --input-size 32 48'.split(),
        *'--warmup 1 --iters 2 --threads 1'.split(),
        *['--authors-file', authors, '--json', out],
    )
    assert [(r['model'], r['mode']) for r in rows] == [
        ('RAVLT_T', 'eval'),
        ('RAVLT_T', 'train'),
        ('authors:RAVLT_T', 'eval'),
        ('authors:RAVLT_T', 'train'),
    ]
    assert all(r['img_per_s'] > 0 and r['img_per_s_p25'] <= r['img_per_s'] <= r['img_per_s_p75'] for r in rows)
    saved = json.loads(out.read_text())
    assert saved['results'] == rows and saved['settings']['input_size'] == [32, 48]
    stdout, stderr = capsys.readouterr()
    assert 'input 32x48 (HxW)' in stdout
    # Progress, as it happens: which contender warms up, each timing round.
    assert 'authors:RAVLT_T train (eager): warming up' in stderr and 'timing: round 2/2' in stderr

    module = benchmark.load_authors_module(str(authors), [])
    ours, theirs = benchmark.build_model('RAVLT_T', 3), benchmark.build_model('authors:RAVLT_T', 3, None, module)
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), k


def test_model_kwargs_reach_the_model():
    def count(model):
        return sum(p.numel() for p in model.parameters())

    tiny = count(benchmark.build_model('RAVLT_T', 0, json.loads(TINY)))
    assert tiny == count(timm.create_model('ravlt_t', **json.loads(TINY))) < count(timm.create_model('ravlt_t')) / 2
    (row,) = run(
        *['--model', 'RAVLT_T', '--model-kwargs', TINY],
        *'--mode train --batch-size 2 --input-size 32'.split(),
        *'--warmup 1 --iters 1'.split(),
    )
    assert row['img_per_s'] > 0


@pytest.mark.slow
def test_peak_memory_is_measured_in_a_fresh_process_with_the_gradients():
    """The training step's peak holds the gradients (as big as the weights) on top of the activations."""
    eval_row, train_row = run(
        *'--model RAVLT_T --mode eval train --batch-size 2 --input-size 32 --iters 0 --memory'.split()
    )
    assert 0 < eval_row['peak_mib'] < weights_mib('RAVLT_T') and 'img_per_s' not in eval_row
    assert train_row['peak_mib'] > weights_mib('RAVLT_T')


def test_memory_baseline_is_read_without_the_previous_steps_gradients(monkeypatch):
    """The sequence both devices share (CUDA used to read its baseline with the untimed step's gradients
    alive, and so under-counted a training step by their size)."""
    settings = benchmark.Settings(batch_size=2, input_size=(32, 32))
    runner = benchmark.make_runner(benchmark.Contender('RAVLT_T', 'train', model_kwargs=json.loads(TINY)), settings)
    read, events = benchmark.read_status_kib, []

    def recording(field_name):
        events.append((field_name, sum(p.grad is not None for p in runner.module.parameters())))
        return read(field_name)

    monkeypatch.setattr(benchmark, 'read_status_kib', recording)
    assert benchmark.peak_memory_mib(runner) > 0
    assert events == [('VmRSS', 0), ('VmHWM', len(list(runner.module.parameters())))]


def test_amp_and_channels_last_reach_the_step():
    """The PyTorch backends' settings: channels-last weights and input, the step under autocast."""
    settings = benchmark.Settings(batch_size=2, input_size=(32, 32), amp='bf16', channels_last=True)
    runner = benchmark.make_runner(benchmark.Contender('RAVLT_T', 'train', model_kwargs=json.loads(TINY)), settings)
    assert runner.x.is_contiguous(memory_format=torch.channels_last) and runner.x.dtype == torch.float32
    convs = [m for m in runner.module.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    dtypes = []
    handle = convs[0].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    runner.step()
    handle.remove()
    assert dtypes == [torch.bfloat16] and all(p.grad is not None for p in runner.module.parameters())


@pytest.mark.slow
def test_matmul_rate_and_fractions():
    from flops import measure

    eager_eval, eager_train, matmul = run(
        *['--model', 'RAVLT_T', '--model-kwargs', TINY, '--mode', 'eval', 'train', '--batch-size', '2'],
        *'--input-size 64 96 --warmup 1 --iters 2 --matmul-rate'.split(),
    )
    assert matmul['model'] == 'matmul 2048x2048 float32' and matmul['gflop_per_s'] > 0
    # FLOPs per image from fvcore (2 per multiply-add); a training step counts 3 forward passes.
    flops = 2 * measure('RAVLT_T', (64, 96), model_kwargs=json.loads(TINY))['flops']
    for row, factor in ((eager_eval, 1), (eager_train, 3)):
        assert row['gflop_per_s'] == pytest.approx(row['img_per_s'] * factor * flops / 1e9)
        assert row['matmul_fraction'] == pytest.approx(row['gflop_per_s'] / matmul['gflop_per_s'])


@pytest.mark.slow
def test_onnxruntime_backend(capsys, monkeypatch):
    runners, make_runner = [], benchmark.make_runner
    monkeypatch.setattr(benchmark, 'make_runner', lambda *a, **k: runners.append(make_runner(*a, **k)) or runners[-1])
    (row,) = run(  # no training step on ONNX Runtime
        *['--model', 'RAVLT_T', '--model-kwargs', TINY, '--backend', 'onnxruntime', '--mode', 'eval', 'train'],
        *'--batch-size 2 --input-size 64 96 --warmup 1 --iters 2 --memory --threads 1'.split(),
    )
    assert (row['model'], row['backend'], row['mode']) == ('RAVLT_T', 'onnxruntime', 'eval')
    assert row['img_per_s'] > 0 and 0 < row['peak_mib'] < 100
    assert 'eval (onnxruntime): exporting to ONNX' in capsys.readouterr().err
    # Spinning ONNX Runtime threads would take the cores from the contender that runs next.
    (runner,) = runners
    options = runner.session.get_session_options()
    assert options.get_session_config_entry('session.intra_op.allow_spinning') == '0'
    assert options.intra_op_num_threads == 1


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--model', 'authors:RAVLT_T'], 'needs --authors-file'),
        (['--model', 'no_such_model'], "unknown model 'no_such_model'"),
        (['--model', 'RAVLT_T', '--iters', '0'], 'measures nothing'),
        (['--model', 'RAVLT_T', '--batch-size', '0'], r'argument --batch-size: must be in \[1, inf\), got 0'),
        (['--model', 'RAVLT_T', '--input-size', '32', '32', '32'], 'H or H W'),
        (['--model', 'RAVLT_T', '--model-kwargs', '{"depth": 1}'], 'cannot build ravlt_t'),
        (['--model', 'RAVLT_T', '--backend', 'onnxruntime', '--amp', 'bf16'], 'runs float32 on the CPU'),
        (['--model', 'RAVLT_T', '--backend', 'onnxruntime', '--mode', 'train'], 'eval only'),
        (['--model', 'swin_tiny_patch4_window7_224', '--input-size', '64'], 'failed with these settings'),
    ],
)
def test_bad_input_is_a_usage_error(argv, message):
    with pytest.raises(UsageError, match=message):
        run('--mode', 'eval', '--batch-size', '1', '--warmup', '1', '--iters', '1', *argv)


@pytest.mark.slow  # a benchmark process
def test_an_authors_file_that_registers_its_models_with_timm_loads(tmp_path):
    authors = tmp_path / 'RALA.py'
    authors.write_text(REGISTERING_AUTHORS)
    result = run_script(
        '--authors-file',
        authors,
        *'--model authors:RAVLT_T --mode eval --batch-size 1 --input-size 32'.split(),
        *'--warmup 1 --iters 1 --threads 1'.split(),
    )
    assert result.returncode == 0, result.stderr
    assert '| authors:RAVLT_T | eager | eval |' in result.stdout


@pytest.mark.slow
def test_missing_package_of_the_authors_file_is_one_line(tmp_path):
    authors = tmp_path / 'RALA.py'
    authors.write_text('import einops_is_not_installed_here\n')
    result = run_script('--authors-file', authors, '--model', 'authors:RAVLT_T')
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: the authors' file needs the package 'einops_is_not_installed_here': pip install "
        'einops_is_not_installed_here (or give its folder with --authors-path-extra)'
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA; scripts/gpu_check.sh runs it on a GPU')
@pytest.mark.parametrize('amp', ['none', 'fp16', 'bf16'])
def test_cuda_timing_memory_and_amp(amp):
    """On the GPU: synchronised timing, and a training step's peak holds its gradients."""
    eval_row, train_row = run(
        *'--device cuda --model RAVLT_T --mode eval train --channels-last --batch-size 4 --input-size 64'.split(),
        *['--amp', amp],
        *'--warmup 1 --iters 2 --memory'.split(),
    )
    assert eval_row['img_per_s'] > 0 and train_row['img_per_s'] > 0
    assert 0 < eval_row['peak_mib'] < train_row['peak_mib'] and train_row['peak_mib'] > weights_mib('RAVLT_T')


@pytest.mark.parametrize(
    'output, message',
    [
        ('missing/x.json', 'its folder does not exist'),
        ('.', 'exists and is not a regular file'),
        # issue 27: a run's log (or checkpoint) given as --json was replaced by the results, exit 0
        ('run/log.txt', 'expected a file name ending in .json'),
        ('run/checkpoint.pth', 'expected a file name ending in .json'),
    ],
)
def test_a_json_output_that_is_not_ours_is_refused_before_measuring(output, message, tmp_path, monkeypatch):
    def measured(*args, **kwargs):
        raise AssertionError('measured before the output was checked')

    (tmp_path / 'run').mkdir()
    for name in ('log.txt', 'checkpoint.pth'):
        (tmp_path / 'run' / name).write_text('precious')
    monkeypatch.setattr(benchmark, 'benchmark', measured)
    with pytest.raises(UsageError, match=f'--json .*{message}'):
        run('--model', 'RAVLT_T', '--mode', 'eval', '--iters', '1', '--json', tmp_path / output)
    assert sorted(os.listdir(tmp_path)) == ['run'] and sorted(os.listdir(tmp_path / 'run')) == [
        'checkpoint.pth',
        'log.txt',
    ]
    assert {(tmp_path / 'run' / n).read_text() for n in ('log.txt', 'checkpoint.pth')} == {'precious'}


@pytest.mark.parametrize(
    'content, name, message',
    [
        ('root:x:0:0:root:/root:/bin/bash\n', 'passwd', 'is not a Python file'),
        (
            'raise SystemError("not the authors\' file")\n',
            'RALA.py',
            "fails to run (SystemError: not the authors' file)",
        ),
    ],
)
def test_an_authors_file_that_is_no_module_is_one_line(content, name, message, tmp_path):
    authors = tmp_path / name
    authors.write_text(content)
    with pytest.raises(UsageError, match=message.replace('(', r'\(').replace(')', r'\)')):
        benchmark.load_authors_module(str(authors), [])
