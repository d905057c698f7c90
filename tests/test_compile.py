"""--compile (torch.compile, Inductor) on the CPU: training and evaluation give eager's numbers within float32
rounding, the checkpoints are eager's (same keys, no `_orig_mod.`), the EMA is kept and evaluated, a run stopped
by SIGTERM resumes bit-identical with --compile, and a missing compiler is one line.

Compiling takes minutes on a small CPU the first time (Inductor caches the generated code for later runs), so
these tests are marked slow, and they share the shapes of one tiny model so that they share that cache."""

import pytest

import checkpoints
import engine
import main
import model_factory
from errors import UsageError
from train_helpers import DIGITS, assert_one_line_error, assert_same_training, read_log, run_here, run_main

pytestmark = pytest.mark.usefixtures('one_thread')
COMPILING = pytest.mark.timeout(1800)  # the first compilation on a small CPU: minutes

# SGD: AdamW turns the rounding noise in the gradients of the conv biases before a BatchNorm (which the norm
# cancels: their true gradient is 0) into full-size steps, so two AdamW runs part by more than rounding.
ARGS = DIGITS + ['--epochs', '2', '--opt', 'sgd', '--lr', '0.16']  # 44 steps per epoch


@pytest.fixture(scope='module')
def eager_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('eager')
    result = run_here(main, ARGS + ['--output_dir', out])
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope='module')
def compiled_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('compiled')
    result = run_here(main, ARGS + ['--compile', '--output_dir', out])
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
@COMPILING
def test_training_and_evaluation_match_eager_within_float32_rounding(eager_run, compiled_run):
    eager, compiled = (checkpoints.load_checkpoint(out / 'checkpoint.pth') for out in (eager_run, compiled_run))
    for key in ('model', 'model_ema'):
        assert list(compiled[key]) == list(eager[key])  # the model's own keys: no `_orig_mod.`
    logs = read_log(compiled_run), read_log(eager_run)
    assert [entry['epoch'] for entry in logs[0]] == [entry['epoch'] for entry in logs[1]] == [0, 1]
    for ours, theirs in zip(*logs):
        assert ours['train_loss'] == pytest.approx(theirs['train_loss'], rel=1e-4)
        # The evaluations (of the model and of its EMA) after 44 and 88 steps, whose rounding differences grow.
        for name in ('test_loss', 'test_ema_loss'):
            assert ours[name] == pytest.approx(theirs[name], rel=1e-3), name
        for name in ('test_acc1', 'test_ema_acc1'):  # 360 images: one image is 0.28 %
            assert abs(ours[name] - theirs[name]) < 0.6, name


@pytest.mark.slow
@COMPILING
def test_eval_with_compile_evaluates_the_weights_and_the_ema_compiled_as_eager_does(eager_run, monkeypatch):
    """--eval --compile compiles both evaluations, the weights' and the EMA's, and they give eager's numbers."""
    from torch._dynamo.eval_frame import OptimizedModule

    evaluate, evaluated = engine.evaluate, []

    def spied(model, *args, **kwargs):
        evaluated.append(isinstance(model, OptimizedModule))
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(engine, 'evaluate', spied)
    results, compiled = {}, {}
    for name, extra in (('eager', []), ('compiled', ['--compile'])):
        evaluated.clear()
        result = run_here(main, DIGITS + ['--eval', '--resume', eager_run / 'checkpoint.pth', *extra])
        assert result.returncode == 0, result.stderr
        results[name] = [
            line for line in result.stdout.splitlines() if line.startswith(('* Weights:', '* EMA weights:'))
        ]
        compiled[name] = list(evaluated)
    assert compiled == {'eager': [False, False], 'compiled': [True, True]}
    assert [line.split(':')[0] for line in results['compiled']] == ['* Weights', '* EMA weights']

    def numbers(lines):
        return [float(word.rstrip(',')) for line in lines for word in line.split() if word[0].isdigit()]

    assert numbers(results['compiled']) == pytest.approx(numbers(results['eager']), rel=1e-5)


@pytest.mark.slow
@COMPILING
def test_sigterm_mid_epoch_with_compile_resumes_bit_identical(compiled_run, tmp_path):
    # SIGTERM during step 50 (epoch 1's step 6): the run stops at the next read of the steps' losses, after step
    # 52 (--print-freq 4, which changes no number of the run), with a resumable checkpoint.
    stopped = run_main(
        ['main.py', *ARGS, '--compile', '--print-freq', '4', '--output_dir', tmp_path],
        script='tests/fault_injection.py',
        timeout=1800,
        SIGNAL_AT='0:50:SIGTERM',
    )
    assert stopped.returncode == 3, stopped.stderr
    assert checkpoints.load_checkpoint(tmp_path / 'checkpoint.pth')['progress']['steps'] == 8  # mid-epoch
    resumed = run_here(main, ARGS + ['--compile', '--output_dir', tmp_path])
    assert resumed.returncode == 0, resumed.stderr
    assert 'Resumed from' in resumed.stdout
    assert_same_training(
        checkpoints.load_checkpoint(compiled_run / 'checkpoint.pth'),
        checkpoints.load_checkpoint(tmp_path / 'checkpoint.pth'),
    )
    assert read_log(compiled_run) == read_log(tmp_path)


def test_compile_without_a_cpp_compiler_is_one_line_before_any_work(tmp_path):
    from torch._inductor import config

    out = tmp_path / 'out'
    with config.patch({'cpp.cxx': (None, 'no-such-compiler')}):  # restored after (monkeypatch would delete it)
        result = run_here(main, DIGITS + ['--compile', '--output_dir', out])
    assert_one_line_error(
        result.returncode,
        result.stdout,
        result.stderr,
        2,
        'error: --compile on the CPU needs a C++ compiler (install g++ or set CXX); or leave it out',
    )
    assert not out.exists()


def test_compile_on_cuda_without_triton_is_one_line(monkeypatch):
    import torch.utils._triton

    monkeypatch.setattr(torch.utils._triton, 'has_triton', lambda: False)
    with pytest.raises(UsageError, match='--compile on CUDA needs triton'):
        model_factory.check_compiler(torch.device('cuda'))
