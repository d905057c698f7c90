"""Plausible mistakes with main.py: one line on stderr saying what is wrong and how to fix it, exit code 2, no
traceback, and nothing written: an existing output folder keeps its files as they were, a new one is not made.
Flags and config values out of range, infinite, empty or unknown; an unknown model or --model-kwargs the model
rejects; a data path that holds no data set; checkpoints missing, empty, not checkpoints, needing code execution
to load, of another variant, another class count or another optimizer; an output folder that cannot be written
or that another run holds. A full disk during a save is one line and the old file stays whole; a non-finite
loss or evaluation stops training and never replaces the last sound checkpoint."""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import timm
import torch
from PIL import Image

import checkpoints
import cli
import engine
import main
import utils
from helpers import ROOT
from output_folder import OutputFolder
from train_helpers import DIGITS, TINY, TINY_MODEL_KWARGS, assert_one_line_error, command_env, read_log, run_here

pytestmark = pytest.mark.usefixtures('one_thread')

DIGIT_CLASSES = [str(c) for c in range(10)]
# The model flags a checkpoint of a DIGITS run holds (by flag name, as run.Run saves them).
DIGITS_FLAGS = {'model': 'RAVLT_T', 'model-kwargs': TINY_MODEL_KWARGS, 'input-size': 32, 'data-set': 'DIGITS'}


def leave_marker(path):
    open(path, 'w').close()


