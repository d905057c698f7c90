"""Mistakes a user plausibly makes that used to give wrong results or lose work silently: each is one line before
anything is written (and no run's files are replaced by another's), or, where nothing is wrong, a line saying what
happens. Tiny models on tiny class folders, in this process."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import main
import main_seg
from datasets_dense import ADE20KSegmentation, CocoInstances
from errors import UsageError
from helpers import ROOT
from train_helpers import NO_AUGMENTATION, TINY, assert_one_line_error, run_here

pytestmark = pytest.mark.usefixtures('one_thread')


def class_folders(root, classes=('cat', 'dog', 'fox'), per_class: int = 8, seed: int = 0):
    """train/ and val/ class folders of small random PNGs (the classes differ by colour)."""
    rng = np.random.default_rng(seed)
    for split in ('train', 'val'):
        for index, name in enumerate(classes):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 64, (16, 16, 3)) + 60 * (index % 4)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f'{i}.png')
    return root


FOLDERS = (
    TINY
    + NO_AUGMENTATION
    + [
        '--batch-size',
        '8',
        '--epochs',
        '1',
        '--warmup-epochs',
        '0',
        '--save-freq',
        '0',
        '--print-freq',
        '1',
    ]
)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """One epoch on three class folders: (data folder, output folder)."""
    root = tmp_path_factory.mktemp('mistakes')
    data, out = class_folders(root / 'data'), root / 'run'
    result = run_here(main, FOLDERS + ['--data-path', data, '--output_dir', out])
    assert result.returncode == 0, result.stderr
    return data, out


def snapshot(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_resuming_another_run_into_a_folder_with_a_run_of_its_own_is_refused(trained, tmp_path):
    data, other = trained
    result = run_here(main, FOLDERS + ['--data-path', data, '--epochs', '2', '--output_dir', tmp_path / 'mine'])
    assert result.returncode == 0, result.stderr
    before = snapshot(tmp_path / 'mine')
    result = run_here(
        main,
        FOLDERS
        + [
            '--data-path',
            data,
            '--epochs',
            '3',
            '--resume',
            other / 'checkpoint.pth',
            '--output_dir',
            tmp_path / 'mine',
        ],
    )
    assert_one_line_error(result.returncode, result.stdout, result.stderr, 2, 'holds a run of its own')
    assert snapshot(tmp_path / 'mine') == before  # its checkpoint, log and events untouched


def test_evaluating_on_folders_of_other_classes_is_refused(trained, tmp_path):
    """The same count of classes, other names: the accuracy would be that of shuffled labels."""
    data, out = trained
    other = class_folders(tmp_path / 'other', classes=('ant', 'bee', 'cow'))
    for extra in (
        ['--eval', '--resume', out / 'checkpoint.pth'],
        ['--finetune', '', '--resume', out / 'checkpoint.pth', '--epochs', '2', '--output_dir', tmp_path / 'r'],
    ):
        result = run_here(main, ['--data-path', other, '--device', 'cpu', '--num_workers', '0', *extra])
        assert_one_line_error(result.returncode, result.stdout, result.stderr, 2, 'was trained on other classes', 'cat')
    assert not (tmp_path / 'r').exists()
    same = run_here(main, ['--eval', '--resume', out / 'checkpoint.pth', '--data-path', data, '--device', 'cpu'])
    assert same.returncode == 0, same.stderr


@pytest.mark.parametrize('entry', ['--eval', '--finetune'])
def test_a_checkpoint_of_another_attention_kind_is_refused(trained, tmp_path, entry):
    """rala / rala_no_alpha / softmax share names and shapes: --model-kwargs without attn_types would load the
    linear-attention weights into RALA blocks."""
    data, _ = trained
    kinds = {**json.loads(TINY[TINY.index('--model-kwargs') + 1]), 'attn_types': ['rala_no_alpha'] * 4}
    out = tmp_path / 'no_alpha'
    result = run_here(main, FOLDERS + ['--model-kwargs', json.dumps(kinds), '--data-path', data, '--output_dir', out])
    assert result.returncode == 0, result.stderr
    without = {k: v for k, v in kinds.items() if k != 'attn_types'}
    args = [entry, out / 'checkpoint.pth'] if entry == '--finetune' else [entry, '--resume', out / 'checkpoint.pth']
    result = run_here(main, FOLDERS + ['--model-kwargs', json.dumps(without), '--data-path', data, *args])
    assert_one_line_error(result.returncode, result.stdout, result.stderr, 2, "attn_types ['rala_no_alpha'")


def test_optimizer_state_of_other_shapes_is_one_line_not_a_crash(trained, tmp_path):
    data, out = trained
    checkpoint = torch.load(out / 'checkpoint.pth', weights_only=True)
    state = checkpoint['optimizer']['state']
    first = next(iter(state.values()))
    first['exp_avg'] = torch.zeros(first['exp_avg'].numel() + 7)  # a hand-merged file
    torch.save(checkpoint, tmp_path / 'merged.pth')
    result = run_here(main, FOLDERS + ['--data-path', data, '--epochs', '2', '--resume', tmp_path / 'merged.pth'])
    assert_one_line_error(result.returncode, result.stdout, result.stderr, 2, 'optimizer state does not fit')


def test_what_a_training_run_says_about_what_it_leaves_out(trained, tmp_path):
    data, _ = trained
    result = run_here(main, FOLDERS + ['--data-path', data, '--batch-size', '10'])  # no --output_dir
    assert result.returncode == 0, result.stderr
    assert 'warning: no --output_dir: nothing is saved' in result.stdout
    assert 'note: 4 of the 24 training images are left out of each epoch' in result.stdout


def test_running_accuracy_counts_images_not_batches(trained):
    """Batches of 10, 10 and 4 images: the running mean in the progress line is the final accuracy."""
    data, out = trained
    result = run_here(
        main,
        [
            '--eval',
            '--resume',
            out / 'checkpoint.pth',
            '--data-path',
            data,
            '--batch-size',
            '10',
            '--print-freq',
            '1',
            '--device',
            'cpu',
            '--num_workers',
            '0',
        ],
    )
    running = [line for line in result.stdout.splitlines() if line.startswith('Test: [2/3]')][0]
    final = [line for line in result.stdout.splitlines() if line.startswith('* Weights')][0]
    mean = float(running.split('acc1: ')[1].split('(')[1].split(')')[0])
    assert f'acc1 {mean:.3f}' in final


def test_ctrl_c_in_the_first_epoch_says_nothing_was_written(trained, tmp_path, monkeypatch):
    data, _ = trained
    import engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, 'train_one_epoch', interrupted)
    result = run_here(main, FOLDERS + ['--data-path', data, '--output_dir', tmp_path / 'run'])
    assert_one_line_error(result.returncode, result.stdout, result.stderr, 130, 'no checkpoint was written yet')


def test_the_authors_drop_path_is_said_and_their_documented_command_gives_their_rate(trained):
    data, _ = trained
    result = run_here(main, FOLDERS + ['--data-path', data, '--drop-path', '0.05'])
    assert "note: --drop-path 0.05 replaces RAVLT_T's own 0.1" in result.stdout
    args = main.get_args_parser().parse_args(['--warmup-epochs', '5', '--model', 'RAVLT_T', '--epoch', '300'])
    assert args.drop_path is None  # the variant's own rate, 0.1, as the authors' RAVLT_T trained


@pytest.mark.slow  # six epochs
def test_the_schedule_can_step_as_the_authors_loop(trained, tmp_path):
    """Epoch e at lr(e - 1): epochs 0 and 1 both at the warm-up's start."""
    data, _ = trained
    lrs = {}
    for lag in (False, True):
        out = tmp_path / str(lag)
        args = FOLDERS + ['--data-path', data, '--epochs', '3', '--warmup-epochs', '2', '--output_dir', out]
        result = run_here(main, args + (['--sched-after-epoch'] if lag else []))
        assert result.returncode == 0, result.stderr
        lrs[lag] = [json.loads(line)['train_lr'] for line in (out / 'log.txt').read_text().splitlines()]
    assert lrs[True][0] == lrs[True][1] == lrs[False][0] and lrs[True][2] == lrs[False][1]


