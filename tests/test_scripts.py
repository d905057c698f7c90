"""What every script shares: it runs from the checkout without PYTHONPATH (issue 27: after `pip install -e .` they
failed with `No module named 'models'`), and its --help is whole; and the two scripts of the GPU check:
scripts/compare_checkpoints.py (bit-identical means the same bits, in any kind of checkpoint) and
scripts/host_syncs.py (its counting, on the CPU)."""

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

import compare_checkpoints
import host_syncs
from checkpoints import save_checkpoint
from errors import UsageError
from helpers import ROOT
from train_helpers import TINY

SCRIPTS = sorted(
    name[:-3]
    for name in os.listdir(os.path.join(ROOT, 'scripts'))
    if name.endswith('.py') and name != 'figures.py'  # the module the figures share
)


def test_the_scripts_are_the_ones_documented():
    assert SCRIPTS == [
        'ablation',
        'benchmark',
        'compare_checkpoints',
        'export_onnx',
        'flops',
        'host_syncs',
        'plot_logs',
        'rank_analysis',
        'resolution',
    ]


@pytest.mark.parametrize('name', SCRIPTS)
def test_help_exits_0_and_its_description_is_whole(name, capsys):
    """issue 27: two scripts' --help ended mid-sentence (the first line of a docstring whose sentence went on)."""
    parser = importlib.import_module(name).get_args_parser()
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(['--help'])
    assert stopped.value.code == 0
    help_text = capsys.readouterr().out
    assert parser.description.rstrip().endswith('.'), parser.description
    assert ' '.join(parser.description.split()) in ' '.join(help_text.split())


@pytest.mark.slow  # nine interpreters importing torch
def test_every_script_runs_from_the_checkout_without_pythonpath(tmp_path):
    """The repository's interpreter, no PYTHONPATH, another working folder: as after `pip install -e .`."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['OMP_NUM_THREADS'] = '1'
    processes = {
        name: subprocess.Popen(
            [sys.executable, os.path.join(ROOT, 'scripts', f'{name}.py'), '--help'],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in SCRIPTS
    }
    for name, process in processes.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0 and out.startswith(f'usage: {name}.py'), (name, err)


# ---- compare_checkpoints.py ----


def compare(tmp_path, a: dict, b: dict, capsys) -> tuple:
    """(exit code, printed line) of compare_checkpoints.py on two checkpoints."""
    save_checkpoint(a, tmp_path / 'a.pth')
    save_checkpoint(b, tmp_path / 'b.pth')
    args = compare_checkpoints.get_args_parser().parse_args([tmp_path / 'a.pth', tmp_path / 'b.pth'])
    try:
        compare_checkpoints.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().out.strip()


def training_checkpoint() -> dict:
    return {
        'model': {'w': torch.arange(4.0), 'b': torch.zeros(2)},
        'model_ema': {'w': torch.arange(4.0), 'b': torch.zeros(2)},
        'optimizer': {'state': {0: {'exp_avg': torch.ones(4), 'step': torch.tensor(8.0)}}, 'param_groups': []},
        'scaler': {'scale': 1.0},
        'epoch': 1,
        'step': 8,
        'args': {'output_dir': 'out_a'},
    }


def test_compare_training_checkpoints(tmp_path, capsys):
    a, b = training_checkpoint(), training_checkpoint()
    b['args'] = {'output_dir': 'out_b'}  # the flags name the output folder: not compared
    assert compare(tmp_path, a, b, capsys) == (0, 'bit-identical')
    b['optimizer']['state'][0]['exp_avg'][2] += 1e-7
    code, line = compare(tmp_path, a, b, capsys)
    assert code == 1 and line.startswith('1 difference; first: optimizer.state.0.exp_avg: differs')
    b['model_ema']['b'] = torch.zeros(3)
    b['step'] = 9
    code, line = compare(tmp_path, a, b, capsys)
    assert code == 1 and line == '3 differences; first: step: 8 vs 9'


def test_compare_raw_state_dicts_and_nan(tmp_path, capsys):
    """issue 27: two different raw state dicts were "bit-identical" (only `model` was looked in), and a file with a
    NaN compared with itself had "1 differences"."""
    weights = {'layer.weight': torch.arange(6.0).reshape(2, 3), 'layer.bias': torch.tensor([0.0, float('nan')])}
    other = {'layer.weight': torch.arange(6.0).reshape(2, 3) * 2, 'layer.bias': weights['layer.bias'].clone()}
    code, line = compare(tmp_path, weights, other, capsys)
    assert (code, line) == (1, '1 difference; first: layer.weight: differs (largest difference 5)')
    assert compare(tmp_path, weights, {k: v.clone() for k, v in weights.items()}, capsys) == (0, 'bit-identical')
    # Bits, not values: -0.0 == 0.0 in value, not in bits; so are NaNs with other payloads.
    negative = dict(weights, **{'layer.bias': torch.tensor([-0.0, float('nan')])})
    code, line = compare(tmp_path, weights, negative, capsys)
    assert code == 1 and line.startswith('1 difference; first: layer.bias: differs')
    code, line = compare(tmp_path, weights, {'module.' + k: v for k, v in weights.items()}, capsys)
    assert code == 1 and line == '4 differences; first: layer.bias: only in the first'


# ---- host_syncs.py ----


def test_host_syncs_refuses_what_it_cannot_do_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(host_syncs, 'count', lambda argv: pytest.fail('trained before the checks'))
    (tmp_path / 'log.txt').write_text('precious')
    with pytest.raises(UsageError, match='--json .*log.txt: expected a file name ending in .json'):
        host_syncs.main(host_syncs.get_args_parser().parse_args(['--json', tmp_path / 'log.txt', '--', '--epochs', 1]))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(UsageError, match='no CUDA device is visible'):
        host_syncs.main(host_syncs.get_args_parser().parse_args(['--json', tmp_path / 'syncs.json']))
    assert (tmp_path / 'log.txt').read_text() == 'precious' and sorted(os.listdir(tmp_path)) == ['log.txt']


@pytest.mark.slow  # a training
def test_host_syncs_counts_the_steps_of_each_epoch_and_the_budget(tmp_path, one_thread):
    """On the CPU nothing synchronises (the sync debug mode is CUDA's): the steps, epochs and budget are counted
    through main.py's own training loop. FAKE: 1024 images, batch 64, 16 steps per epoch, a read every 5 steps."""
    argv = [*TINY, '--data-set', 'FAKE', '--batch-size', '64', '--epochs', '2', '--print-freq', '5']
    counts = host_syncs.count([*argv, '--save-freq', '0', '--output_dir', str(tmp_path / 'run')])
    assert counts['epochs'] == [{'steps': 16, 'syncs': 0}] * 2
    assert (counts['steps'], counts['syncs'], counts['print_freq']) == (32, 0, 5)
    assert counts['budget'] == 2 * (math.ceil(16 / 5) + 1) and counts['where'] == {}
    assert (tmp_path / 'run' / 'checkpoint.pth').is_file()