class CodeOnLoad:
    """Unpickling this calls `leave_marker(path)`: a checkpoint that runs code when loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return leave_marker, (self.path,)


def tiny_classifier(num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('ravlt_t', num_classes=num_classes, **TINY_MODEL_KWARGS)


def write_checkpoints(folder):
    """The checkpoints of CASES."""
    (folder / 'empty.pth').write_bytes(b'')
    (folder / 'not_a_checkpoint.pth').write_text('these are not weights\n')
    torch.save({'model': {}, 'args': CodeOnLoad(str(folder / 'code_ran'))}, folder / 'code.pth')
    with open(os.path.join(ROOT, 'tests', 'fixtures', 'state_dict_manifest.json')) as f:
        manifest = json.load(f)['RAVLT_S']
    # The authors' RAVLT_S keys and shapes, as expanded zeros: a few bytes on disk.
    torch.save({'model': {key: torch.zeros(()).expand(shape) for key, shape, _ in manifest}}, folder / 'ravlt_s.pth')
    # ImageNet weights of the tiny model (1,000 classes), without flags: an authors'-style file.
    torch.save({'model': tiny_classifier(1000).state_dict()}, folder / 'classes1000.pth')
    # A training checkpoint of a DIGITS run with AdamW, as run.Run writes one.
    model = tiny_classifier(10)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    torch.save(
        {
            'model': model.state_dict(),
            'optimizer': optimizer.state_dict(),
            'epoch': 0,
            'step': 44,
            'args': {**DIGITS_FLAGS, 'opt': 'adamw', 'batch-size': 32},
            'meta': {'task': 'classification', 'classes': DIGIT_CLASSES},
            'world_size': 1,
        },
        folder / 'adamw.pth',
    )


def image_folders(root, train_classes=('cls',), val_classes=('cls',), val_flat=False, size=(8, 8)):
    """An IMNET-style tree with one tiny image per class; val/ without class folders when `val_flat`."""
    for split, classes in (('train', train_classes), ('val', val_classes)):
        for name in classes:
            folder = root / split if split == 'val' and val_flat else root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.new('RGB', size, (40, 80, 120)).save(folder / f'{name}.png')
    return root


def kwargs(**changes) -> list:
    """--model-kwargs of the tiny model with `changes`."""
    return ['--model-kwargs', json.dumps({**TINY_MODEL_KWARGS, **changes})]


TRAIN = DIGITS + ['--epochs', '1']
# {case: (command line of the inputs folder d, fragments of the one line)}; the exit code is 2.
CASES = {
    # Flags and values.
    'unknown model': (lambda d: TRAIN + ['--model', 'ravlt_xl'], ["unknown model 'ravlt_xl'", 'RAVLT_S', 'timm']),
    'batch size 0': (lambda d: TRAIN + ['--batch-size', '0'], ['--batch-size: must be in [1, inf), got 0']),
    'input size 0': (lambda d: TRAIN + ['--input-size', '0'], ['--input-size: must be in [1, inf), got 0']),
    'negative learning rate': (lambda d: TRAIN + ['--lr', '-1'], ['--lr: must be in (0, inf), got -1']),
    'batch size not a number': (lambda d: TRAIN + ['--batch-size', 'many'], ["expected an integer, got 'many'"]),
    'fractional epochs': (lambda d: DIGITS + ['--epochs', '2.7'], ["--epochs/--epoch: expected an integer, got '2.7'"]),
    'infinite learning rate': (lambda d: TRAIN + ['--lr', 'inf'], ['--lr: must be in (0, inf), got inf']),
    'learning rate nan': (lambda d: TRAIN + ['--lr', 'nan'], ['--lr: must be in (0, inf), got nan']),
    'infinite weight decay': (lambda d: TRAIN + ['--weight-decay', 'inf'], ['--weight-decay: must be in [0, inf)']),
    'infinite warm-up learning rate': (lambda d: TRAIN + ['--warmup-lr', 'inf'], ['--warmup-lr: must be in [0, inf)']),
    'infinite timeout': (lambda d: TRAIN + ['--dist-timeout', 'inf'], ['--dist-timeout: must be in (0, inf), got inf']),
    'probability above 1': (lambda d: TRAIN + ['--reprob', '1.5'], ['--reprob: must be in [0, 1], got 1.5']),
    'unknown choice': (lambda d: TRAIN + ['--data-set', 'MNIST'], ["--data-set: invalid choice: 'MNIST'"]),
    'odd batch with mixup': (lambda d: TRAIN + ['--batch-size', '3', '--mixup', '0.8'], ['even --batch-size']),
    'unknown optimizer': (lambda d: TRAIN + ['--opt', 'adamx'], ['--opt adamx', 'adamx not found']),
    'model kwargs not JSON': (lambda d: TRAIN + ['--model-kwargs', '{depths: 1}'], ['--model-kwargs: not valid JSON']),
    'model kwargs the model does not take': (
        lambda d: TRAIN + ['--model-kwargs', '{"depth": 3}'],
        ['cannot build ravlt_t with --model-kwargs {"depth": 3}', "unexpected keyword argument 'depth'"],
    ),
    'model kwargs the model rejects': (
        lambda d: TRAIN + kwargs(num_heads=[0, 1, 2, 4]),
        ['cannot build ravlt_t with --model-kwargs', '"num_heads": [0, 1, 2, 4]'],
    ),
    'pretrained download': (lambda d: TRAIN + kwargs(pretrained=True), ['pretrained downloads nothing here']),
    # Config files.
    'missing config': (lambda d: TRAIN + ['--config', d / 'nowhere.yaml'], ['config file', 'does not exist']),
    'config not YAML': (lambda d: TRAIN + ['--config', d / 'broken.yaml'], ['broken.yaml is not valid YAML']),
    'unknown config key': (
        lambda d: TRAIN + ['--config', d / 'typo.yaml'],
        ["unknown key 'batch_sise' in config", "did you mean 'batch-size'?"],
    ),
    'fractional epochs in a config': (
        lambda d: DIGITS + ['--config', d / 'fraction.yaml'],
        ["expected an integer, got '2.7'", 'fraction.yaml'],
    ),
    'infinity in a config': (
        lambda d: TRAIN + ['--config', d / 'inf.yaml'],
        ['--lr: must be in (0, inf), got inf', 'in config', 'inf.yaml'],
    ),
    'empty config value': (
        lambda d: DIGITS + ['--config', d / 'empty_value.yaml'],
        ['epochs in config', 'is empty: give a value, or leave the key out'],
    ),
    'text for a switch in a config': (
        lambda d: TRAIN + ['--config', d / 'switch.yaml'],
        ["model-ema: 'yes please' in config", 'expected true or false'],
    ),
    # Data.
    'missing data path': (lambda d: TINY + ['--data-path', d / 'nowhere'], ['nowhere', 'is not a folder']),
    'no data path': (lambda d: TINY, ["--data-path '' is not a folder (--data-set IMNET needs one)"]),
    'empty data path': (
        lambda d: TINY + ['--data-path', d / 'empty_dir'],
        ['empty_dir has no val/ folder', 'DATA/train/<class>/<images>'],
    ),
    'val without class folders': (
        lambda d: TINY + ['--data-path', d / 'flat'],
        ["Couldn't find any class folder", 'DATA/val/ must be sorted into class folders too'],
    ),
    'val with other class folders': (
        lambda d: TINY + ['--data-path', d / 'zebra', '--batch-size', '2'],
        ['train/ and val/ must hold the same class folders', 'only in train/: dog', 'only in val/: zebra'],
    ),
    'CIFAR absent': (
        lambda d: TINY + ['--data-set', 'CIFAR', '--data-path', d / 'empty_dir'],
        ['CIFAR-100 not found', 'cifar-100-python'],
    ),
    # Checkpoints.
    'checkpoint missing': (
        lambda d: DIGITS + ['--eval', '--resume', d / 'nowhere.pth'],
        ['nowhere.pth does not exist'],
    ),
    'checkpoint empty': (lambda d: DIGITS + ['--eval', '--resume', d / 'empty.pth'], ['empty.pth is empty (0 bytes)']),
    'not a checkpoint': (
        lambda d: DIGITS + ['--eval', '--resume', d / 'not_a_checkpoint.pth'],
        ['not_a_checkpoint.pth is not a readable PyTorch checkpoint'],
    ),
    'checkpoint needs code execution': (
        lambda d: DIGITS + ['--eval', '--resume', d / 'code.pth'],
        ['code.pth is not a readable PyTorch checkpoint', 'Weights only load failed'],
    ),
    'checkpoint of another variant': (
        lambda d: TINY + ['--data-set', 'DIGITS', '--model-kwargs', '{}', '--eval', '--resume', d / 'ravlt_s.pth'],
        ['ravlt_s.pth: the weights are RAVLT_S weights, not RAVLT_T', 'pass --model RAVLT_S'],
    ),
    'checkpoint of another class count': (
        lambda d: TRAIN + ['--resume', d / 'classes1000.pth'],
        ['classes1000.pth: its classifier has 1000 classes, the model 10', 'use --finetune'],
    ),
    'checkpoint of other classes': (
        lambda d: TINY + ['--data-set', 'IMNET', '--data-path', d / 'zebra', '--eval', '--resume', d / 'adamw.pth'],
        ['adamw.pth was trained on other classes (10: 0, 1, 2 ...) than this data set has (2: cat, zebra ...)'],
    ),
    'resume with another optimizer': (
        lambda d: DIGITS + ['--epochs', '2', '--opt', 'sgd', '--resume', d / 'adamw.pth'],
        ['adamw.pth was trained with --opt adamw', '--opt sgd cannot continue', 'with --finetune'],
    ),
}


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp('inputs')
    (folder / 'empty_dir').mkdir()
    image_folders(folder / 'flat', val_flat=True)
    image_folders(folder / 'zebra', train_classes=('cat', 'dog'), val_classes=('cat', 'zebra'))
    (folder / 'broken.yaml').write_text('lr: [1e-3\n')
    (folder / 'typo.yaml').write_text('batch_sise: 3\n')
    (folder / 'fraction.yaml').write_text('epochs: 2.7\n')
    (folder / 'inf.yaml').write_text('lr: .inf\n')
    (folder / 'empty_value.yaml').write_text('epochs:\n')
    (folder / 'switch.yaml').write_text('model-ema: yes please\n')
    write_checkpoints(folder)
    return folder


def run(argv):
    """(exit code, stdout, stderr) of main.py's command line, run in this process."""
    result = run_here(main, argv)
    return result.returncode, result.stdout, result.stderr


