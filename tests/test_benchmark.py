"""scripts/benchmark.py: rows for every model and mode, JSON, the authors' file with our weights, peak
memory from a fresh process, and one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from scripts import benchmark

FAKE_AUTHORS = '''
import timm
import models  # registers ravlt_t
CALLS = []
def RAVLT_T(args=None):
    CALLS.append(1)
    return timm.create_model('ravlt_t')
'''


def run(argv):
    return benchmark.main(benchmark.get_args_parser().parse_args(argv), argv)


def test_rows_json_and_authors_models_get_our_weights(tmp_path):
    authors = tmp_path / 'RALA.py'
    authors.write_text(FAKE_AUTHORS)
    out = tmp_path / 'bench.json'
    argv = ['--model', 'RAVLT_T', 'authors:RAVLT_T', '--mode', 'eval', 'train', '--batch-size', '1',
            '--input-size', '32', '48', '--warmup', '1', '--iters', '2', '--authors-file', str(authors),
            '--json', str(out)]
    rows = run(argv)
    assert [(r['model'], r['mode']) for r in rows] == [('RAVLT_T', 'eval'), ('RAVLT_T', 'train'),
                                                      ('authors:RAVLT_T', 'eval'), ('authors:RAVLT_T', 'train')]
    assert all(r['img_per_s'] > 0 and r['img_per_s_p25'] <= r['img_per_s'] <= r['img_per_s_p75'] for r in rows)
    saved = json.loads(out.read_text())
    assert saved['results'] == rows and saved['settings']['input_size'] == [32, 48]

    module = benchmark.load_authors_module(str(authors), [])
    args = benchmark.get_args_parser().parse_args(['--seed', '3'])
    ours, theirs = benchmark.build_model('RAVLT_T', args), benchmark.build_model('authors:RAVLT_T', args, module)
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), k


def test_peak_memory_is_measured_in_a_fresh_process():
    row, = run(['--model', 'RAVLT_T', '--mode', 'eval', '--batch-size', '1', '--input-size', '64',
                '--iters', '0', '--memory'])
    assert 0 < row['peak_mib'] < 500 and 'img_per_s' not in row


@pytest.mark.parametrize('argv, message', [
    (['--model', 'authors:RAVLT_T'], 'needs --authors-file'),
    (['--model', 'no_such_model'], "unknown model 'no_such_model'"),
    (['--model', 'RAVLT_T', '--iters', '0'], 'measures nothing'),
    (['--model', 'RAVLT_T', '--batch-size', '0'], 'at least 1'),
    (['--model', 'swin_tiny_patch4_window7_224', '--input-size', '64'], 'failed with these settings'),
])
def test_bad_input_is_one_line(argv, message):
    with pytest.raises(benchmark.BenchmarkError, match=message):
        run(['--mode', 'eval', '--batch-size', '1', '--warmup', '1', '--iters', '1', *argv])


def test_missing_package_of_the_authors_file_is_one_line(tmp_path):
    authors = tmp_path / 'RALA.py'
    authors.write_text('import einops_is_not_installed_here\n')
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'benchmark.py'), '--authors-file',
                             str(authors), '--model', 'authors:RAVLT_T'], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: the authors' file needs the package 'einops_is_not_installed_here': pip install "
        "einops_is_not_installed_here (or give its folder with --authors-path-extra)"]
