"""main.py end to end on DIGITS (CPU): training writes checkpoints, logs, TensorBoard events and the
resolved config; --eval reproduces the logged accuracy; the authors' checkpoint layout (args as an
argparse.Namespace) evaluates, resumes and fine-tunes."""
import argparse
import json
import os

import pytest
import timm
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main
import utils
from train_helpers import DIGITS, TINY_MODEL_KWARGS, assert_state_dicts_equal, one_thread, read_log, run_main

pytestmark = pytest.mark.usefixtures('one_thread')

LOG_KEYS = {'epoch', 'n_parameters', 'train_lr', 'train_loss', 'test_loss', 'test_acc1', 'test_acc5',
            'test_ema_loss', 'test_ema_acc1', 'test_ema_acc5'}


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
    """Two epochs of a tiny RAVLT on DIGITS, a backup after each."""
    out = tmp_path_factory.mktemp('digits')
    result = run_main(DIGITS + ['--epochs', '2', '--save-freq', '1', '--output_dir', out])
    assert result.returncode == 0, result.stderr
    return out, result


def authors_layout(checkpoint: dict, epoch: int) -> dict:
    """Our checkpoint's weights and optimizer in the layout of the authors' RAVLT_*.pth files."""
    return {
        'model': checkpoint['model'], 'model_ema': checkpoint['model_ema'], 'optimizer': checkpoint['optimizer'],
        'lr_scheduler': checkpoint['lr_scheduler'], 'epoch': epoch, 'scaler': {},
        'args': argparse.Namespace(model='RAVLT_T', batch_size=128, lr=1e-3, drop_path=0.05, data_set='IMNET',
                                   output_dir='out', opt_betas=None, device='cuda'),
        'max_accuracy': 50.0,
    }


def test_digits_training_writes_checkpoints_logs_and_events(digits_run):
    out, result = digits_run
    assert {'checkpoint.pth', 'best.pth', 'best_ema.pth', 'backup0.pth', 'backup1.pth', 'log.txt',
            'config.yaml'} <= set(os.listdir(out))
    assert not [name for name in os.listdir(out) if name.endswith('.tmp')]
    for fragment in ('eta: ', 'lr: ', 'loss: ', '(360 images)'):
        assert fragment in result.stdout
    # lr and EMA decay scale with the total batch (32): lr 0.016 * 32 / 512, decay 0.99996 ** (32 / 512).
    assert 'total batch 32, lr 0.001,' in result.stdout
    assert f'EMA decay per step: {0.99996 ** (32 / 512):.8f}' in result.stdout

    log = read_log(out)
    assert [entry['epoch'] for entry in log] == [0, 1]
    assert all(set(entry) == LOG_KEYS for entry in log)
    assert log[1]['train_loss'] < log[0]['train_loss']
    assert log[1]['test_acc1'] > 30.0  # chance is 10 %

    checkpoint = utils.load_checkpoint(out / 'checkpoint.pth')
    assert {'model', 'model_ema', 'optimizer', 'lr_scheduler', 'scaler', 'epoch', 'max_accuracy', 'args',
            'rng'} <= set(checkpoint)
    assert checkpoint['epoch'] == 1
    assert checkpoint['args']['model-kwargs'] == TINY_MODEL_KWARGS
    assert checkpoint['max_accuracy'] == max(entry['test_acc1'] for entry in log)
    assert utils.load_checkpoint(out / 'backup0.pth')['epoch'] == 0

    events = EventAccumulator(str(out))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    assert {'train/loss', 'train/lr', 'test/acc1', 'test/acc5', 'test/ema_acc1', 'test/ema_acc5'} <= tags
    assert [e.value for e in events.Scalars('test/acc1')] == pytest.approx([entry['test_acc1'] for entry in log])


def test_resolved_config_reproduces_the_run(digits_run):
    out, _ = digits_run
    with open(out / 'config.yaml') as f:
        written = yaml.safe_load(f)
    args = main.parse_args(['--config', str(out / 'config.yaml')])
    assert main.args_to_config(args) == written
    assert args.model_kwargs == TINY_MODEL_KWARGS and args.epochs == 2 and args.repeated_aug is False


def test_eval_reproduces_the_logged_accuracy(digits_run, tmp_path):
    out, _ = digits_run
    result = run_main(DIGITS + ['--eval', '--resume', out / 'checkpoint.pth', '--output_dir', tmp_path])
    assert result.returncode == 0, result.stderr
    with open(tmp_path / 'eval_results.json') as f:
        results = json.load(f)
    last = read_log(out)[-1]
    assert results == {'acc1': last['test_acc1'], 'acc5': last['test_acc5'],
                       'ema_acc1': last['test_ema_acc1'], 'ema_acc5': last['test_ema_acc5']}
    assert 'Acc@1' in result.stdout and 'EMA weights: Acc@1' in result.stdout


def test_eval_of_authors_checkpoint_layout(digits_run, tmp_path):
    out, _ = digits_run
    authors = tmp_path / 'RAVLT_T.pth'
    torch.save(authors_layout(utils.load_checkpoint(out / 'checkpoint.pth'), epoch=1), authors)
    result = run_main(DIGITS + ['--eval', '--resume', authors, '--output_dir', tmp_path / 'eval'])
    assert result.returncode == 0, result.stderr
    with open(tmp_path / 'eval' / 'eval_results.json') as f:
        results = json.load(f)
    last = read_log(out)[-1]
    assert (results['acc1'], results['ema_acc1']) == (last['test_acc1'], last['test_ema_acc1'])


def test_resume_from_authors_checkpoint_layout_continues_training(digits_run, tmp_path):
    out, _ = digits_run
    authors = tmp_path / 'RAVLT_T.pth'
    torch.save(authors_layout(utils.load_checkpoint(out / 'checkpoint.pth'), epoch=1), authors)
    result = run_main(DIGITS + ['--epochs', '3', '--resume', authors, '--output_dir', tmp_path / 'resumed'])
    assert result.returncode == 0, result.stderr
    assert f'Resumed from {authors} (epoch 1)' in result.stdout
    assert [entry['epoch'] for entry in read_log(tmp_path / 'resumed')] == [2]


def test_finetune_with_another_class_count_drops_the_head(tmp_path, capsys):
    torch.manual_seed(0)
    pretrained = timm.create_model('ravlt_t', num_classes=1000, **TINY_MODEL_KWARGS)
    path = tmp_path / 'in1k.pth'
    torch.save({'model': pretrained.state_dict(), 'args': argparse.Namespace(model='RAVLT_T')}, path)
    model = timm.create_model('ravlt_t', num_classes=10, **TINY_MODEL_KWARGS)
    new_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith('head.')}

    main.load_finetune_weights(model, str(path))

    assert 'classifier has 1000 classes, this data set 10: dropping it' in capsys.readouterr().out
    state = model.state_dict()
    assert_state_dicts_equal({k: v for k, v in state.items() if not k.startswith('head.')},
                             {k: v for k, v in pretrained.state_dict().items() if not k.startswith('head.')})
    assert_state_dicts_equal({k: v for k, v in state.items() if k.startswith('head.')}, new_head)