def assert_refused_before_writing(argv, fragments, tmp_path):
    """One line and exit code 2, and the output folder as it was: config.yaml not (re)written."""
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'best.pth').write_bytes(b'weights of an earlier run')
    (out / 'log.txt').write_text('{"epoch": 0}\n')

    assert_one_line_error(*run(argv + ['--output_dir', out]), 2, *fragments)
    assert sorted(os.listdir(out)) == ['best.pth', 'log.txt']
    assert (out / 'best.pth').read_bytes() == b'weights of an earlier run'
    assert (out / 'log.txt').read_text() == '{"epoch": 0}\n'


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_is_one_line_and_damages_nothing(case, inputs, tmp_path):
    make_argv, fragments = CASES[case]
    assert_refused_before_writing(make_argv(inputs), fragments, tmp_path)
    assert not (inputs / 'code_ran').exists()


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_creates_no_output_folder(case, inputs, tmp_path):
    """Every check of flags, data and checkpoints comes before the output folder is made."""
    make_argv, fragments = CASES[case]
    out = tmp_path / 'new' / 'a' / 'b'
    assert_one_line_error(*run(make_argv(inputs) + ['--output_dir', out]), 2, *fragments)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('message', ['', 'the resume point stays out/checkpoint.pth of epoch 4'])
def test_ctrl_c_says_where_the_run_stands(message, capsys):
    """Outside the training loop nothing names a resume point: the line says the files are whole."""
    with pytest.raises(SystemExit) as stopped, cli.one_line_errors():
        raise KeyboardInterrupt(message)
    expected = message or 'the checkpoints on disk are whole'
    assert stopped.value.code == 130 and capsys.readouterr().err == f'error: interrupted; {expected}\n'


