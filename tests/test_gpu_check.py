"""scripts/gpu_check.sh cannot run its GPU steps here; its logic can. A dry run prints commands the entry points'
own parsers take, all writing under the one results folder, the stopped run resumed with exactly the reference's
flags. A rehearsal on the CPU (DEVICE=cpu) runs the steps that need no GPU with the interpreter it is given, as on a
GPU node: the stop by SIGTERM to every process (loader workers included), the resume, and the bit-for-bit
comparison. Without the packages it needs and without carried wheels it says so in one line."""

import os
import shlex
import subprocess
import sys

import pytest

import main
from train_helpers import ROOT, command_env

ENTRY_POINTS = {'main.py': main}


def gpu_check(tmp_path, **env):
    return subprocess.run(
        ['bash', 'scripts/gpu_check.sh'],
        cwd=ROOT,
        env=command_env(**{'PYTHON': sys.executable, 'OUT': str(tmp_path / 'check'), **env}),
        capture_output=True,
        text=True,
        timeout=1200,
    )


def test_the_dry_run_prints_commands_the_parsers_take_into_its_results_folder(tmp_path):
    result = gpu_check(tmp_path, DRY_RUN='1')
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / 'check').exists()  # a dry run writes nothing
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith('+ ')]
    runs = {}
    for command in commands:
        script = next((token for token in command if token in ENTRY_POINTS), None)
        if script is None:
            continue
        args = ENTRY_POINTS[script].get_args_parser().parse_args(command[command.index(script) + 1 :])
        assert args.output_dir.startswith(str(tmp_path / 'check'))
        runs.setdefault(args.output_dir, []).append(command)
    reference, resumed = runs[str(tmp_path / 'check/stop/reference')], runs[str(tmp_path / 'check/stop/resumed')]
    assert reference[0][reference[0].index('main.py') :] == [
        t.replace('resumed', 'reference') for t in resumed[0][resumed[0].index('main.py') :]
    ]
    assert {'--deterministic', '--num_workers'} <= set(reference[0])
    assert any('compare_checkpoints.py' in ' '.join(c) for c in commands)


def test_without_the_packages_and_wheels_it_needs_it_says_so_in_one_line(tmp_path):
    """A GPU node's python3 without fvcore, and no .gpu_wheels/ carried."""
    fake = tmp_path / 'python3'
    fake.write_text('#!/bin/sh\nexit 1\n')  # every `import X` fails
    fake.chmod(0o755)
    result = gpu_check(tmp_path, PYTHON=str(fake), WHEELS=str(tmp_path / 'none'))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f'error: {fake} lacks fvcore iopath yacs termcolor and {tmp_path}/none/ holds no wheels: run '
        f"'bash scripts/gpu_check.sh --prepare' where pip can download, and carry {tmp_path}/none/ here"
    ]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(1200)
def test_the_cpu_rehearsal_stops_every_process_resumes_and_compares_bit_for_bit(tmp_path):
    result = gpu_check(tmp_path, DEVICE='cpu')
    out = tmp_path / 'check'
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / 'steps.txt').read_text().splitlines() == [
        'stop_reference: exit 0 (expected 0)',
        'stop_stopped: stopped and saved',
        'stop_resumed: exit 0 (expected 0)',
        'resume_exact: exit 0 (expected 0)',
    ]
    assert (out / 'resume_exact.log').read_text() == 'bit-identical\n'
    assert 'two processes on one GPU: gloo' in (out / 'env.txt').read_text()
    assert os.path.isfile(out / 'stop' / 'resumed' / 'checkpoint.pth')
