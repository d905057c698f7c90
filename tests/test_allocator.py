"""The entry points keep freed memory in the process (allocator.py): they execute themselves again, once, with
glibc's variables set, in the same process (PID, interpreter options, arguments), so that an eager RAVLT-S
eval step through `main.py --eval` no longer faults in its temporaries; `RAVLT_KEEP_HEAP=0` turns it off, and
the user's own allocator settings are left alone. Under torchrun and srun: tests/test_train_distributed.py."""

import json
import subprocess
import sys

import pytest

import allocator
from train_helpers import ROOT, command_env

KEPT = 'glibc, freed memory kept in the process (MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736'
EVAL_RAVLT_S = [
    'main.py',
    '--eval',
    '--model',
    'RAVLT_S',
    '--data-set',
    'FAKE',
    '--input-size',
    '224',
    '--batch-size',
    '16',
    '--device',
    'cpu',
    '--num_workers',
    '0',
]


def clean_env(**extra) -> dict:
    """command_env without allocator settings of the test's own environment."""
    env = command_env(**extra)
    for name in [k for k in env if k.startswith('MALLOC_') or k in ('LD_PRELOAD', 'GLIBC_TUNABLES')]:
        env.pop(name)
    if allocator.SWITCH not in extra:
        env.pop(allocator.SWITCH, None)
    return env


@pytest.mark.slow
@pytest.mark.skipif(not allocator.is_glibc(), reason="the setting is glibc's")
def test_eval_steps_of_main_py_reuse_freed_memory_and_the_switch_turns_it_off(tmp_path):
    """Minor page faults of each forward pass of RAVLT-S (batch 16, 224²) in `main.py --eval`, counted inside
    the process; with glibc's defaults every step faults in its large temporaries again (about 140,000)."""
    steps = 4
    runs = {}
    for name, extra in (('kept', {}), ('defaults', {allocator.SWITCH: '0'})):
        faults_file = tmp_path / f'{name}.json'
        env = clean_env(FAULTS_AT=f'{faults_file}:{steps}', **extra)
        process = subprocess.Popen(
            [sys.executable, 'tests/fault_injection.py', *EVAL_RAVLT_S],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs[name] = process, faults_file
    results = {}
    for name, (process, faults_file) in runs.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
        results[name] = json.loads(faults_file.read_text())
        assert results[name]['pid'] == process.pid  # executed again in the same process
        results[name]['stdout'] = out
    kept, defaults = results['kept'], results['defaults']
    assert f'C allocator: {KEPT}' in kept['stdout'] and kept['allocator'].startswith(KEPT)
    assert 'C allocator: glibc defaults (RAVLT_KEEP_HEAP=0)' in defaults['stdout']
    # The first step allocates the heap; the next ones reuse it (a few thousand faults while it settles).
    assert max(kept['faults'][1:]) < 20_000, kept['faults']
    assert min(defaults['faults'][1:]) > 50_000, defaults['faults']


@pytest.mark.skipif(not allocator.is_glibc(), reason="the setting is glibc's")
def test_the_process_is_executed_again_with_its_options_arguments_and_pid():
    code = (
        'import os, sys; print(os.getpid(), os.environ.get("MALLOC_MMAP_MAX_"), flush=True); '
        'import allocator; allocator.keep_freed_memory(); '
        'print(os.getpid(), os.environ["MALLOC_MMAP_MAX_"], sys.flags.dev_mode, sys.argv[1:])'
    )
    result = subprocess.run(
        [sys.executable, '-X', 'dev', '-c', code, 'a b', '--c'],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    pid = result.stdout.split()[0]
    # Once with glibc's defaults, then again from the start with the variables: the same PID, -X dev, arguments.
    assert result.stdout.splitlines() == [f'{pid} None', f'{pid} 0', f"{pid} 0 True ['a b', '--c']"]


def test_a_bad_switch_is_one_line_before_anything_loads():
    result = subprocess.run(
        [sys.executable, 'main.py', '--help'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=clean_env(**{allocator.SWITCH: 'yes'}),
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr.splitlines() == [
        "error: RAVLT_KEEP_HEAP must be 1 (keep freed memory in the process, the default) or 0 (glibc's "
        "defaults), got 'yes'"
    ]


@pytest.mark.parametrize(
    'env, glibc, restart',
    [
        ({}, True, True),
        ({'RAVLT_KEEP_HEAP': '1'}, True, True),
        ({'RAVLT_KEEP_HEAP': '0'}, True, False),
        ({}, False, False),  # musl, macOS: the variables mean nothing
        ({'MALLOC_ARENA_MAX': '2'}, True, False),  # the user's own settings
        ({'MALLOC_MMAP_MAX_': '0'}, True, False),
        ({'LD_PRELOAD': '/usr/lib/libtcmalloc_minimal.so.4'}, True, False),
        ({'GLIBC_TUNABLES': 'glibc.malloc.trim_threshold=1'}, True, False),
        ({'LD_PRELOAD': '/usr/lib/libfoo.so'}, True, True),
        (dict(allocator.KEEP_HEAP), True, False),  # already started with them
    ],
)
def test_when_the_process_is_started_again(env, glibc, restart):
    new = allocator.environment_to_start_with(env, glibc)
    assert (new == {**env, **allocator.KEEP_HEAP}) if restart else new is None


def test_the_settings_line_says_what_the_allocator_does():
    assert allocator.describe(dict(allocator.KEEP_HEAP), glibc=True).startswith(KEPT)
    assert allocator.describe({'RAVLT_KEEP_HEAP': '0'}, glibc=True) == 'glibc defaults (RAVLT_KEEP_HEAP=0)'
    assert (
        allocator.describe({'MALLOC_ARENA_MAX': '2', 'THP_MEM_ALLOC_ENABLE': '1'}, glibc=True)
        == 'as set: MALLOC_ARENA_MAX=2, THP_MEM_ALLOC_ENABLE=1'
    )
    assert allocator.describe({}, glibc=False) == "the C library's defaults (not glibc)"
    assert allocator.describe({}, glibc=True).startswith('glibc defaults (freed memory is kept when')