def test_flags_are_never_guessed():
    """An abbreviation is an unknown flag (argparse would take --input for --input-size), answered with the closest
    flag, as a mistyped config key is."""
    assert_one_line_error(*run(DIGITS + ['--eval', '--input', '48']), 2, "unknown flag '--input'; did you mean")
    assert_one_line_error(
        *run(DIGITS + ['--batchsize=3']), 2, "unknown flag '--batchsize'; did you mean '--batch-size'?"
    )


def test_a_run_leaves_the_environment_as_it_was(monkeypatch):
    """One process sets no launcher variables (RANK, WORLD_SIZE ...): a second run in the same process (a notebook,
    these tests) is not taken for a launched one."""
    launcher = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')
    for name in launcher:
        monkeypatch.delenv(name, raising=False)
    first = run(TRAIN + ['--model', 'ravlt_xl'])
    assert not set(launcher) & set(os.environ) and run(TRAIN + ['--model', 'ravlt_xl']) == first
    assert_one_line_error(*first, 2, "unknown model 'ravlt_xl'")


def test_finetune_takes_weights_of_another_class_count_with_a_new_classifier(inputs):
    """What the 'another class count' line advises works: the weights, a new classifier for this data set."""
    code, out, err = run(DIGITS + ['--eval', '--finetune', inputs / 'classes1000.pth'])
    assert code == 0, err
    assert "a new classifier for the 10 classes of this data set (the checkpoint's has 1000)" in out
    assert '* Weights: acc1 ' in out


@pytest.mark.parametrize(
    'output_dir, fragments',
    [
        ('/proc/self', ['cannot write to --output_dir /proc/self (permission denied)']),  # even for root
        ('FILE/out', ['cannot make --output_dir', 'FILE/out (not a directory)']),
        ('FILE', ['--output_dir', 'FILE exists and is not a folder']),
    ],
)
def test_unusable_output_folder_is_refused_before_any_work(output_dir, fragments, tmp_path):
    (tmp_path / 'FILE').write_text('a file')
    path = output_dir.replace('FILE', str(tmp_path / 'FILE'))
    code, out, err = run(DIGITS + ['--eval', '--output_dir', path])
    assert_one_line_error(code, out, err, 2, *fragments)
    assert 'Test:' not in out and 'Weights:' not in out  # refused before evaluating, not after
    assert (tmp_path / 'FILE').read_text() == 'a file'


def test_a_folder_another_run_uses_is_refused_and_left_alone(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'checkpoint.pth').write_bytes(b'the other run writes this')
    other = OutputFolder(str(out))  # holds the folder's lock, as a run in another process does
    try:
        code, stdout, stderr = run(TRAIN + ['--output_dir', out])
    finally:
        other.close()
    assert_one_line_error(code, stdout, stderr, 2, f'another run is using --output_dir {out} right now')
    assert (
        os.listdir(out) == ['checkpoint.pth'] and (out / 'checkpoint.pth').read_bytes() == b'the other run writes this'
    )


def test_resuming_into_the_folder_of_another_run_is_refused(inputs, tmp_path):
    """--resume of one run with --output_dir of another (which holds its own checkpoint.pth) would replace that
    run's checkpoints: refused, naming both ways on."""
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'checkpoint.pth').write_bytes(b'another run')
    code, stdout, stderr = run(DIGITS + ['--epochs', '2', '--resume', inputs / 'adamw.pth', '--output_dir', out])
    assert_one_line_error(
        code,
        stdout,
        stderr,
        2,
        f'--output_dir {out} holds a run of its own (checkpoint.pth)',
        'give a new --output_dir',
    )
    assert os.listdir(out) == ['checkpoint.pth'] and (out / 'checkpoint.pth').read_bytes() == b'another run'


def torch_save_on_a_full_disk(obj, f):
    """torch.save as it fails when the disk fills: part of the file written, then a RuntimeError of its own."""
    f.write(b'x' * 100)
    raise RuntimeError('[enforce fail at inline_container.cc:783] . unexpected pos 2857536 vs 2857424')


def write_on_a_full_disk(obj, f):
    f.write(b'x' * 100)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize('failing_save', [torch_save_on_a_full_disk, write_on_a_full_disk])
