"""Bad input to main.py: one line on stderr saying what is wrong and how to fix it, a non-zero exit, no
traceback, and nothing already in the output folder touched (config.yaml not rewritten). Values: out of range
or infinite, empty in a config, a config expanding through YAML aliases, --model-kwargs that build no
trainable RGB classifier; checkpoints: damaged, of another variant, hand-edited (each field named), of
another optimizer; a damaged resume point names the whole checkpoints beside it. Bad data files name the
file, also when a data-loading worker meets them; a read-only or impossible output folder is refused before
any work; a non-finite loss or evaluation stops training and never replaces the last sound checkpoint."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import checkpoints
import main
import utils
from cli import run_cli
from helpers import ROOT
from train_helpers import DIGITS, TINY, TINY_MODEL_KWARGS, assert_one_line_error, command_env, read_log, run_here

pytestmark = pytest.mark.usefixtures('one_thread')


def leave_marker(path):
    open(path, 'w').close()


class CodeOnLoad:
    """Unpickling this calls `leave_marker(path)`: a checkpoint that runs code when loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return leave_marker, (self.path,)


def write_checkpoints(folder):
    """The bad checkpoints of CASES."""
    (folder / 'empty.pth').write_bytes(b'')
    (folder / 'not_a_checkpoint.pth').write_text('these are not weights\n')
    torch.save({'model': {}, 'args': CodeOnLoad(str(folder / 'code_ran'))}, folder / 'code.pth')
    with open(os.path.join(ROOT, 'tests', 'fixtures', 'state_dict_manifest.json')) as f:
        manifest = json.load(f)['RAVLT_S']
    # The authors' RAVLT_S keys and shapes, as expanded zeros: a few bytes on disk.
    torch.save({'model': {key: torch.zeros(()).expand(shape) for key, shape, _ in manifest}}, folder / 'ravlt_s.pth')


def image_folders(root, train_classes=('cls',), val_classes=('cls',), val_flat=False, size=(8, 8)):
    """An IMNET-style tree with one tiny image per class; val/ without class folders when `val_flat`."""
    for split, classes in (('train', train_classes), ('val', val_classes)):
        for name in classes:
            folder = root / split if split == 'val' and val_flat else root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.new('RGB', size, (40, 80, 120)).save(folder / f'{name}.png')
    return root


CASES = {
    'unknown model': (lambda d: DIGITS + ['--model', 'ravlt_xl'], 2, ["unknown model 'ravlt_xl'", 'RAVLT_S', 'timm']),
    'missing data path': (lambda d: TINY + ['--data-path', d / 'nowhere'], 2, ['does not exist']),
    'no data path': (lambda d: TINY, 2, ['--data-set IMNET needs --data-path']),
    'empty data path': (lambda d: TINY + ['--data-path', d / 'empty_dir'], 2, ['is empty', 'DATA/train/<class>']),
    'val without class folders': (
        lambda d: TINY + ['--data-path', d / 'flat'],
        2,
        ['val has no class folders', 'one folder per class'],
    ),
    'val with other class folders': (
        lambda d: TINY + ['--data-path', d / 'zebra', '--batch-size', '2'],
        2,
        ['the same class folders', 'cat, dog', 'cat, zebra'],
    ),
    'CIFAR absent': (
        lambda d: TINY + ['--data-set', 'CIFAR', '--data-path', d / 'empty_dir'],
        2,
        ['CIFAR-100 not found', 'cifar-100-python'],
    ),
    'batch size 0': (lambda d: DIGITS + ['--batch-size', '0'], 2, ['--batch-size: must be at least 1, got 0']),
    'input size 0': (lambda d: DIGITS + ['--input-size', '0'], 2, ['--input-size: must be at least 1, got 0']),
    'negative learning rate': (lambda d: DIGITS + ['--lr', '-1'], 2, ['--lr: must be above 0, got -1']),
    'batch size not a number': (lambda d: DIGITS + ['--batch-size', 'many'], 2, ["expected an integer, got 'many'"]),
    'odd batch with mixup': (lambda d: DIGITS + ['--batch-size', '3', '--mixup', '0.8'], 2, ['even --batch-size']),
    'missing config': (lambda d: DIGITS + ['--config', d / 'nowhere.yaml'], 2, ['config file', 'does not exist']),
    'unknown config key': (
        lambda d: DIGITS + ['--config', d / 'typo.yaml'],
        2,
        ["unknown key 'batch_sise'", "did you mean 'batch-size'"],
    ),
    'unknown optimizer': (lambda d: DIGITS + ['--opt', 'adamx'], 2, ['adamx', '--opt']),
    'bad model kwargs': (lambda d: DIGITS + ['--model-kwargs', '{"depth": 3}'], 2, ['cannot build ravlt_t']),
    'checkpoint missing': (lambda d: DIGITS + ['--eval', '--resume', d / 'nowhere.pth'], 2, ['does not exist']),
    'checkpoint empty': (lambda d: DIGITS + ['--eval', '--resume', d / 'empty.pth'], 2, ['is empty']),
    'not a checkpoint': (
        lambda d: DIGITS + ['--eval', '--resume', d / 'not_a_checkpoint.pth'],
        2,
        ['is not a PyTorch checkpoint'],
    ),
    'checkpoint needs code execution': (
        lambda d: DIGITS + ['--eval', '--resume', d / 'code.pth'],
        2,
        ['needs code execution to unpickle', 'leave_marker'],
    ),
    'checkpoint of another variant': (
        lambda d: TINY + ['--data-set', 'DIGITS', '--model-kwargs', '{}', '--eval', '--resume', d / 'ravlt_s.pth'],
        2,
        ['RAVLT_S weights', 'the model is RAVLT_T', 'pass --model RAVLT_S'],
    ),
}


