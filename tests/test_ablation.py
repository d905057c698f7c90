"""scripts/ablation.py: one command trains, analyses and measures every attention kind; its tables hold what the
trainings logged and the rank analysis found; trainings are reused only for the settings they were made with;
--quick; bad input, a missing matplotlib and a failed training end in one line."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

import ablation
from cli import one_line_errors
from errors import UsageError

pytestmark = pytest.mark.usefixtures('one_thread')
ROOT = Path(__file__).resolve().parents[1]
TINY = {'embed_dims': [16, 32, 32, 32], 'depths': [1, 1, 1, 1], 'num_heads': [1, 1, 1, 1], 'projection_dim': 32}
COST = ['--model-kwargs', json.dumps(TINY), *'--input-size 32 --batch-size 2 --warmup 1 --iters 1 --threads 1'.split()]


def tiny_config(tmp_path, name: str = 'tiny', **values):
    """The demo recipe with a tiny model for one epoch."""
    config = tmp_path / f'{name}.yaml'
    lines = [f'_base_: {ROOT / "configs" / "demo_digits.yaml"}', f'model-kwargs: {json.dumps(TINY)}', 'epochs: 1']
    config.write_text('\n'.join(lines + ['warmup-epochs: 0'] + [f'{k}: {v}' for k, v in values.items()]) + '\n')
    return str(config)


def parse(*argv):
    return ablation.get_args_parser().parse_args(argv)


@pytest.mark.slow
def test_ablation_tables_hold_the_trainings_and_rank_analyses(tmp_path, capsys):
    out = tmp_path / 'ablation'
    args = parse(
        *'--kinds linear rala --seeds 0 --jobs 2 --num-images 2'.split(),
        *['--train-config', tiny_config(tmp_path), '--output_dir', out, *COST],
    )
    result = ablation.main(args)
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
        assert folder.parent.parent == out.resolve() and folder.parent.name.startswith('tiny-')
        assert folder.name == f'{kind}-seed0'
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


def jobs_of(args, monkeypatch) -> list:
    """The trainings measure_learning would run (none is run): [(folder, seed, epochs)]."""
    jobs = []
    monkeypatch.setattr(ablation, 'train_and_analyse', lambda job, args: jobs.append(job) or {'folder': job['folder']})
    ablation.measure_learning(args)
    return [(job['folder'], job['seed'], job['epochs']) for job in jobs]


def test_trainings_are_reused_only_for_the_settings_they_were_made_with(tmp_path, monkeypatch):
    """issue 27: a rerun into the same --output_dir with another --train-config reused the first config's trainings
    and labelled them with the second's name. The trainings' folder is keyed by the training settings."""
    first, out = tiny_config(tmp_path), ['--output_dir', tmp_path / 'out', '--kinds', 'rala', '--seeds', '0']
    jobs = jobs_of(parse('--train-config', first, *out), monkeypatch)
    assert jobs == jobs_of(parse('--train-config', first, *out), monkeypatch)  # a rerun resumes the same folders
    ((folder, seed, epochs),) = jobs
    assert Path(folder).parent.name.startswith('tiny-') and (seed, epochs) == (0, 1)
    tiny_config(tmp_path, lr=0.004)  # the same file name, another learning rate
    ((other, _, _),) = jobs_of(parse('--train-config', first, *out), monkeypatch)
    shutil.copy(first, tmp_path / 'other_name.yaml')
    ((renamed, _, _),) = jobs_of(parse('--train-config', tmp_path / 'other_name.yaml', *out), monkeypatch)
    assert len({folder, other, renamed}) == 3 and Path(renamed).name == Path(folder).name == 'rala-seed0'


def test_quick_trains_one_seed_for_two_epochs_and_times_fewer_steps(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, epochs=8)
    args = parse('--quick', '--train-config', config, '--output_dir', tmp_path, '--kinds', 'rala', 'linear', *COST[:4])

    def learning(args):
        raise KeyboardInterrupt  # stops main() here, with args as the trainings would get them

    monkeypatch.setattr(ablation, 'measure_learning', learning)
    with pytest.raises(KeyboardInterrupt):
        ablation.main(args)
    assert (args.seeds, args.batch_size, args.warmup, args.iters) == ([0], 4, 1, 3)
    monkeypatch.undo()
    quick = jobs_of(args, monkeypatch)
    assert [(Path(f).name, s, e) for f, s, e in quick] == [('rala-seed0', 0, 2), ('linear-seed0', 0, 2)]
    full = jobs_of(parse('--train-config', config, '--output_dir', tmp_path, '--kinds', 'rala'), monkeypatch)
    assert [(s, e) for _, s, e in full] == [(0, 8), (1, 8), (2, 8)] and Path(full[0][0]).parent != Path(
        quick[0][0]
    ).parent
    # A flag given says otherwise: it stays.
    args = parse('--quick', '--seeds', '4', '5', '--iters', '7', '--train-config', config, '--output_dir', tmp_path)
    monkeypatch.setattr(ablation, 'measure_learning', learning)
    with pytest.raises(KeyboardInterrupt):
        ablation.main(args)
    assert (args.seeds, args.batch_size, args.warmup, args.iters) == ([4, 5], 4, 1, 7)


def test_help_states_the_run_time(capsys):
    with pytest.raises(SystemExit):
        parse('--help')
    text = ' '.join(capsys.readouterr().out.split())
    assert 'The default run takes about' in text and '--quick about' in text


def test_bad_input_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
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
    monkeypatch.setattr(ablation, 'train_and_analyse', lambda *a: pytest.fail('trained before the checks'))
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info, one_line_errors():
            ablation.main(parse('--train-config', config, '--output_dir', out, *extra))
        assert exit_info.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert message in line
    assert not out.exists()
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # `import matplotlib` raises ImportError
    with pytest.raises(UsageError, match=r'figures need matplotlib: pip install "matplotlib>=3.7"'):
        ablation.main(parse('--train-config', config, '--output_dir', out))
    assert not out.exists()


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
            parse(
                '--kinds', 'linear', '--seeds', '0', '--train-config', config, '--output_dir', tmp_path / 'out', *COST
            )
        )
