"""Every run keeps freed memory in its process (utils.keep_freed_memory: glibc's mallopt, called when the run starts),
so that an eager RAVLT-S eval step through `main.py --eval` no longer faults in its temporaries again;
`RAVLT_KEEP_HEAP=0` turns it off, and the user's own allocator settings are left alone."""

import ctypes
import json
import os
import platform
import subprocess
import sys

import pytest

import utils
from train_helpers import ROOT, command_env

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
GLIBC = platform.libc_ver()[0] == 'glibc'


def clean_env(**extra) -> dict:
    """command_env without allocator settings of the test's own environment."""
    env = command_env(**extra)
    for name in [k for k in env if k.startswith('MALLOC_') or k in ('LD_PRELOAD', 'GLIBC_TUNABLES')]:
        env.pop(name)
    if 'RAVLT_KEEP_HEAP' not in extra:
        env.pop('RAVLT_KEEP_HEAP', None)
    return env


@pytest.mark.slow
@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's")
def test_eval_steps_of_main_py_reuse_freed_memory_and_the_switch_turns_it_off(tmp_path):
    """Minor page faults of each forward pass of RAVLT-S (batch 16, 224²) in `main.py --eval`, counted inside
    the process; with glibc's defaults every step faults in its large temporaries again."""
    steps, runs, faults = 6, {}, {}
    for name, extra in (('kept', {}), ('defaults', {'RAVLT_KEEP_HEAP': '0'})):
        env = clean_env(FAULTS_AT=f'{tmp_path / name}.json:{steps}', **extra)
        runs[name] = subprocess.Popen(
            [sys.executable, 'tests/fault_injection.py', *EVAL_RAVLT_S],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    for name, process in runs.items():
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
        faults[name] = json.loads((tmp_path / f'{name}.json').read_text())['faults']
        assert len(faults[name]) == steps
    # The first step grows the heap (some 60,000 faults); later steps reuse it: most fault almost nothing, now and
    # then one some thousands (6,273 seen on a loaded machine), where glibc's defaults fault 50,000 to 300,000
    # every step.
    assert sorted(faults['kept'][1:])[2] < 1_000 and max(faults['kept'][3:]) < 20_000, faults
    assert min(faults['defaults'][3:]) > 30_000, faults


@pytest.mark.parametrize(
    'env, kept',
    [
        ({}, True),
        ({'RAVLT_KEEP_HEAP': '1'}, True),
        ({'RAVLT_KEEP_HEAP': '0'}, False),
        ({'MALLOC_ARENA_MAX': '2'}, False),  # the user's own settings
        ({'MALLOC_MMAP_MAX_': '65536'}, False),
        ({'LD_PRELOAD': '/usr/lib/libtcmalloc_minimal.so.4'}, False),
        ({'LD_PRELOAD': '/usr/lib/libjemalloc.so.2'}, False),
        ({'LD_PRELOAD': '/usr/lib/libfoo.so'}, True),
    ],
)
def test_when_freed_memory_is_kept(monkeypatch, env, kept):
    """glibc's M_MMAP_MAX (-4) 0 and M_TRIM_THRESHOLD (-1) at the largest int, unless turned off or the user set
    the allocator up themselves; not glibc (no libc.so.6): nothing, and no error."""
    calls = []

    class Libc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

    for name in [k for k in os.environ if k.startswith('MALLOC_')]:
        monkeypatch.delenv(name)
    for name in ('LD_PRELOAD', 'RAVLT_KEEP_HEAP'):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(ctypes, 'CDLL', lambda name: Libc() if name == 'libc.so.6' else None)
    utils.keep_freed_memory()
    assert calls == ([(-4, 0), (-1, 2**31 - 1)] if kept else [])

    def no_glibc(name):
        raise OSError(f'{name}: cannot open shared object file')

    monkeypatch.setattr(ctypes, 'CDLL', no_glibc)
    utils.keep_freed_memory()  # musl, macOS
