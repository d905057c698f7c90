"""main.py end to end on DIGITS (CPU): training writes checkpoints, logs, TensorBoard events and the
resolved config; --eval reproduces the logged accuracy with no model flag repeated; the authors' checkpoint
layout (args as an argparse.Namespace) evaluates, resumes and fine-tunes; a resumed run applies changed
flags and says so; the switches --no-model-ema, --no-repeated-aug and --no-pin-mem do what they say."""

import argparse
import json
import math
import os
import sys

import pytest
import timm
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoints
import engine
import main
import run
import utils
from helpers import ROOT
from model_factory import model_from_checkpoint
from train_helpers import (
    DIGITS,
    TINY,
    TINY_MODEL_KWARGS,
    assert_one_line_error,
    assert_state_dicts_equal,
    read_log,
    run_here,
)

pytestmark = pytest.mark.usefixtures('one_thread')

LOG_KEYS = {
    'epoch',
    'step',
    'n_parameters',
    'train_lr',
    'train_loss',
    'test_loss',
    'test_acc1',
    'test_acc5',
    'test_ema_loss',
    'test_ema_acc1',
    'test_ema_acc5',
}


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
    """Two epochs of a tiny RAVLT on DIGITS, a backup after each; the EMA's arguments are recorded."""
    out = tmp_path_factory.mktemp('digits')
    made = []

    class RecordedEma(run.ModelEmaV3):
        def __init__(self, model, **kwargs):
            super().__init__(model, **kwargs)
            made.append(kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, 'ModelEmaV3', RecordedEma)
        result = run_here(main, DIGITS + ['--epochs', '2', '--save-freq', '1', '--output_dir', out])
    assert result.returncode == 0, result.stderr
    result.ema_kwargs = made
    return out, result


def authors_layout(checkpoint: dict, epoch: int) -> dict:
    """Our checkpoint's weights and optimizer in the layout of the authors' RAVLT_*.pth files."""
    return {
        'model': checkpoint['model'],
        'model_ema': checkpoint['model_ema'],
        'optimizer': checkpoint['optimizer'],
        'lr_scheduler': checkpoint['lr_scheduler'],
        'epoch': epoch,
        'scaler': {},
        'args': argparse.Namespace(
            model='RAVLT_T',
            batch_size=128,
            lr=1e-3,
            drop_path=0.05,
            data_set='IMNET',
            output_dir='out',
            opt_betas=None,
            device='cuda',
        ),
        'max_accuracy': 50.0,
    }


@pytest.mark.slow
def test_digits_training_writes_checkpoints_logs_and_events(digits_run):
    out, result = digits_run
    assert {
        'checkpoint.pth',
        'best.pth',
        'best_ema.pth',
        'backup0.pth',
        'backup1.pth',
        'log.txt',
        'config.yaml',
    } <= set(os.listdir(out))
    assert not [name for name in os.listdir(out) if name.endswith('.tmp')]
    for fragment in ('eta: ', 'lr: ', 'loss: ', '(360 images)'):
        assert fragment in result.stdout
    # Each evaluation's line says whose numbers they are.
    lines = result.stdout.splitlines()
    assert len([line for line in lines if line.startswith('* Weights: acc1 ')]) == 2
    assert len([line for line in lines if line.startswith('* EMA weights: acc1 ')]) == 2
    assert 'Acc@1' not in result.stdout
    # lr and EMA decay scale with the total batch (32): lr 0.016 * 32 / 512, decay 0.99996 ** (32 / 512).
    assert 'Learning rate 0.001: --lr 0.016 per 512 images x total batch 32 / 512\n' in result.stdout
    assert 'total batch 32, lr 0.001\n' in result.stdout
    assert result.ema_kwargs == [{'decay': 0.99996 ** (32 / 512), 'use_warmup': True, 'device': None}]

    log = read_log(out)
    assert [entry['epoch'] for entry in log] == [0, 1]
    assert all(set(entry) == LOG_KEYS for entry in log)
    assert log[1]['train_loss'] < log[0]['train_loss']
    assert log[1]['test_acc1'] > 30.0  # chance is 10 %

    checkpoint = checkpoints.load_checkpoint(out / 'checkpoint.pth')
    assert {
        'model',
        'model_ema',
        'optimizer',
        'lr_scheduler',
        'scaler',
        'epoch',
        'step',
        'best',
        'args',
        'meta',
        'log',
        'world_size',
    } == set(checkpoint)
    assert checkpoint['epoch'] == 1 and checkpoint['step'] == 2 * 44 and checkpoint['log'] == log[1]
    assert checkpoint['args']['model-kwargs'] == TINY_MODEL_KWARGS and checkpoint['world_size'] == 1
    assert checkpoint['meta'] == {'task': 'classification', 'classes': [str(c) for c in range(10)]}
    assert checkpoint['best']['acc1'] == max(entry['test_acc1'] for entry in log)
    assert checkpoint['best']['acc1_ema'] == max(entry['test_ema_acc1'] for entry in log)
    assert checkpoints.load_checkpoint(out / 'backup0.pth')['epoch'] == 0

    events = EventAccumulator(str(out))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    assert {'train/loss', 'train/lr', 'test/acc1', 'test/acc5', 'test/ema_acc1', 'test/ema_acc5'} <= tags
    assert [e.value for e in events.Scalars('test/acc1')] == pytest.approx([entry['test_acc1'] for entry in log])


