"""scripts/ablation.py: one command trains, analyses and measures every attention kind; its tables hold what the
trainings logged and the rank analysis found; bad input and a failed training end in one line."""

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from cli import UsageError, run_cli
from scripts import ablation

pytestmark = pytest.mark.usefixtures('one_thread')
ROOT = Path(__file__).resolve().parents[1]
TINY = {'embed_dims': [16, 32, 32, 32], 'depths': [1, 1, 1, 1], 'num_heads': [1, 1, 1, 1], 'projection_dim': 32}


def tiny_config(tmp_path, **values):
    """The demo recipe with a tiny model for one epoch."""
    config = tmp_path / 'tiny.yaml'
    lines = [
        f'_base_: {ROOT / "configs" / "demo_digits.yaml"}',
        f'model-kwargs: {json.dumps(TINY)}',
        'epochs: 1',
        'warmup-epochs: 0',
    ] + [f'{k}: {v}' for k, v in values.items()]
    config.write_text('\n'.join(lines) + '\n')
    return str(config)


def cost_args(*extra):
    return [
        '--model-kwargs',
        json.dumps(TINY),
        '--input-size',
        '32',
        '--batch-size',
        '2',
        '--warmup',
        '1',
        '--iters',
        '1',
        '--threads',
        '1',
        '--num-images',
        '2',
        *extra,
    ]


@pytest.mark.slow
def test_ablation_tables_hold_the_trainings_and_rank_analyses(tmp_path, capsys):
    out = tmp_path / 'ablation'
    result = ablation.main(
        [
            '--kinds',
            'linear',
            'rala',
            '--seeds',
            '0',
            '--jobs',
            '2',
            '--train-config',
            tiny_config(tmp_path),
            '--output_dir',
            str(out),
            *cost_args(),
        ]
    )
    assert list(result['cost']) == list(result['learning']) == ['linear', 'rala']
    linear, rala = result['cost']['linear'], result['cost']['rala']
    assert linear['attn_types'] == ['linear', 'linear', 'softmax', 'softmax']
    # Stages 1-2 without the o projection (C * C + C) and LePE (25 * C + C): one block each of 16 and 32 channels.
    assert rala['params'] - linear['params'] == 16 * (16 + 27) + 32 * (32 + 27)
    assert linear['flops_no_attn'] < rala['flops_no_attn'] < rala['flops']
    for mode in ('eval', 'train'):
        assert linear[mode]['img_per_s'] > 0 and linear[mode]['peak_mib'] >= 0

    for kind in ('linear', 'rala'):
        entry = result['learning'][kind]
        (run,) = entry['runs']
        folder = Path(run['folder'])
        assert folder == out.resolve() / 'digits' / f'{kind}-seed0'
        logged = json.loads((folder / 'log.txt').read_text().splitlines()[-1])
        assert logged['epoch'] == 0
        assert (run['acc1'], run['ema_acc1'], run['loss']) == (
            logged['test_acc1'],
            logged['test_ema_acc1'],
            logged['test_loss'],
        )
        trained = yaml.safe_load((folder / 'config.yaml').read_text())
        assert trained['model-kwargs'] == dict(TINY, attn_types=[kind, kind, 'softmax', 'softmax'])
        assert (trained['seed'], trained['epochs']) == (0, 1)
        ranks = json.loads((folder / 'rank' / 'rank.json').read_text())
        first = ranks['blocks'][0]
        assert first['attention'] == kind and ranks['images'] == '2 DIGITS val images'
        stage = entry['stages'][0]
        assert (stage['attention'], stage['matrix'], stage['tokens'], stage['head_dim']) == (kind, 'kv_buffer', 64, 16)
        assert stage['matrix_rank'] == first['computed_as'][kind]['kv_buffer']['mean_rank']
        assert stage['output_rank'] == first['computed_as'][kind]['output']['mean_rank']
        assert [s['attention'] for s in entry['stages']] == [kind, kind, 'softmax', 'softmax']

    tables = (out / 'ablation.md').read_text()
    assert json.loads((out / 'ablation.json').read_text())['cost'] == result['cost']
    rows = [line for line in tables.splitlines() if line.startswith('| linear') or line.startswith('| rala')]
    assert [r.split(' | ')[0] for r in rows] == [
        '| linear, linear, softmax, softmax',
        '| rala, rala, softmax, softmax',
    ] * 2
    assert rows[1].split(' | ')[4].endswith('x1.00')  # eval img/s relative to rala
    # The learning table leaves out the stages that are softmax in every row: stages 1 and 2 only.
    assert 'stage 2 output rank (of 16)' in tables and 'stage 3' not in tables
    assert f'{result["learning"]["rala"]["stages"][0]["output_rank"]:.1f}' == rows[3].split(' | ')[5]
    assert f'{result["learning"]["rala"]["loss"][0]:.4f}' == rows[3].split(' | ')[3]
    with Image.open(out / 'ablation.png') as image:
        image.verify()
    assert tables in capsys.readouterr().out


def test_bad_input_is_one_line_before_anything_runs(tmp_path, capsys):
    out = tmp_path / 'out'
    config = tiny_config(tmp_path)
    cases = [
        (['--kinds', 'rala', 'rala'], '--kinds names a kind twice'),
        (['--kinds', 'window'], "argument --kinds: invalid choice: 'window'"),
        (['--model-kwargs', json.dumps(dict(TINY, attn_types=['softmax'] * 4))], 'has no RALA stage to ablate'),
        (['--train-config', str(tmp_path / 'none.yaml')], 'does not exist'),
        (['--input-size', '32', '32', '32'], '--input-size takes H or H W'),
        (['--seeds', '-1'], 'argument --seeds'),
    ]
    for extra, message in cases:
        argv = ['--train-config', config, '--output_dir', str(out), *extra]
        with pytest.raises(UsageError, match=message):
            ablation.main(argv)
        with pytest.raises(SystemExit) as exit_info:
            run_cli(ablation.main, argv)
        assert exit_info.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (out / 'digits').exists()


@pytest.mark.slow
def test_failed_training_ends_the_ablation_in_one_line(tmp_path):
    """main.py rejects the data (no ImageNet folder): its one line, with where the whole output is."""
    config = tiny_config(tmp_path, **{'data-set': 'IMNET', 'data-path': str(tmp_path / 'no_imagenet')})
    with pytest.raises(
        UsageError,
        match=r'training linear seed 0 failed \(exit 2\): error: .*no_imagenet.* '
        r'\(output in .*linear-seed0\.train\.log\)',
    ):
        ablation.main(
            [
                '--kinds',
                'linear',
                '--seeds',
                '0',
                '--train-config',
                config,
                '--output_dir',
                str(tmp_path / 'out'),
                *cost_args(),
            ]
        )
