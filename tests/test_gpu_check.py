"""scripts/gpu_check.sh cannot run here (no GPU); its logic can: with DRY_RUN it prints its commands, which parse
with the entry points' own parsers, write only under a fresh folder of the one given, and compare a stopped and
resumed run with one never stopped that has the same flags. scripts/compare_checkpoints.py, which makes that
comparison, is tested on the CPU."""

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

import checkpoints
import main
import main_det
import main_seg
from train_helpers import ROOT, command_env

ENTRY_POINTS = {'main.py': main, 'main_det.py': main_det, 'main_seg.py': main_seg}


def dry_run(root, **env) -> tuple:
    """(the fresh folder, [commands as argument lists]) that gpu_check.sh would run into `root`."""
    result = subprocess.run(
        ['bash', 'scripts/gpu_check.sh', str(root)],
        cwd=ROOT,
        env=command_env(DRY_RUN='1', **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    fresh = re.search(r'^Results: (.+)$', result.stdout, re.MULTILINE).group(1)
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith('+ ')]
    return fresh, commands


def entry_point_flags(command) -> tuple:
    """(script, its flags) of a command that runs an entry point: directly, under torchrun or fault injection, or
    counted by scripts/host_syncs.py (main.py's flags after `--`); (None, None) for any other command."""
    if command[:2] == ['python', 'scripts/host_syncs.py']:
        return 'main.py', command[command.index('--') + 1 :]
    found = [i for i, token in enumerate(command) if token in ENTRY_POINTS]
    if not found:
        return None, None
    return command[found[0]], command[found[0] + 1 :]


def test_the_dry_run_prints_commands_the_parsers_take_into_a_fresh_folder(tmp_path):
    fresh, commands = dry_run(tmp_path)
    again, _ = dry_run(tmp_path)
    assert fresh != again and os.path.dirname(fresh) == str(tmp_path)
    assert not os.listdir(tmp_path)  # a dry run writes nothing
    runs = {}
    for command in commands:
        for token in command:
            if token.startswith('/') and str(tmp_path) in token:
                assert fresh in token, f'{token} is not under the fresh folder'
        script, flags = entry_point_flags(command)
        if script is None:
            continue
        args = ENTRY_POINTS[script].get_args_parser().parse(flags)  # a bad flag raises a one-line UsageError
        assert args.output_dir.startswith(fresh)
        assert args.device == 'cuda'
        runs.setdefault(os.path.basename(args.output_dir), []).append((command, flags))
    assert set(runs) == {'host_syncs', 'cls_reference', 'cls_resumed', 'cls_bf16', 'cls_bf16_compile', 'det', 'seg'}
    ((_, compiled),) = runs['cls_bf16_compile']
    assert '--compile' in compiled and '--compile' not in runs['cls_bf16'][0][1]
    # The stopped run: SIGTERM from fault injection, then the same command again; the same flags as the reference.
    (stopped, stopped_flags), (resumed, resumed_flags) = runs['cls_resumed']
    ((_, reference_flags),) = runs['cls_reference']
    assert 'SIGNAL_AT=0:20:SIGTERM' in stopped and 'tests/fault_injection.py' in stopped
    assert stopped_flags == resumed_flags == reference_flags[:-1] + [fresh + '/cls_resumed']
    assert {'--deterministic', '--model-ema-force-cpu', '--clip-grad'} <= set(reference_flags)
    assert ['--nproc_per_node=2'] == [t for t in resumed if t.startswith('--nproc_per_node')]
    compare = [c for c in commands if 'scripts/compare_checkpoints.py' in ' '.join(c)]
    assert len(compare) == 1 and 'cls_reference/checkpoint.pth' in compare[0][-1]


def test_compare_checkpoints_says_bit_identical_or_what_differs(tmp_path, capsys):
    from scripts import compare_checkpoints

    state = {
        'model': {'w': torch.arange(4.0)},
        'optimizer': {'state': {0: {'exp_avg': torch.ones(4)}}},
        'epoch': 1,
        'step': 8,
    }
    checkpoints.save_checkpoint(state, tmp_path / 'a.pth')
    checkpoints.save_checkpoint(state, tmp_path / 'b.pth')
    compare_checkpoints.command([str(tmp_path / 'a.pth'), str(tmp_path / 'b.pth')])
    assert capsys.readouterr().out == 'bit-identical\n'
    state['optimizer']['state'][0]['exp_avg'][2] += 1e-7
    checkpoints.save_checkpoint(state, tmp_path / 'b.pth')
    with pytest.raises(SystemExit) as stopped:
        compare_checkpoints.command([str(tmp_path / 'a.pth'), str(tmp_path / 'b.pth')])
    assert stopped.value.code == 1
    assert capsys.readouterr().out.startswith('1 differences; first: optimizer.0.exp_avg: differs')


def test_with_benchmark_the_benchmark_steps_take_the_benchmarks_flags(tmp_path):
    """BENCHMARK=1 adds scripts/benchmark.py in each precision (the authors' models beside ours with AUTHORS_FILE),
    then eager against torch.compile in bf16."""
    from scripts import benchmark

    fresh, commands = dry_run(tmp_path, BENCHMARK='1', AUTHORS_FILE='RALA.py', AUTHORS_PATH_EXTRA='deps')
    _, without = dry_run(tmp_path)
    benchmarks = [c for c in commands if c[:2] == ['python', 'scripts/benchmark.py']]
    assert (
        commands[: len(without)] == [c for c in commands if c not in benchmarks] and len(commands) == len(without) + 4
    )
    parsed = [benchmark.get_args_parser().parse(c[2:]) for c in benchmarks]
    assert [(a.amp, a.backend, os.path.basename(a.json)) for a in parsed] == [
        ('none', ['eager'], 'benchmark_none.json'),
        ('fp16', ['eager'], 'benchmark_fp16.json'),
        ('bf16', ['eager'], 'benchmark_bf16.json'),
        ('bf16', ['eager', 'compile'], 'benchmark_compile_bf16.json'),
    ]
    assert all(a.device == 'cuda' and a.mode == ['eval', 'train'] and a.json.startswith(fresh) for a in parsed)
    for a in parsed[:3]:
        assert a.model == ['RAVLT_T', 'authors:RAVLT_T', 'RAVLT_S', 'authors:RAVLT_S', 'convnext_tiny']
        assert (a.authors_file, a.authors_path_extra, a.memory, a.matmul_rate) == ('RALA.py', ['deps'], True, True)


@pytest.mark.slow  # collects the whole suite
def test_the_pytest_step_selects_the_tests_that_need_a_gpu(tmp_path):
    """The first step, run with --collect-only: the tests named for CUDA, the ones skipped without a GPU among them."""
    _, commands = dry_run(tmp_path)
    inner = shlex.split(commands[0][-1].split('2>&1')[0])
    assert inner[:3] == ['python', '-m', 'pytest']
    result = subprocess.run(
        [sys.executable, *inner[1:], '--collect-only', '-p', 'no:cacheprovider'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=command_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    collected = [line for line in result.stdout.splitlines() if '::' in line]
    assert all('cuda' in line.lower() for line in collected)
    assert {
        f'tests/test_benchmark.py::test_cuda_timing_memory_and_amp[{amp}]' for amp in ('none', 'fp16', 'bf16')
    } <= set(collected)