@pytest.mark.slow
def test_resolved_config_reproduces_the_run(digits_run):
    out, _ = digits_run
    with open(out / 'config.yaml') as f:
        written = yaml.safe_load(f)
    parser = main.get_args_parser()
    args = parser.parse_args(['--config', str(out / 'config.yaml')])
    assert parser.to_config(args) == written
    assert args.model_kwargs == TINY_MODEL_KWARGS and args.epochs == 2 and args.repeated_aug is False


@pytest.mark.slow
def test_eval_reproduces_the_logged_accuracy_without_repeating_the_model_flags(digits_run, tmp_path):
    """The checkpoint carries its flags: --eval takes the model's shape (--model-kwargs) and input size from it."""
    out, _ = digits_run
    result = run_here(
        main,
        [
            '--data-set',
            'DIGITS',
            '--device',
            'cpu',
            '--num_workers',
            '0',
            '--batch-size',
            '32',
            '--eval',
            '--resume',
            out / 'checkpoint.pth',
            '--output_dir',
            tmp_path,
        ],
    )
    assert result.returncode == 0, result.stderr
    assert (
        f'From the checkpoint (give a flag to override): --model-kwargs {json.dumps(TINY_MODEL_KWARGS)}, '
        '--input-size 32' in result.stdout
    )
    with open(tmp_path / 'eval_results.json') as f:
        results = json.load(f)
    last = read_log(out)[-1]
    assert results == {k: last[f'test_{k}'] for k in ('acc1', 'acc5', 'loss', 'ema_acc1', 'ema_acc5', 'ema_loss')}
    assert '* Weights: acc1' in result.stdout and '* EMA weights: acc1' in result.stdout
    assert f'Results written to {tmp_path / "eval_results.json"}' in result.stdout
    # --no-model-ema: the weights alone, though the checkpoint has an EMA; without --output_dir nothing is written.
    plain = run_here(
        main,
        [
            '--data-set',
            'DIGITS',
            '--device',
            'cpu',
            '--num_workers',
            '0',
            '--no-model-ema',
            '--eval',
            '--resume',
            out / 'checkpoint.pth',
        ],
    )
    assert plain.returncode == 0, plain.stderr
    assert [line for line in plain.stdout.splitlines() if line.startswith('* ')] == [
        f'* Weights: {utils.format_metrics({k: last[f"test_{k}"] for k in ("acc1", "acc5", "loss")})} (360 images)'
    ]
    assert 'Results written' not in plain.stdout
    # Given again, a flag wins over the checkpoint's: here it no longer fits, and one line says why.
    wrong = run_here(
        main,
        [
            '--data-set',
            'DIGITS',
            '--device',
            'cpu',
            '--num_workers',
            '0',
            '--model-kwargs',
            '{}',
            '--eval',
            '--resume',
            out / 'checkpoint.pth',
        ],
    )
    assert_one_line_error(
        wrong.returncode,
        wrong.stdout,
        wrong.stderr,
        2,
        f'error: {out / "checkpoint.pth"}: the weights do not fit RAVLT_T (',
        'differ in shape',
        'check --model and --model-kwargs',
    )