def kwargs(**changes) -> list:
    """--model-kwargs of the tiny model with `changes`."""
    return ['--model-kwargs', json.dumps({**TINY_MODEL_KWARGS, **changes})]


# A checkpoint's fields as a hand edit leaves them: {name: edit of the trained checkpoint}.
EDITS = {
    'epoch_text': lambda c: c.update(epoch='abc'),
    'epoch_negative': lambda c: c.update(epoch=-5),
    'optimizer_list': lambda c: c.update(optimizer=[1, 2]),
    'best_list': lambda c: c.update(best=[90.0]),
    'progress_partial': lambda c: c.update(progress={'steps': 3}),
    'weight_list': lambda c: c['model'].update({'head.bias': [0.0] * 10}),
    'weights_int64': lambda c: c.update(model={k: v.long() for k, v in c['model'].items()}),
    'weights_bool': lambda c: c.update(model={k: v.bool() for k, v in c['model'].items()}),
    'model_none': lambda c: c.update(model=None),
    'input_size_text': lambda c: c['args'].update({'input-size': 'abc'}),
    'input_size_negative': lambda c: c['args'].update({'input-size': -5}),
    'model_number': lambda c: c['args'].update(model=7),
}
# --eval of a checkpoint taking its model flags (--model, --model-kwargs, --input-size) from it.
EVAL_OWN_FLAGS = ['--device', 'cpu', '--num_workers', '0', '--data-set', 'DIGITS', '--batch-size', '32', '--eval']
# YAML aliases: each line ten times the one before, 10**6 values from a few hundred bytes.
ALIAS_CHAIN = 'model-kwargs:\n  x0: &x0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n' + ''.join(
    f'  x{i}: &x{i} [{", ".join([f"*x{i - 1}"] * 10)}]\n' for i in range(1, 6)
)


def write_edited_checkpoints(folder):
    """A checkpoint of one DIGITS epoch (trained/checkpoint.pth) and its copies with the EDITS."""
    main.cli([str(a) for a in DIGITS + ['--epochs', '1', '--output_dir', folder / 'trained']])
    trained = torch.load(folder / 'trained' / 'checkpoint.pth', weights_only=True)
    for name, edit in EDITS.items():
        checkpoint = copy.deepcopy(trained)
        edit(checkpoint)
        torch.save(checkpoint, folder / f'{name}.pth')


