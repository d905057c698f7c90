"""scripts/resolution.py: every model at every size (swin rebuilt for each), the tables, JSON and figure, and
one-line errors."""

import json

import pytest

import resolution
from errors import UsageError

pytestmark = pytest.mark.usefixtures('one_thread')


def run(*argv):
    return resolution.main(resolution.get_args_parser().parse_args(argv))


@pytest.mark.slow
def test_sweep_writes_tables_json_and_figure(tmp_path, capsys):
    out, figure = tmp_path / 'res.json', tmp_path / 'res.png'
    rows = run(
        *'--models RAVLT_T RAVLT_S-linear swin_tiny --sizes 64 64x96 --warmup 1 --iters 1'.split(),
        *['--json', out, '--figure', figure],
    )
    assert [(r['model'], r['input_size']) for r in rows] == [
        ('RAVLT_T', [64, 64]),
        ('RAVLT_S-linear', [64, 64]),
        ('swin_tiny', [64, 64]),
        ('RAVLT_T', [64, 96]),
        ('RAVLT_S-linear', [64, 96]),
        ('swin_tiny', [64, 96]),
    ]
    assert all(r['img_per_s'] > 0 and r['gmacs'] > 0 and r['mode'] == 'eval' for r in rows)
    by = {(r['model'], tuple(r['input_size'])): r['gmacs'] for r in rows}
    # Convolutions dominate at these sizes: the count grows with the pixels (1.5x here).
    assert 1.3 < by['RAVLT_T', (64, 96)] / by['RAVLT_T', (64, 64)] < 1.7
    assert json.loads(out.read_text())['results'] == rows
    assert figure.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    stdout = capsys.readouterr().out
    assert '| model | 64x64 | 64x96 |' in stdout and '| swin_tiny |' in stdout and 'GFLOPs:' in stdout


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--sizes', '224x'], 'give H or HxW'),
        (['--sizes', '0x224'], 'give H or HxW'),
        (['--models', 'RAVLT_XL'], "argument --models: invalid choice: 'RAVLT_XL'"),
        (['--models', 'authors:RAVLT_S', '--sizes', '32'], 'authors:RAVLT_S needs --authors-file'),
        (['--json', 'no/such/folder/x.json'], 'its folder does not exist'),
    ],
)
def test_bad_input_is_a_usage_error(argv, message):
    with pytest.raises(UsageError, match=message):
        run(*argv)


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--figure', 'scaling.jpeg2000'], 'expected a file name ending in .png or .svg or .pdf'),
        (['--json', '.'], 'exists and is not a regular file'),
        (['--json', 'log.txt'], 'expected a file name ending in .json'),
    ],
)
def test_outputs_are_checked_before_the_sweep(argv, message, tmp_path, monkeypatch):
    def swept(*args, **kwargs):
        raise AssertionError('measured before the outputs were checked')

    monkeypatch.setattr(resolution, 'sweep', swept)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=message):
        run('--models', 'RAVLT_T', '--sizes', '64', *argv)