@pytest.mark.slow
def test_eval_of_authors_checkpoint_layout(digits_run, tmp_path):
    out, _ = digits_run
    authors = tmp_path / 'RAVLT_T.pth'
    torch.save(authors_layout(checkpoints.load_checkpoint(out / 'checkpoint.pth'), epoch=1), authors)
    result = run_here(main, DIGITS + ['--eval', '--resume', authors, '--output_dir', tmp_path / 'eval'])
    assert result.returncode == 0, result.stderr
    with open(tmp_path / 'eval' / 'eval_results.json') as f:
        results = json.load(f)
    last = read_log(out)[-1]
    assert (results['acc1'], results['ema_acc1']) == (last['test_acc1'], last['test_ema_acc1'])
    # Without our model flags in it, the authors' file gives --model from its Namespace, ours the rest.
    bare = run_here(
        main,
        [
            '--data-set',
            'DIGITS',
            '--device',
            'cpu',
            '--num_workers',
            '0',
            '--input-size',
            '32',
            '--model-kwargs',
            json.dumps(TINY_MODEL_KWARGS),
            '--eval',
            '--resume',
            authors,
        ],
    )
    assert bare.returncode == 0, bare.stderr


@pytest.mark.slow
def test_resume_from_authors_checkpoint_layout_continues_training(digits_run, tmp_path):
    out, _ = digits_run
    authors = tmp_path / 'RAVLT_T.pth'
    torch.save(authors_layout(checkpoints.load_checkpoint(out / 'checkpoint.pth'), epoch=1), authors)
    result = run_here(main, DIGITS + ['--epochs', '3', '--resume', authors, '--output_dir', tmp_path / 'resumed'])
    assert result.returncode == 0, result.stderr
    assert f'Resumed from {authors} (epoch 1)' in result.stdout
    assert [entry['epoch'] for entry in read_log(tmp_path / 'resumed')] == [2]


@pytest.mark.slow
def test_finetune_takes_the_model_from_the_checkpoint_and_a_resume_does_not_reload_it(digits_run, tmp_path):
    out, _ = digits_run
    start = out / 'checkpoint.pth'
    # No --model-kwargs given: the checkpoint's apply (said), and with the same 10 classes its classifier is kept:
    # evaluated as it starts, the fine-tuning model scores the checkpoint's logged accuracy.
    plain = [
        '--data-set',
        'DIGITS',
        '--input-size',
        '32',
        '--device',
        'cpu',
        '--num_workers',
        '0',
        '--batch-size',
        '32',
    ]
    evaluated = run_here(main, plain + ['--eval', '--finetune', start, '--output_dir', tmp_path / 'eval'])
    assert evaluated.returncode == 0, evaluated.stderr
    assert (
        f'From --finetune {start} (give a flag to override): --model-kwargs {json.dumps(TINY_MODEL_KWARGS)}'
        in evaluated.stdout
    )
    assert 'new classifier' not in evaluated.stdout and 'dropping' not in evaluated.stdout
    assert json.loads((tmp_path / 'eval' / 'eval_results.json').read_text())['acc1'] == read_log(out)[-1]['test_acc1']

    # Given and not fitting: one line, and no folder left behind.
    refused = run_here(main, plain + ['--model-kwargs', '{}', '--finetune', start, '--output_dir', tmp_path / 'no'])
    assert_one_line_error(
        refused.returncode,
        refused.stdout,
        refused.stderr,
        2,
        f'error: --finetune {start}: the weights do not fit RAVLT_T (',
        'check --model and --model-kwargs',
    )
    assert not (tmp_path / 'no').exists()

    # Training records the flags taken; started again, it resumes without loading the --finetune weights first.
    train = DIGITS[DIGITS.index('--data-set') :] + [
        '--input-size',
        '32',
        '--device',
        'cpu',
        '--num_workers',
        '0',
        '--finetune',
        start,
        '--output_dir',
        tmp_path / 'ft',
    ]
    first = run_here(main, train + ['--epochs', '1'])
    assert first.returncode == 0, first.stderr
    assert f'Fine-tuning RAVLT_T from {start}' in first.stdout
    assert yaml.safe_load((tmp_path / 'ft' / 'config.yaml').read_text())['model-kwargs'] == TINY_MODEL_KWARGS
    again = run_here(main, train + ['--epochs', '2'])
    assert again.returncode == 0, again.stderr
    assert (
        f'--finetune {start} is not loaded: the run goes on from {tmp_path / "ft" / "checkpoint.pth"}' in again.stdout
    )
    assert 'Fine-tuning' not in again.stdout
    assert [entry['epoch'] for entry in read_log(tmp_path / 'ft')] == [0, 1]


