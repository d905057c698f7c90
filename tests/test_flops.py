"""scripts/flops.py reproduces the authors' fvcore params/FLOPs table, takes main.py's configs, and says what is
wrong in one line."""

import json
import subprocess
import sys

import pytest

import flops
from cli import one_line_errors
from errors import UsageError
from helpers import ROOT

pytestmark = pytest.mark.usefixtures('one_thread')
# Measured on the authors' code: fvcore at 1x3x224x224, default handles.
AUTHORS = {
    'RAVLT_T': (14.90, 2.626, 2.425),
    'RAVLT_S': (25.59, 4.899, 4.527),
    'RAVLT_B': (48.24, 10.616, 9.838),
    'RAVLT_L': (95.24, 17.256, 16.139),
}
TINY = {'embed_dims': [16, 32, 32, 32], 'depths': [1, 1, 1, 1], 'num_heads': [1, 1, 1, 1], 'projection_dim': 32}


def run(*argv):
    return flops.main(flops.get_args_parser().parse_args(argv))


def rounded(row) -> tuple:
    return round(row['params'] / 1e6, 2), round(row['flops'] / 1e9, 3), round(row['flops_no_attn'] / 1e9, 3)


@pytest.mark.slow  # fvcore traces of full-size models
@pytest.mark.parametrize('name', ['RAVLT_S', 'RAVLT_B', 'RAVLT_L'])
def test_params_and_flops_match_authors(name):
    assert rounded(flops.measure(name, (224, 224))) == AUTHORS[name]


@pytest.mark.slow
def test_cli_json_and_non_square_input():
    out = subprocess.run(
        [sys.executable, 'scripts/flops.py', '--model', 'RAVLT_T', '--json'],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    (row,) = json.loads(out)
    assert set(row) == {'model', 'input_size', 'params', 'flops', 'flops_no_attn'}
    assert row['input_size'] == [224, 224] and rounded(row) == AUTHORS['RAVLT_T']
    # Non-square: conv FLOPs scale with the token count, so 224x448 is about twice 224x224.
    wide = flops.measure('RAVLT_T', (224, 448))
    assert wide['input_size'] == [224, 448]
    assert 1.9 < wide['flops_no_attn'] / row['flops_no_attn'] < 2.05
    assert wide['flops'] - wide['flops_no_attn'] > 2 * (row['flops'] - row['flops_no_attn'])  # quadratic part


def test_model_kwargs_all_linear():
    """--model-kwargs reach the model: RALA in every stage has the same convolutions, other attention products
    (linear in the token count instead of quadratic), and no paper columns."""
    kwargs = dict(TINY, attn_types=['rala'] * 4)
    (row,) = run('--model', 'RAVLT_T', '--input-size', '128', '--model-kwargs', json.dumps(kwargs), '--json')
    default = flops.measure('RAVLT_T', (128, 128), model_kwargs=TINY)
    assert row['flops_no_attn'] == default['flops_no_attn'] and row['params'] == default['params']
    assert row['flops'] < default['flops']
    assert flops.format_table([row], modified=True).splitlines()[-1].endswith('| - | - |')


def test_main_py_configs_give_the_model_and_input_size(tmp_path, capsys):
    """`--config` takes main.py's own configs (issue 27: they were refused as "unknown key 'epochs'"): their
    model, model-kwargs and input-size, the training keys ignored; the command line still wins."""
    config = tmp_path / 'tiny.yaml'
    config.write_text(f'_base_: {ROOT}/configs/demo_digits.yaml\nmodel-kwargs: {json.dumps(TINY)}\n')
    (row,) = run('--config', str(config), '--json')
    assert (row['model'], row['input_size']) == ('RAVLT_T', [32, 32])
    assert row['params'] == sum(p.numel() for p in flops.create_model('RAVLT_T', TINY).parameters())
    (row,) = run('--config', str(config), '--input-size', '64', '48', '--json')
    assert row['input_size'] == [64, 48]
    assert 'RAVLT_T' in capsys.readouterr().out
    config.write_text('model: RAVLT_T\ninput-size: -3\nepochs: 8\n')
    with pytest.raises(UsageError, match=r'argument --input-size: must be in \[1, inf\), got -3 \(in config'):
        run('--config', str(config))


@pytest.mark.parametrize(
    'args, message',
    [
        (['--model', 'RAVLT_X'], "unknown model 'RAVLT_X'"),
        (['--input-size', '0'], 'argument --input-size: must be in [1, inf), got 0'),
        (['--model-kwargs', '{"depth": 1}'], 'cannot build ravlt_t with --model-kwargs'),
        (['--input-size', '224', '224', '224'], '--input-size takes H or H W'),
        (['--config', 'configs/none.yaml'], 'config file configs/none.yaml does not exist'),
    ],
)
def test_cli_rejects_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as stopped, one_line_errors():
        run('--model', 'RAVLT_T', *args)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


@pytest.mark.slow
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