CASES.update(
    {
        'infinite learning rate': (
            lambda d: DIGITS + ['--epochs', '1', '--lr', 'inf'],
            2,
            ['--lr: must be a finite number, got inf'],
        ),
        'infinite weight decay': (
            lambda d: DIGITS + ['--epochs', '1', '--weight-decay', 'inf'],
            2,
            ['--weight-decay: must be a finite number, got inf'],
        ),
        'infinite warm-up learning rate': (
            lambda d: DIGITS + ['--epochs', '1', '--warmup-lr', 'inf'],
            2,
            ['--warmup-lr: must be a finite number, got inf'],
        ),
        'infinite timeout': (
            lambda d: DIGITS + ['--epochs', '1', '--dist-timeout', 'inf'],
            2,
            ['--dist-timeout: must be a finite number, got inf'],
        ),
        'timeout beyond a timedelta': (
            lambda d: DIGITS + ['--epochs', '1', '--dist-timeout', '1e300'],
            2,
            ['--dist-timeout: must be in (0, 1000000], got 1e300'],
        ),
        'infinity in a config': (
            lambda d: DIGITS + ['--epochs', '1', '--config', d / 'inf.yaml'],
            2,
            ['lr: inf in config', 'must be a finite number'],
        ),
        'empty config value': (
            lambda d: DIGITS + ['--config', d / 'empty_value.yaml'],
            2,
            ['epochs: None in config', 'empty; give a value, or leave the key out for the default 300'],
        ),
        'YAML alias chain': (
            lambda d: DIGITS + ['--epochs', '1', '--config', d / 'aliases.yaml'],
            2,
            ['expands to more than 10000 values', 'YAML aliases'],
        ),
        'zero heads': (
            lambda d: DIGITS + ['--epochs', '1'] + kwargs(num_heads=[0, 1, 2, 4]),
            2,
            ['num_heads must be a list of positive integers, one per stage, got [0, 1, 2, 4]'],
        ),
        'zero width': (
            lambda d: DIGITS + ['--epochs', '1'] + kwargs(embed_dims=[0, 32, 64, 128]),
            2,
            ['embed_dims must be a list of positive integers'],
        ),
        'one input channel': (
            lambda d: DIGITS + ['--epochs', '1'] + kwargs(in_chans=1),
            2,
            ['in_chans 1: the data are RGB images'],
        ),
        'no pooling': (
            lambda d: DIGITS + ['--epochs', '1'] + kwargs(global_pool=''),
            2,
            ['global_pool "" gives a prediction per position'],
        ),
        'features only': (
            lambda d: DIGITS + ['--epochs', '1'] + kwargs(features_only=True),
            2,
            ['features_only builds a feature extractor'],
        ),
        'pretrained download': (
            lambda d: DIGITS + ['--epochs', '1'] + kwargs(pretrained=True),
            2,
            ['pretrained is not taken (no weights are downloaded)'],
        ),
        'drop path beyond its range': (
            lambda d: DIGITS + ['--epochs', '1'] + kwargs(drop_path_rate=5),
            2,
            ['drop_path_rate must be in [0, 1], got 5 (the range of --drop-path)'],
        ),
        'batch of one at 32 px': (
            lambda d: DIGITS + ['--epochs', '1', '--batch-size', '1'],
            2,
            ['--batch-size 1 at --input-size 32', 'one value per channel', '--input-size 33'],
        ),
    }
)