@pytest.mark.slow
def test_finetune_with_another_class_count_gets_a_new_classifier(tmp_path):
    torch.manual_seed(0)
    pretrained = timm.create_model('ravlt_t', num_classes=1000, **TINY_MODEL_KWARGS)
    path = tmp_path / 'in1k.pth'
    torch.save({'model': pretrained.state_dict(), 'args': argparse.Namespace(model='RAVLT_T')}, path)
    result = run_here(main, TINY + ['--data-set', 'DIGITS', '--eval', '--finetune', path])
    assert result.returncode == 0, result.stderr
    assert (
        f"--finetune {path}: a new classifier for the 10 classes of this data set (the checkpoint's has 1000)"
        in result.stdout
    )

    model, _ = model_from_checkpoint(
        checkpoints.load_checkpoint(path), str(path), model_kwargs=TINY_MODEL_KWARGS, num_classes=10
    )
    assert model.head.weight.shape[0] == 10
    state = model.state_dict()
    assert_state_dicts_equal(
        {k: v for k, v in state.items() if not k.startswith('head.')},
        {k: v for k, v in pretrained.state_dict().items() if not k.startswith('head.')},
    )


@pytest.mark.slow
def test_a_finished_run_started_again_says_it_is_complete(digits_run, tmp_path):
    out, _ = digits_run
    folder = tmp_path / 'again'
    folder.mkdir()
    for name in ('checkpoint.pth', 'log.txt'):
        (folder / name).write_bytes((out / name).read_bytes())
    before = (folder / 'checkpoint.pth').read_bytes()
    result = run_here(main, DIGITS + ['--epochs', '2', '--save-freq', '1', '--output_dir', folder])
    assert result.returncode == 0, result.stderr
    assert (
        f'The run is complete: {folder / "checkpoint.pth"} (epoch 1, step 88) ends --epochs 2; give --epochs '
        'above 2 to continue it' in result.stdout
    )
    assert 'Start training' not in result.stdout and 'Training time' not in result.stdout
    assert sorted(os.listdir(folder)) == ['checkpoint.pth', 'log.txt']  # nothing written
    assert (folder / 'checkpoint.pth').read_bytes() == before
    args = main.get_args_parser().parse_args([str(a) for a in DIGITS + ['--epochs', '2', '--output_dir', folder]])
    assert main.main(args) == {k: read_log(out)[-1][f'test_{k}'] for k in ('loss', 'acc1', 'acc5')}


@pytest.mark.slow
def test_resumed_run_applies_changed_flags_and_says_so(digits_run, tmp_path):
    out, _ = digits_run
    resumed = tmp_path / 'resumed'
    resumed.mkdir()
    for name in ('checkpoint.pth', 'log.txt'):
        (resumed / name).write_bytes((out / name).read_bytes())
    result = run_here(main, DIGITS + ['--epochs', '3', '--lr', '0.032', '--save-freq', '1', '--output_dir', resumed])
    assert result.returncode == 0, result.stderr
    assert 'Changed since the checkpoint, applied: --epochs 2 -> 3, --lr 0.016 -> 0.032' in result.stdout
    log = read_log(resumed)
    assert [entry['epoch'] for entry in log] == [0, 1, 2]
    assert log[2]['train_lr'] == pytest.approx(
        0.032 * 32 / 512 * 0.5 * (1 + math.cos(math.pi * 2 / 3)) + 1e-5 * 0.5 * (1 - math.cos(math.pi * 2 / 3))
    )
    assert yaml.safe_load((resumed / 'config.yaml').read_text())['lr'] == 0.032


