"""The C allocator of the entry points' processes: on Linux with glibc, freed memory stays in the process.

By default glibc hands every freed block above its mmap threshold back to the kernel, so each step of an eager
model faults in and zeroes its large temporaries again (about 150,000 minor page faults per RAVLT-S eval step
at batch 16, 224²; docs/performance.md). With `MALLOC_MMAP_MAX_=0` (no block is mapped on its own) and a trim
threshold of 64 GiB (the top of the heap is not given back), freed memory is reused; the process keeps its peak.
glibc reads these variables when the process starts (calling mallopt() later does not help: see
docs/performance.md), so `main.py`, `main_det.py`, `main_seg.py` and the timing scripts call
`keep_freed_memory()` before anything else and the process executes itself again, once, with them set. It
stays the same process (os.execv keeps the PID), so torchrun's and a cluster's signals reach it; under torchrun
or srun every worker does this itself.

`RAVLT_KEEP_HEAP=0` keeps glibc's defaults. Allocator settings of your own (MALLOC_* variables,
GLIBC_TUNABLES for malloc, an LD_PRELOAD of jemalloc or tcmalloc) are used as they are. This module imports
nothing heavy: it runs before the libraries load.
"""

import os
import sys
from typing import Mapping, Optional

SWITCH = 'RAVLT_KEEP_HEAP'
KEEP_HEAP = {'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': str(64 << 30)}
EXIT_USAGE = 2  # errors.EXIT_USAGE; errors.py is not imported this early


def is_glibc() -> bool:
    try:
        return os.confstr('CS_GNU_LIBC_VERSION').startswith('glibc')
    except (AttributeError, ValueError, OSError):  # not a GNU system
        return False


def own_settings(env: Mapping[str, str]) -> dict:
    """The allocator settings in `env` that are not exactly ours: MALLOC_* variables, malloc tunables, a
    preloaded allocator."""
    mallocs = {k: v for k, v in env.items() if k.startswith('MALLOC_')}
    preloads = {k: env[k] for k in ('GLIBC_TUNABLES', 'LD_PRELOAD') if 'malloc' in env.get(k, '')}
    return {**({} if mallocs == KEEP_HEAP else mallocs), **preloads}


def kept(env: Mapping[str, str]) -> bool:
    """Whether `env` holds our settings and no other malloc variable."""
    return {k: v for k, v in env.items() if k.startswith('MALLOC_')} == KEEP_HEAP


def switched_on(env: Mapping[str, str]) -> bool:
    value = env.get(SWITCH, '1')
    if value not in ('0', '1'):
        raise ValueError(
            f"{SWITCH} must be 1 (keep freed memory in the process, the default) or 0 (glibc's defaults), got {value!r}"
        )
    return value == '1'


def environment_to_start_with(env: Mapping[str, str], glibc: bool) -> Optional[dict]:
    """The environment the process must be started again with, or None when it runs as it is: the switch off,
    not glibc, the settings already in place, or allocator settings of the user's own."""
    if not switched_on(env) or not glibc or own_settings(env) or kept(env):
        return None
    return {**env, **KEEP_HEAP}


def keep_freed_memory():
    """First thing in an entry point's `__main__`: execute this process again with freed memory kept (see the
    module docstring); returns when nothing is to be done. A bad RAVLT_KEEP_HEAP is one line and exit 2."""
    try:
        env = environment_to_start_with(os.environ, is_glibc())
    except ValueError as e:
        sys.stderr.write(f'error: {e}\n')
        sys.exit(EXIT_USAGE)
    if env is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv: the interpreter's own options and the script (or -m / -c) exactly as it was started.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def start_environment() -> Mapping[str, str]:
    """The environment this process started with (what glibc read), where Linux shows it."""
    try:
        with open('/proc/self/environ', 'rb') as f:
            pairs = [entry.split(b'=', 1) for entry in f.read().split(b'\0') if b'=' in entry]
        return {k.decode(errors='replace'): v.decode(errors='replace') for k, v in pairs}
    except OSError:
        return os.environ


def describe(env: Optional[Mapping[str, str]] = None, glibc: Optional[bool] = None) -> str:
    """How this process's C allocator runs, for the settings lines of the entry points and the benchmark."""
    env = start_environment() if env is None else env
    glibc = is_glibc() if glibc is None else glibc
    own = own_settings(env)
    thp = f', THP_MEM_ALLOC_ENABLE={env["THP_MEM_ALLOC_ENABLE"]}' if 'THP_MEM_ALLOC_ENABLE' in env else ''
    if own:
        return 'as set: ' + ' '.join(f'{k}={v}' for k, v in sorted(own.items())) + thp
    if not glibc:
        return "the C library's defaults (not glibc)" + thp
    if kept(env):
        return (
            f'glibc, freed memory kept in the process ({" ".join(f"{k}={v}" for k, v in KEEP_HEAP.items())}; '
            f'{SWITCH}=0 for the defaults){thp}'
        )
    if env.get(SWITCH) == '0':
        return f'glibc defaults ({SWITCH}=0){thp}'
    return 'glibc defaults (freed memory is kept when an entry point is run as a command)' + thp