# Cases of a trained checkpoint, hand-edited (EDITS) or resumed with another optimizer: d is its folder.
CHECKPOINT_CASES = {
    'checkpoint epoch not a number': (
        lambda d: DIGITS + ['--epochs', '2', '--resume', d / 'epoch_text.pth'],
        2,
        ["epoch_text.pth: its field epoch is 'abc', expected the last completed epoch"],
    ),
    'checkpoint epoch negative': (
        lambda d: DIGITS + ['--epochs', '2', '--resume', d / 'epoch_negative.pth'],
        2,
        ['epoch_negative.pth: its field epoch is -5'],
    ),
    'checkpoint optimizer a list': (
        lambda d: DIGITS + ['--epochs', '2', '--resume', d / 'optimizer_list.pth'],
        2,
        ['optimizer_list.pth: its field optimizer is [1, 2]'],
    ),
    'checkpoint best a list': (
        lambda d: DIGITS + ['--epochs', '2', '--resume', d / 'best_list.pth'],
        2,
        ['best_list.pth: its field best is [90.0]'],
    ),
    'checkpoint progress without its keys': (
        lambda d: DIGITS + ['--epochs', '2', '--resume', d / 'progress_partial.pth'],
        2,
        ["progress_partial.pth: its field progress is {'steps': 3}"],
    ),
    'checkpoint weight not a tensor': (
        lambda d: DIGITS + ['--eval', '--resume', d / 'weight_list.pth'],
        2,
        ['weight_list.pth: 1 weights are not tensors (e.g. head.bias'],
    ),
    'checkpoint weights as integers': (
        lambda d: DIGITS + ['--eval', '--resume', d / 'weights_int64.pth'],
        2,
        ['weights_int64.pth', 'weights are stored as int64, not floating point'],
    ),
    'checkpoint weights as booleans': (
        lambda d: DIGITS + ['--eval', '--resume', d / 'weights_bool.pth'],
        2,
        ['weights_bool.pth', 'stored as bool'],
    ),
    'checkpoint without model weights': (
        lambda d: DIGITS + ['--eval', '--resume', d / 'model_none.pth'],
        2,
        ['model_none.pth: its model entry is None', 'model_ema'],
    ),
    'checkpoint input size text': (
        lambda d: EVAL_OWN_FLAGS + ['--resume', d / 'input_size_text.pth'],
        2,
        ["input-size: 'abc' in the flags (args) of checkpoint", 'input_size_text.pth', 'expected an integer'],
    ),
    'checkpoint input size negative': (
        lambda d: EVAL_OWN_FLAGS + ['--resume', d / 'input_size_negative.pth'],
        2,
        ['input-size: -5 in the flags (args) of checkpoint', 'must be at least 1'],
    ),
    'checkpoint model a number': (
        lambda d: EVAL_OWN_FLAGS + ['--resume', d / 'model_number.pth'],
        2,
        ['model: 7 in the flags (args) of checkpoint', 'model_number.pth', 'expected text'],
    ),
    'resume with another optimizer': (
        lambda d: DIGITS + ['--epochs', '2', '--opt', 'sgd', '--resume', d / 'trained' / 'checkpoint.pth'],
        2,
        ['was trained with --opt adamw', 'resume with --opt adamw'],
    ),
}


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp('inputs')
    (folder / 'empty_dir').mkdir()
    image_folders(folder / 'flat', val_flat=True)
    image_folders(folder / 'zebra', train_classes=('cat', 'dog'), val_classes=('cat', 'zebra'))
    (folder / 'typo.yaml').write_text('batch_sise: 3\n')
    (folder / 'inf.yaml').write_text('lr: .inf\n')
    (folder / 'empty_value.yaml').write_text('epochs:\n')
    (folder / 'aliases.yaml').write_text(ALIAS_CHAIN)
    write_checkpoints(folder)
    return folder


@pytest.fixture(scope='module')
def edited(tmp_path_factory):
    folder = tmp_path_factory.mktemp('edited')
    write_edited_checkpoints(folder)
    return folder