def test_disk_full_during_a_save_is_one_line_and_keeps_the_old_file(failing_save, tmp_path, monkeypatch, capsys):
    path = tmp_path / 'checkpoint.pth'
    checkpoints.save_checkpoint({'epoch': 1}, path)
    monkeypatch.setattr(torch, 'save', failing_save)
    monkeypatch.setattr(utils, '_disk_is_full', lambda directory: True)

    with pytest.raises(SystemExit) as exit_info, cli.one_line_errors():
        checkpoints.save_checkpoint({'epoch': 2}, path)
    monkeypatch.undo()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f'error: no space left on device ({path}); the checkpoints on disk are whole\n'
    assert checkpoints.load_checkpoint(path) == {'epoch': 1} and os.listdir(tmp_path) == ['checkpoint.pth']


@pytest.mark.usefixtures('restores_kernel_settings')
def test_an_operation_without_a_deterministic_kernel_is_one_line_under_deterministic(tmp_path, monkeypatch):
    """On CUDA some backward kernels (bilinear upsampling in the segmenters, RoIAlign in Mask R-CNN) have no
    deterministic implementation; under --deterministic torch raises at the first such call (here in torch's own
    words, since no CPU kernel does). The run says which operation and how to go on, exit code 2."""
    message = (
        'upsample_bilinear2d_backward_out_cuda does not have a deterministic implementation, but you set '
        "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this operation, or "
        "you can use the 'warn_only=True' option, if that's acceptable for your application."
    )

    def train_without_deterministic_kernel(*args, **kwargs):
        assert torch.are_deterministic_algorithms_enabled()
        raise RuntimeError(message)

    monkeypatch.setattr(engine, 'train_one_epoch', train_without_deterministic_kernel)
    assert_one_line_error(
        *run(TRAIN + ['--deterministic', '--output_dir', tmp_path]),
        2,
        'error: --deterministic: upsample_bilinear2d_backward_out_cuda does not have a deterministic implementation',
    )


@pytest.mark.slow
def test_ctrl_c_is_one_line(tmp_path):
    process = subprocess.Popen(
        [sys.executable, 'main.py', *map(str, DIGITS), '--epochs', '50', '--output_dir', str(tmp_path)],
        cwd=ROOT,
        env=command_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job's shell ignores it
    )
    for line in process.stdout:
        if line.startswith('Start training'):
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert_one_line_error(process.returncode, out, err, 130, 'error: interrupted; no checkpoint was written yet')


@pytest.mark.slow
def test_non_finite_loss_stops_naming_epoch_and_step_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / 'out'
    good = run_here(main, TRAIN + ['--output_dir', out])
    assert good.returncode == 0, good.stderr
    checkpoint = checkpoints.load_checkpoint(out / 'checkpoint.pth')
    checkpoint['model']['head.bias'][0] = float('nan')
    torch.save(checkpoint, tmp_path / 'nan.pth')
    torch.save(checkpoint, out / 'checkpoint.pth')  # the run's own resume point
    before = (out / 'checkpoint.pth').read_bytes()

    result = run_here(main, DIGITS + ['--epochs', '2', '--output_dir', out])

    assert_one_line_error(
        result.returncode, result.stdout, result.stderr, 1, 'loss is nan at epoch 1, step 0 of 44; training stopped'
    )
    assert (out / 'checkpoint.pth').read_bytes() == before
    assert [entry['epoch'] for entry in read_log(out)] == [0]

    # --eval of such weights says so, instead of reporting an accuracy.
    evaluated = run_here(main, DIGITS + ['--eval', '--resume', tmp_path / 'nan.pth'])
    assert_one_line_error(evaluated.returncode, evaluated.stdout, evaluated.stderr, 1, 'NaN or infinite', 'head.bias')


@pytest.mark.slow
def test_a_diverging_run_never_saves_a_poisoned_resume_point(tmp_path):
    """One step per epoch, warming up to a huge learning rate: epoch 0 is sound, epoch 1's step has a finite
    loss but leaves weights whose evaluation is not. They never replace the sound checkpoint, and the message
    names the resume point; a restart stops the same way."""
    out = tmp_path / 'out'
    argv = DIGITS + [
        '--batch-size',
        '1024',
        '--lr',
        '1e6',
        '--warmup-epochs',
        '2',
        '--epochs',
        '3',
        '--output_dir',
        out,
    ]
    result = run_here(main, argv)
    assert_one_line_error(
        result.returncode,
        result.stdout,
        result.stderr,
        1,
        'epoch 1 ',
        'not saved',
        f'the resume point stays {out / "checkpoint.pth"} of epoch 0',
    )
    saved = checkpoints.load_checkpoint(out / 'checkpoint.pth')
    assert saved['epoch'] == 0 and all(torch.isfinite(t).all() for t in saved['model'].values())
    assert [entry['epoch'] for entry in read_log(out)] == [0]
    again = run_here(main, argv)
    assert again.returncode == 1 and again.stderr == result.stderr