@pytest.mark.parametrize('category', [-1, -5])  # -1 wrapped to the last class's label, -5 was a traceback
def test_coco_category_ids_below_zero_are_refused(tmp_path, category):
    os.makedirs(tmp_path / 'annotations')
    os.makedirs(tmp_path / 'val2017')
    annotations = {
        'images': [{'id': 1, 'file_name': 'a.png', 'height': 8, 'width': 8}],
        'annotations': [
            {'id': 1, 'image_id': 1, 'category_id': category, 'bbox': [0, 0, 4, 4], 'area': 16, 'iscrowd': 0}
        ],
        'categories': [{'id': category, 'name': 'minus'}, {'id': 1, 'name': 'one'}],
    }
    (tmp_path / 'annotations' / 'instances_val2017.json').write_text(json.dumps(annotations))
    with pytest.raises(UsageError, match='category ids must be integers, 0 or more'):
        CocoInstances(str(tmp_path), 'val2017', False, False, 0)


@pytest.mark.parametrize('label', [256, 151])
def test_ade20k_labels_outside_the_classes_are_refused(tmp_path, label):
    """A 16-bit label 256 would become 255, the ignored label."""
    for folder in ('images/validation', 'annotations/validation'):
        os.makedirs(tmp_path / folder)
    Image.new('RGB', (8, 8)).save(tmp_path / 'images/validation/a.jpg')
    mask = np.ones((8, 8), dtype=np.uint16)
    mask[0, 0] = label
    Image.fromarray(mask).save(tmp_path / 'annotations/validation/a.png')  # 16 bits per pixel
    with pytest.raises(UsageError, match=f'holds label {label}, outside 0..150'):
        ADE20KSegmentation(str(tmp_path), 'validation', False, num_classes=150)
    result = run_here(main_seg, ['--eval', '--data-path', tmp_path, '--device', 'cpu', '--model', 'RAVLT_T'])
    assert_one_line_error(result.returncode, result.stdout, result.stderr, 2, f'holds label {label}')


def test_an_old_python_is_told_before_anything_is_installed(tmp_path):
    """Python 3.9 used to meet pip's conflict error after minutes of downloads."""
    fake = tmp_path / 'python3'
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Python 3.9.18"\nexit 1\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f'{tmp_path}:{os.environ["PATH"]}', RAVLT_VENV_ROOT=str(tmp_path / 'venvs'))
    result = subprocess.run(['bash', '-c', 'source scripts/env.sh'], cwd=ROOT, env=env, capture_output=True, text=True)
    assert_one_line_error(
        result.returncode, result.stdout, result.stderr, 1, 'Python 3.10 or newer is needed', '3.9.18'
    )
    assert not (tmp_path / 'venvs').exists()