def run_in_process(argv, capsys):
    """(exit code, stdout, stderr) of main.py's command line, run here (faster than a new interpreter)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main.cli, [str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_refused_before_writing(argv, code, fragments, tmp_path, capsys):
    """One line and `code`, and the output folder as it was: config.yaml not (re)written."""
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'best.pth').write_bytes(b'weights of an earlier run')
    (out / 'log.txt').write_text('{"epoch": 0}\n')

    assert_one_line_error(*run_in_process(argv + ['--output_dir', out], capsys), code, *fragments)
    assert sorted(os.listdir(out)) == ['best.pth', 'log.txt']
    assert (out / 'best.pth').read_bytes() == b'weights of an earlier run'
    assert (out / 'log.txt').read_text() == '{"epoch": 0}\n'


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_is_one_line_and_damages_nothing(case, inputs, tmp_path, capsys):
    make_argv, code, fragments = CASES[case]
    assert_refused_before_writing(make_argv(inputs), code, fragments, tmp_path, capsys)
    assert not (inputs / 'code_ran').exists()


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_creates_no_output_folder(case, inputs, tmp_path, capsys):
    """Every check of flags, data and checkpoints comes before the output folder is made."""
    make_argv, code, fragments = CASES[case]
    out = tmp_path / 'new' / 'a' / 'b'
    assert_one_line_error(*run_in_process(make_argv(inputs) + ['--output_dir', out], capsys), code, *fragments)
    assert os.listdir(tmp_path) == []


def test_flags_are_never_guessed(capsys):
    """An abbreviation is an unknown flag (argparse would take --input for --input-size), answered as a mistyped
    config key is."""
    code, out, err = run_in_process(DIGITS + ['--eval', '--input', '48'], capsys)
    assert_one_line_error(code, out, err, 2, "unknown flag '--input'; did you mean '--input-size'?")
    code, out, err = run_in_process(DIGITS + ['--batchsize=3'], capsys)
    assert_one_line_error(code, out, err, 2, "unknown flag '--batchsize'; did you mean '--batch-size'?")


@pytest.mark.slow  # trains the checkpoint it edits
@pytest.mark.parametrize('case', list(CHECKPOINT_CASES))
def test_a_hand_edited_checkpoint_is_one_line_naming_file_and_field(case, edited, tmp_path, capsys):
    make_argv, code, fragments = CHECKPOINT_CASES[case]
    assert_refused_before_writing(make_argv(edited), code, fragments, tmp_path, capsys)


@pytest.mark.parametrize(
    'output_dir, fragments',
    [
        ('/sys', ['cannot write to --output_dir /sys', 'choose a writable folder']),  # not writable, even by root
        ('FILE/out', ['lies under a file']),
        ('FILE', ['exists and is not a folder']),
    ],
)
def test_unusable_output_folder_is_refused_before_any_work(output_dir, fragments, tmp_path, capsys):
    (tmp_path / 'FILE').write_text('a file')
    path = output_dir.replace('FILE', str(tmp_path / 'FILE'))
    code, out, err = run_in_process(DIGITS + ['--eval', '--output_dir', path], capsys)
    assert_one_line_error(code, out, err, 2, *fragments)
    assert 'Test:' not in out and 'Weights:' not in out  # refused before evaluating, not after
    assert (tmp_path / 'FILE').read_text() == 'a file'


def test_bad_training_images_name_the_file_also_from_loader_workers(tmp_path, capsys):
    root = image_folders(tmp_path / 'data', train_classes=('a', 'b'), val_classes=('a', 'b'), size=(40, 40))
    truncated = root / 'train' / 'a' / 'cut.jpg'
    Image.new('RGB', (64, 64), (10, 200, 30)).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:300])
    common = TINY + [
        '--data-path',
        root,
        '--batch-size',
        '3',
        '--mixup',
        '0',
        '--cutmix',
        '0',
        '--epochs',
        '1',
        '--no-repeated-aug',
        '--no-model-ema',
    ]
    code, out, err = run_in_process(common, capsys)
    assert_one_line_error(code, out, err, 2, str(truncated), 'Truncated')

    truncated.unlink()
    (root / 'train' / 'b' / 'gone.png').symlink_to(root / 'nowhere.png')  # listed, then missing
    result = run_here(main, common + ['--num_workers', '2'])
    assert_one_line_error(
        result.returncode, result.stdout, result.stderr, 2, str(root / 'train' / 'b' / 'gone.png'), 'No such file'
    )
    assert 'DataLoader worker' not in result.stderr


def test_one_pixel_training_image_trains(tmp_path, capsys):
    root = image_folders(tmp_path / 'data', train_classes=('a', 'b'), val_classes=('a', 'b'), size=(1, 1))
    stats = main.cli(
        [
            str(a)
            for a in TINY
            + [
                '--data-path',
                root,
                '--batch-size',
                '2',
                '--epochs',
                '1',
                '--no-repeated-aug',
                '--no-model-ema',
                '--warmup-epochs',
                '0',
            ]
        ]
    )
    assert set(stats) == {'acc1', 'acc5', 'loss'}


def test_disk_full_during_a_save_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / 'checkpoint.pth'
    checkpoints.save_checkpoint({'epoch': 1}, path)

    def full_disk(obj, f):
        f.write(b'x' * 100)
        raise RuntimeError('[enforce fail at inline_container.cc:783] . unexpected pos 2857536 vs 2857424')

    monkeypatch.setattr(torch, 'save', full_disk)
    monkeypatch.setattr(utils, '_disk_is_full', lambda directory: True)

    def save(_):
        checkpoints.save_checkpoint({'epoch': 2}, path)

    with pytest.raises(SystemExit) as exit_info:
        run_cli(save, [])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err == f'error: no space left on device ({path}); the checkpoints already on disk are whole\n'
    monkeypatch.undo()
    assert checkpoints.load_checkpoint(path) == {'epoch': 1} and os.listdir(tmp_path) == ['checkpoint.pth']


@pytest.mark.slow
def test_ctrl_c_is_one_line(tmp_path):
    process = subprocess.Popen(
        [sys.executable, 'main.py', *map(str, DIGITS), '--epochs', '50', '--output_dir', str(tmp_path)],
        cwd=ROOT,
        env=command_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:
        if line.startswith('Start training'):
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert_one_line_error(process.returncode, out, err, 130, 'interrupted')


@pytest.mark.slow
def test_non_finite_loss_stops_naming_epoch_and_step_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / 'out'
    good = run_here(main, DIGITS + ['--epochs', '1', '--output_dir', out])
    assert good.returncode == 0, good.stderr
    checkpoint = checkpoints.load_checkpoint(out / 'checkpoint.pth')
    checkpoint['model']['head.bias'][0] = float('nan')
    torch.save(checkpoint, tmp_path / 'nan.pth')
    before = (out / 'checkpoint.pth').read_bytes()

    result = run_here(main, DIGITS + ['--epochs', '2', '--resume', tmp_path / 'nan.pth', '--output_dir', out])

    assert_one_line_error(
        result.returncode, result.stdout, result.stderr, 1, 'loss is nan at epoch 1, step 0 of 44', 'training stopped'
    )
    assert (out / 'checkpoint.pth').read_bytes() == before
    assert [entry['epoch'] for entry in read_log(out)] == [0]

    # --eval of such weights says so, instead of reporting an accuracy.
    evaluated = run_here(main, DIGITS + ['--eval', '--resume', tmp_path / 'nan.pth'])
    assert_one_line_error(evaluated.returncode, evaluated.stdout, evaluated.stderr, 1, 'NaN or infinite', 'head.bias')


@pytest.mark.slow
def test_a_diverging_run_never_saves_a_poisoned_resume_point(tmp_path):
    """One step per epoch, warming up to a huge learning rate: epoch 0 is sound, epoch 1's step has a finite
    loss but leaves weights whose evaluation loss is not. They never replace the sound checkpoint, and the
    message names the resume point; a restart stops the same way."""
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


@pytest.mark.slow
def test_a_damaged_resume_point_names_the_whole_checkpoints_beside_it(edited, tmp_path, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    trained = edited / 'trained' / 'checkpoint.pth'
    for name in ('best.pth', 'backup0.pth'):
        shutil.copy(trained, out / name)
    (out / 'checkpoint.pth').write_bytes(trained.read_bytes()[:4000])  # cut short by a full disk, say
    (out / 'notes.pth').write_text('not a checkpoint')
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    code, stdout, stderr = run_in_process(DIGITS + ['--epochs', '2', '--output_dir', out], capsys)
    assert_one_line_error(
        code,
        stdout,
        stderr,
        2,
        f'{out / "checkpoint.pth"} is not a PyTorch checkpoint',
        f'; whole checkpoints in {out} to resume from: backup0.pth (epoch 0), best.pth (epoch 0) '
        f'(e.g. --resume {out / "backup0.pth"})',
    )
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    # What the line names resumes.
    resumed = run_here(main, DIGITS + ['--epochs', '2', '--resume', out / 'backup0.pth', '--output_dir', out])
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoints.load_checkpoint(out / 'checkpoint.pth')['epoch'] == 1


@pytest.mark.usefixtures('restores_kernel_settings')
def test_an_operation_without_a_deterministic_kernel_is_one_line_under_deterministic(tmp_path, monkeypatch):
    """On CUDA some backward kernels (bilinear upsampling in the segmenters, RoIAlign in Mask R-CNN) have no
    deterministic implementation; under --deterministic torch raises at the first such call (as here, with torch's
    own words, since no CPU kernel does). The run says which operation and how to go on, exit code 2."""
    message = (
        'upsample_bilinear2d_backward_out_cuda does not have a deterministic implementation, but you set '
        "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this operation, or "
        "you can use the 'warn_only=True' option, if that's acceptable for your application."
    )

    def loss_without_deterministic_kernel(args, num_classes):
        def loss(model, images, targets):
            assert torch.are_deterministic_algorithms_enabled()
            raise RuntimeError(message)

        return loss

    monkeypatch.setattr(main, 'build_loss', loss_without_deterministic_kernel)
    result = run_here(main, DIGITS + ['--epochs', '1', '--deterministic', '--output_dir', tmp_path])
    assert_one_line_error(
        result.returncode,
        result.stdout,
        result.stderr,
        2,
        'error: --deterministic: upsample_bilinear2d_backward_out_cuda has no deterministic '
        'implementation on this device; run without --deterministic',
    )
