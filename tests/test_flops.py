"""scripts/flops.py reproduces the authors' fvcore params/FLOPs table."""

import json
import subprocess
import sys

import pytest

from cli import run_cli
from scripts import flops

pytestmark = pytest.mark.slow  # fvcore traces of full-size models

# Measured on the authors' code: fvcore at 1x3x224x224, default handles.
AUTHORS = {
    'RAVLT_T': (14.90, 2.626, 2.425),
    'RAVLT_S': (25.59, 4.899, 4.527),
    'RAVLT_B': (48.24, 10.616, 9.838),
    'RAVLT_L': (95.24, 17.256, 16.139),
}


@pytest.mark.parametrize('name', ['RAVLT_S', 'RAVLT_B', 'RAVLT_L'])
def test_params_and_flops_match_authors(name):
    row = flops.measure(name, (224, 224))
    params, gflops, gflops_no_attn = AUTHORS[name]
    assert round(row['params'] / 1e6, 2) == params
    assert round(row['flops'] / 1e9, 3) == gflops
    assert round(row['flops_no_attn'] / 1e9, 3) == gflops_no_attn


def test_cli_json_and_non_square_input():
    out = subprocess.run(
        [sys.executable, 'scripts/flops.py', '--model', 'RAVLT_T', '--json'], capture_output=True, text=True, check=True
    ).stdout
    (row,) = json.loads(out)
    assert set(row) == {'model', 'input_size', 'params', 'flops', 'flops_no_attn'}
    assert row['input_size'] == [224, 224]
    assert (
        round(row['params'] / 1e6, 2),
        round(row['flops'] / 1e9, 3),
        round(row['flops_no_attn'] / 1e9, 3),
    ) == AUTHORS['RAVLT_T']
    # Non-square: conv FLOPs scale with the token count, so 224x448 is about twice 224x224.
    wide = flops.measure('RAVLT_T', (224, 448))
    assert wide['input_size'] == [224, 448]
    assert 1.9 < wide['flops_no_attn'] / row['flops_no_attn'] < 2.05
    assert wide['flops'] - wide['flops_no_attn'] > 2 * (row['flops'] - row['flops_no_attn'])  # quadratic part


def test_model_kwargs_all_linear():
    """--model-kwargs reach the model: RAVLT-T with RALA in every stage has the same convolutions, other
    attention products (linear in the token count instead of quadratic), and no paper columns."""
    linear = {'attn_types': ['rala'] * 4}
    rows = flops.main(['--model', 'RAVLT_T', '--input-size', '448', '--model-kwargs', json.dumps(linear), '--json'])
    default = flops.measure('RAVLT_T', (448, 448))
    (row,) = rows
    assert row['flops_no_attn'] == default['flops_no_attn'] and row['params'] == default['params']
    assert row['flops'] < default['flops']
    assert flops.format_table(rows, modified=True).splitlines()[-1].endswith('| - | - |')


@pytest.mark.parametrize(
    'args, message',
    [
        (['--model', 'RAVLT_X'], 'unknown model(s) RAVLT_X'),
        (['--input-size', '0'], '--input-size takes one or two positive integers'),
        (['--model-kwargs', '{"depth": 1}'], 'cannot build ravlt_t with --model-kwargs'),
        (['--input-size', '224', '224', '224'], '--input-size takes one or two positive integers'),
    ],
)
def test_cli_rejects_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_cli(flops.main, args)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_the_script_exits_with_one_line():
    result = subprocess.run([sys.executable, 'scripts/flops.py', '--model', 'RAVLT_X'], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and 'unknown model(s) RAVLT_X' in lines[0], result.stderr


def test_ablation_kinds_share_one_flops_table():
    """RAVLT-T with each attention kind in stages 1-2: kinds with LePE and gate have RALA's convolutions, kinds
    without lack the o projection and LePE, N * C * (C + 25) multiply-adds per block (two blocks of 3136 tokens
    x 64 channels, two of 784 x 128); alpha changes only attention products (its scores)."""
    rows = {
        kind: flops.measure('RAVLT_T', (224, 224), model_kwargs={'attn_types': [kind, kind, 'softmax', 'softmax']})
        for kind in ('linear', 'rala_no_alpha', 'rala_no_gate_lepe', 'rala')
    }
    assert rows['rala']['flops'] == flops.measure('RAVLT_T', (224, 224))['flops']
    gate_and_lepe = 2 * 3136 * 64 * (64 + 25) + 2 * 784 * 128 * (128 + 25)
    for with_gate, without in (('rala', 'rala_no_gate_lepe'), ('rala_no_alpha', 'linear')):
        assert rows[with_gate]['flops_no_attn'] - rows[without]['flops_no_attn'] == gate_and_lepe
        assert (
            rows[with_gate]['flops'] - rows[with_gate]['flops_no_attn']
            == rows[without]['flops'] - rows[without]['flops_no_attn']
        )
    alpha = rows['rala']['flops'] - rows['rala_no_alpha']['flops']
    assert 0 < alpha == rows['rala_no_gate_lepe']['flops'] - rows['linear']['flops']
    assert rows['rala']['flops_no_attn'] == rows['rala_no_alpha']['flops_no_attn']