@pytest.mark.slow
def test_learning_rate_is_readable_a_warm_up_over_the_whole_run_warns_and_no_model_ema_keeps_none(tmp_path):
    """The learning rate prints readably; a warm-up longer than the run is warned about; --no-model-ema trains
    without an EMA: none evaluated, logged, saved or best_ema.pth."""
    result = run_here(
        main,
        TINY
        + [
            '--data-set',
            'DIGITS',
            '--batch-size',
            '32',
            '--epochs',
            '1',
            '--mixup',
            '0',
            '--cutmix',
            '0',
            '--aa',
            'none',
            '--no-repeated-aug',
            '--no-model-ema',
            '--print-freq',
            '20',
            '--output_dir',
            tmp_path,
        ],
    )
    assert result.returncode == 0, result.stderr
    assert 'warning: the warm-up covers the whole run: the learning rate never reaches its set value' in result.stdout
    assert 'lr: 1e-06' in result.stdout and 'lr: 0.000000' not in result.stdout
    assert 'EMA' not in result.stdout
    written = {name for name in os.listdir(tmp_path) if not name.startswith('events.out.tfevents.')}
    assert written == {'backup0.pth', 'best.pth', 'checkpoint.pth', 'config.yaml', 'log.txt'}  # no best_ema.pth
    assert 'model_ema' not in checkpoints.load_checkpoint(tmp_path / 'checkpoint.pth')
    assert set(read_log(tmp_path)[0]) == {k for k in LOG_KEYS if 'ema' not in k}


@pytest.mark.slow
def test_the_demo_config_warms_up_within_its_first_epoch(tmp_path):
    """Stepped once per epoch, the demo's one-epoch warm-up ran its whole first epoch at --warmup-lr (1e-6);
    stepped per update, the first epoch ramps to the set rate (1e-3 at batch 64), whose mean is half of it."""
    result = run_here(
        main,
        [
            '--config',
            'configs/demo_digits.yaml',
            '--model-kwargs',
            json.dumps(TINY_MODEL_KWARGS),
            '--epochs',
            '2',
            '--print-freq',
            '100',
            '--output_dir',
            tmp_path,
        ],
    )
    assert result.returncode == 0, result.stderr
    first, second = [entry['train_lr'] for entry in read_log(tmp_path)]
    assert 0.4e-3 < first < 0.6e-3 and 1e-5 < second < 1e-3


