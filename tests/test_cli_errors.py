"""Bad input to main.py: one line on stderr saying what is wrong and how to fix it, a non-zero exit, no
traceback, and the checkpoint already in the output folder untouched. A non-finite loss stops training
naming the epoch and step and keeps the last good checkpoint."""
import json
import os

import pytest
import torch

import main
import utils
from train_helpers import DIGITS, ROOT, TINY, assert_one_line_error, one_thread, read_log, run_main

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


def image_folders(root, val_with_classes: bool):
    """An IMNET-style tree with one tiny image per class; val/ flat when not `val_with_classes`."""
    from PIL import Image
    for split in ('train', 'val'):
        folder = root / split / 'cls' if split == 'train' or val_with_classes else root / split
        folder.mkdir(parents=True)
        Image.new('RGB', (8, 8)).save(folder / 'a.png')


CASES = {
    'unknown model': (lambda d: DIGITS + ['--model', 'ravlt_xl'], 2, ["unknown model 'ravlt_xl'", 'RAVLT_S', 'timm']),
    'missing data path': (lambda d: TINY + ['--data-path', d / 'nowhere'], 2, ['does not exist']),
    'no data path': (lambda d: TINY, 2, ['--data-set IMNET needs --data-path']),
    'empty data path': (lambda d: TINY + ['--data-path', d / 'empty_dir'], 2, ['is empty', 'DATA/train/<class>']),
    'val without class folders': (lambda d: TINY + ['--data-path', d / 'flat'], 2,
                                  ['val has no class folders', 'one folder per class']),
    'CIFAR absent': (lambda d: TINY + ['--data-set', 'CIFAR', '--data-path', d / 'empty_dir'], 2,
                     ['CIFAR-100 not found', 'cifar-100-python']),
    'batch size 0': (lambda d: DIGITS + ['--batch-size', '0'], 2, ['--batch-size must be at least 1, got 0']),
    'input size 0': (lambda d: DIGITS + ['--input-size', '0'], 2, ['--input-size must be at least 1, got 0']),
    'input size negative': (lambda d: DIGITS + ['--input-size', '-32'], 2, ['--input-size must be at least 1']),
    'batch size not a number': (lambda d: DIGITS + ['--batch-size', 'many'], 2, ["invalid int value: 'many'"]),
    'missing config': (lambda d: DIGITS + ['--config', d / 'nowhere.yaml'], 2, ['config file', 'does not exist']),
    'unknown config key': (lambda d: DIGITS + ['--config', d / 'typo.yaml'], 2,
                           ["unknown key 'batch_sise'", "did you mean 'batch-size'"]),
    'unknown optimizer': (lambda d: DIGITS + ['--opt', 'adamx'], 2, ['Optimizer adamx not found']),
    'bad model kwargs': (lambda d: DIGITS + ['--model-kwargs', '{"depth": 3}'], 2, ['cannot build ravlt_t']),
    'checkpoint missing': (lambda d: DIGITS + ['--eval', '--resume', d / 'nowhere.pth'], 2, ['does not exist']),
    'checkpoint empty': (lambda d: DIGITS + ['--eval', '--resume', d / 'empty.pth'], 2, ['is empty']),
    'not a checkpoint': (lambda d: DIGITS + ['--eval', '--resume', d / 'not_a_checkpoint.pth'], 2,
                         ['is not a PyTorch checkpoint']),
    'checkpoint needs code execution': (lambda d: DIGITS + ['--eval', '--resume', d / 'code.pth'], 2,
                                        ['needs code execution to unpickle', 'leave_marker']),
    'checkpoint of another variant': (lambda d: TINY + ['--data-set', 'DIGITS', '--model-kwargs', '{}', '--eval',
                                                        '--resume', d / 'ravlt_s.pth'], 2,
                                      ['RAVLT_S weights', 'the model is ravlt_t', 'pass --model RAVLT_S']),
}


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp('inputs')
    (folder / 'empty_dir').mkdir()
    image_folders(folder / 'flat', val_with_classes=False)
    (folder / 'typo.yaml').write_text('batch_sise: 3\n')
    write_checkpoints(folder)
    return folder


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_is_one_line_and_damages_nothing(case, inputs, tmp_path, capsys):
    make_argv, code, fragments = CASES[case]
    out = tmp_path / 'out'
    out.mkdir()
    torch.save({'epoch': 3, 'model': {}}, out / 'checkpoint.pth')
    before = (out / 'checkpoint.pth').read_bytes()

    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(main.cli, [str(a) for a in make_argv(inputs)] + ['--output_dir', str(out)])
    captured = capsys.readouterr()

    assert_one_line_error(exit_info.value.code, captured.out, captured.err, code, *fragments)
    assert sorted(os.listdir(out)) == ['checkpoint.pth']
    assert (out / 'checkpoint.pth').read_bytes() == before
    assert not (inputs / 'code_ran').exists()


def test_unknown_config_key_from_the_command_line(inputs):
    result = run_main(DIGITS + ['--config', inputs / 'typo.yaml'])
    assert_one_line_error(result.returncode, result.stdout, result.stderr, 2, "unknown key 'batch_sise'")


def test_non_finite_loss_stops_naming_epoch_and_step_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / 'out'
    good = run_main(DIGITS + ['--epochs', '1', '--output_dir', out])
    assert good.returncode == 0, good.stderr
    checkpoint = utils.load_checkpoint(out / 'checkpoint.pth')
    checkpoint['model']['head.bias'][0] = float('nan')
    torch.save(checkpoint, tmp_path / 'nan.pth')
    before = (out / 'checkpoint.pth').read_bytes()

    result = run_main(DIGITS + ['--epochs', '2', '--resume', tmp_path / 'nan.pth', '--output_dir', out])

    assert_one_line_error(result.returncode, result.stdout, result.stderr, 1,
                          'loss is nan at epoch 1, step 0 of 44', 'training stopped')
    assert (out / 'checkpoint.pth').read_bytes() == before
    assert [entry['epoch'] for entry in read_log(out)] == [0]