def digit_folders(root, train_per_class: int = 30, val_per_class: int = 10):
    """DIGITS as class folders (--data-set IMNET layout) of 32 px PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = {}
    for image, label in zip(digits.images, digits.target):
        index = counts[label] = counts.get(label, 0) + 1
        if index > train_per_class + val_per_class:
            continue
        folder = root / ('train' if index <= train_per_class else 'val') / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * 255 / 16).astype('uint8')
        Image.fromarray(pixels).convert('RGB').resize((32, 32), Image.BILINEAR).save(folder / f'{index}.png')
    return root


@pytest.mark.slow
def test_the_small_data_finetuning_recipe(digits_run, tmp_path):
    """configs/finetune_small.yaml on a small class-folder set at 32 px: without the ImageNet recipe's mixup,
    cutmix, RandAugment and erasing, the training loss measures the fit: below chance and falling."""
    out, _ = digits_run
    result = run_here(
        main,
        [
            '--config',
            'configs/finetune_small.yaml',
            '--finetune',
            out / 'checkpoint.pth',
            '--data-path',
            digit_folders(tmp_path / 'data'),
            '--input-size',
            '32',
            '--epochs',
            '3',
            '--batch-size',
            '32',
            '--device',
            'cpu',
            '--num_workers',
            '0',
            '--print-freq',
            '100',
            '--output_dir',
            tmp_path / 'out',
        ],
    )
    assert result.returncode == 0, result.stderr
    log = read_log(tmp_path / 'out')
    assert all(entry['train_loss'] < math.log(10) for entry in log)
    assert log[-1]['train_loss'] < log[0]['train_loss'] and log[-1]['test_acc1'] > 50
    config = yaml.safe_load((tmp_path / 'out' / 'config.yaml').read_text())
    assert (config['mixup'], config['cutmix'], config['aa'], config['reprob']) == (0.0, 0.0, 'none', 0.0)


@pytest.mark.slow
def test_an_epoch_is_serialised_once_under_all_its_names(tmp_path, monkeypatch):
    """best.pth, best_ema.pth, backup0.pth and checkpoint.pth of epoch 0: one torch.save (rank 0 alone does it while
    the other processes wait), the other names hard links to that file."""
    saves, save = [], torch.save
    monkeypatch.setattr(torch, 'save', lambda obj, f, *a, **k: saves.append(1) or save(obj, f, *a, **k))
    result = run_here(main, DIGITS + ['--epochs', '1', '--save-freq', '1', '--output_dir', tmp_path])
    assert result.returncode == 0, result.stderr
    assert len(saves) == 1
    names = ['best.pth', 'best_ema.pth', 'backup0.pth', 'checkpoint.pth']
    assert len({os.stat(tmp_path / name).st_ino for name in names}) == 1
    assert os.stat(tmp_path / 'best.pth').st_nlink == 4
    assert checkpoints.load_checkpoint(tmp_path / 'checkpoint.pth')['epoch'] == 0


def test_where_the_file_system_has_no_hard_links_the_names_are_whole_copies(tmp_path, monkeypatch):
    def no_links(source, target):
        raise PermissionError(1, 'Operation not permitted')

    monkeypatch.setattr(os, 'link', no_links)
    (tmp_path / 'best.pth').write_bytes(b'an older best')
    checkpoints.save_checkpoint({'epoch': 3, 'w': torch.arange(5)}, tmp_path / 'best.pth', tmp_path / 'checkpoint.pth')
    assert (tmp_path / 'best.pth').read_bytes() == (tmp_path / 'checkpoint.pth').read_bytes()
    assert os.stat(tmp_path / 'best.pth').st_ino != os.stat(tmp_path / 'checkpoint.pth').st_ino
    assert sorted(os.listdir(tmp_path)) == ['best.pth', 'checkpoint.pth']  # no temporary file left
    assert checkpoints.load_checkpoint(tmp_path / 'checkpoint.pth')['epoch'] == 3


@pytest.mark.slow
def test_the_resumed_checkpoint_is_released_before_training(digits_run, tmp_path, monkeypatch):
    """The loaded checkpoint (weights, EMA, optimizer state: ~1.5 GB per process for RAVLT-L) is not kept for the
    whole run: once loaded into the model and optimizer, nothing holds it."""
    import gc
    import weakref

    out, _ = digits_run
    (tmp_path / 'checkpoint.pth').write_bytes((out / 'checkpoint.pth').read_bytes())
    load, held = checkpoints.load_checkpoint, []

    def loading(*args, **kwargs):
        checkpoint = load(*args, **kwargs)
        held.append(weakref.ref(next(iter(checkpoint['model'].values()))))
        return checkpoint

    def training(*args, **kwargs):
        gc.collect()
        held.append(held[0]() is None)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, 'load_checkpoint', loading)
    monkeypatch.setattr(engine, 'train_one_epoch', training)
    result = run_here(main, DIGITS + ['--epochs', '3', '--output_dir', tmp_path])
    assert result.returncode == 130 and 'Resumed from' in result.stdout
    assert held[1:] == [True]


@pytest.mark.slow
def test_data_loading_workers_live_across_epochs_and_draw_what_one_process_draws(tmp_path, monkeypatch):
    """Workers are kept across epochs (not started again for each), and each sample's augmentation is still a
    function of (seed, epoch, rank, position): two workers train exactly as none."""
    import utils

    seen, getitem = tmp_path / 'seen.txt', utils.SeededDataset.__getitem__

    def recorded(dataset, item):
        if len(dataset) > 1000:  # the training set (1,437 images; validation 360)
            with open(seen, 'a') as f:
                f.write(f'{os.getpid()} {item[1][1]}\n')
        return getitem(dataset, item)

    monkeypatch.setattr(utils.SeededDataset, '__getitem__', recorded)
    args = DIGITS + ['--epochs', '2', '--reprob', '0.5', '--model-ema-decay', '0.9']
    with_workers = run_here(main, args + ['--num_workers', '2', '--output_dir', tmp_path / 'workers'])
    assert with_workers.returncode == 0, with_workers.stderr
    pids = {}
    for line in seen.read_text().splitlines():
        pid, epoch = map(int, line.split())
        pids.setdefault(epoch, set()).add(pid)
    assert pids[0] == pids[1] and len(pids[0]) == 2 and os.getpid() not in pids[0]
    alone = run_here(main, args + ['--num_workers', '0', '--output_dir', tmp_path / 'alone'])
    assert alone.returncode == 0, alone.stderr
    assert_state_dicts_equal(
        checkpoints.load_checkpoint(tmp_path / 'workers' / 'checkpoint.pth')['model'],
        checkpoints.load_checkpoint(tmp_path / 'alone' / 'checkpoint.pth')['model'],
    )
    assert read_log(tmp_path / 'workers') == read_log(tmp_path / 'alone')


def first_epoch_sampler(monkeypatch, argv) -> tuple:
    """(the training sampler's class, the indices of its epoch 0) of main.py with `argv` (no step is trained)."""
    seen = []

    def sampled(model, criterion, data_loader, *args, **kwargs):
        seen.append((type(data_loader.sampler.sampler), [index for index, _ in data_loader.sampler]))
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, 'train_one_epoch', sampled)
    result = run_here(main, argv)
    assert result.returncode == 130 and len(seen) == 1, result.stderr
    return seen[0]


def test_no_repeated_aug_samples_each_image_once(monkeypatch):
    """Repeated augmentation (timm's RepeatAugSampler, on by default as in the recipe) shows each image 3 times
    per epoch, one after the other, in an epoch of the image count rounded down to 256s (1,437: 1,280 samples of
    427 images); --no-repeated-aug is a plain DistributedSampler: every training image once."""
    from timm.data.distributed_sampler import RepeatAugSampler

    argv = TINY + ['--data-set', 'DIGITS', '--batch-size', '32', '--epochs', '1', '--no-model-ema']
    kind, repeated = first_epoch_sampler(monkeypatch, argv)
    assert kind is RepeatAugSampler and len(repeated) == 1280
    assert all(repeated[i] == repeated[i + 1] == repeated[i + 2] for i in range(0, 1278, 3))
    assert len(set(repeated)) == 427
    kind, plain = first_epoch_sampler(monkeypatch, argv + ['--no-repeated-aug'])
    assert kind is torch.utils.data.DistributedSampler and sorted(plain) == list(range(1437))


def test_no_pin_mem_turns_pinned_host_memory_off_on_cuda():
    """On CUDA the loaders pin their batches' host memory (asynchronous copies) unless --no-pin-mem; on the CPU
    there is nothing to pin."""
    data = torch.utils.data.TensorDataset(torch.zeros(4, 2))
    pinned = {}
    for argv, device in (([], 'cuda'), (['--no-pin-mem'], 'cuda'), ([], 'cpu')):
        args = main.get_args_parser().parse_args(argv + ['--num_workers', '0'])
        args.device, args.rank = torch.device(device), 0
        loader = utils.data_loader(data, torch.utils.data.SequentialSampler(data), 2, args)
        pinned[(args.pin_mem, device)] = loader.pin_memory
    assert pinned == {(True, 'cuda'): True, (False, 'cuda'): False, (True, 'cpu'): False}


def own_frames() -> list:
    """'file:function' of the frames on the caller's stack that are the project's own code, the outermost first:
    the repository's Python files outside models/ and tests/ (the entry point, run.py, engine.py ...)."""
    frames, frame = [], sys._getframe(1)
    while frame is not None:
        relative = os.path.relpath(os.path.abspath(frame.f_code.co_filename), ROOT)
        outside = relative.startswith(('..', 'models' + os.sep, 'tests' + os.sep)) or 'site-packages' in relative
        if relative.endswith('.py') and not outside:
            frames.append(f'{relative}:{frame.f_code.co_qualname}')
        frame = frame.f_back
    return frames[::-1]


@pytest.mark.parametrize(
    'extra, frames',
    [
        ([], ['main.py:<module>', 'main.py:main', 'run.py:Run.train', 'engine.py:train_one_epoch']),
        (['--eval'], ['main.py:<module>', 'main.py:main', 'run.py:Run.evaluate', 'engine.py:evaluate']),
    ],
)
def test_the_path_to_the_model_is_short(monkeypatch, extra, frames):
    """From `python main.py` to the model's forward, in a training step and in --eval, at most 5 of the project's
    own frames (its Python files outside models/ and tests/; Python's, pytest's, torch's and this test's do not
    count) are on the stack: what a reader follows to the model is the entry point, the run and the loop. main.py
    runs as a script (runpy, as `python main.py` runs it); the first forward after run.prepare is the one counted."""
    import runpy

    class Reached(Exception):
        pass

    prepare = run.Run.prepare

    def prepared(self, *args, **kwargs):
        model, model_ema = prepare(self, *args, **kwargs)

        def first_forward(module, inputs):
            raise Reached(own_frames(), module.training)

        model.register_forward_pre_hook(first_forward)
        return model, model_ema

    monkeypatch.setattr(run.Run, 'prepare', prepared)
    monkeypatch.setattr(sys, 'argv', ['main.py', *map(str, DIGITS), *extra])
    with pytest.raises(Reached) as reached:
        runpy.run_path(os.path.join(ROOT, 'main.py'), run_name='__main__')
    assert reached.value.args == (frames, not extra)
    assert len(frames) <= 5
