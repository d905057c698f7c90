"""The run's output folder (--output_dir), held by rank 0: an exclusive lock for the run's lifetime (the kernel
drops it when the process dies), and its files: config.yaml, log.txt (one JSON line per epoch), TensorBoard events,
eval_results.json; checkpoints.py writes the checkpoints into it."""

import fcntl
import json
import os

from errors import UsageError
from utils import atomic_file, remove_stale_temporaries

LOG_FILE = 'log.txt'


class OutputFolder:
    """Checked (and locked, when it exists) on creation; made and locked by `create()`, which a run calls once its
    inputs are known good, before it writes anything: a refused run leaves nothing behind."""

    def __init__(self, path: str):
        self.path, self.writer, self._lock = path, None, None
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f'--output_dir {path} exists and is not a folder')
        if os.path.isdir(path):
            self._take_lock()

    def create(self):
        """Make the folder if it is new, lock it, and remove the temporary files of an interrupted save."""
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise UsageError(f'cannot make --output_dir {self.path} ({e.strerror.lower()})') from None
        if self._lock is None:
            self._take_lock()
        removed = remove_stale_temporaries(self.path)
        if removed:
            print(f'Removed {len(removed)} temporary file(s) left by an interrupted save: {", ".join(removed)}')

    def _take_lock(self):
        if not os.access(self.path, os.W_OK):
            raise UsageError(f'cannot write to --output_dir {self.path} (permission denied)')
        self._lock = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f'another run is using --output_dir {self.path} right now: wait for it or choose another'
            ) from None
        except OSError as e:  # a file system without locks (NFS without its lock service)
            print(f'warning: --output_dir {self.path} cannot be locked ({e.strerror}): make sure no other run uses it')

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_text(self, name: str, text: str):
        with atomic_file(self.file(name), 'w') as f:
            f.write(text)

    def read_log(self) -> list:
        """The whole JSON lines of log.txt (a line cut off by a kill is left out)."""
        entries = []
        if os.path.isfile(self.file(LOG_FILE)):
            with open(self.file(LOG_FILE)) as f:
                for line in f:
                    try:
                        entries.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get('epoch'), int)]

    def restore_log(self, last_epoch: int, last_entry):
        """At a (re)start: log.txt holds each epoch up to `last_epoch` (the resumed checkpoint's) exactly once, that
        epoch's line from the checkpoint (a kill may have come before it was written), and the TensorBoard events
        are rewritten from it."""
        entries = self.read_log()
        last = [last_entry] if last_entry is not None else [e for e in entries if e['epoch'] == last_epoch][-1:]
        entries = [e for e in entries if e['epoch'] < last_epoch] + last
        self.write_text(LOG_FILE, ''.join(json.dumps(e) + '\n' for e in entries))
        for name in os.listdir(self.path):
            if name.startswith('events.out.tfevents.'):
                os.remove(self.file(name))
        for entry in entries:
            self._add_scalars(entry)

    def append_log(self, entry: dict):
        with open(self.file(LOG_FILE), 'a') as f:
            f.write(json.dumps(entry) + '\n')
        self._add_scalars(entry)

    def _add_scalars(self, entry: dict):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.path)
        for key, value in entry.items():
            if key not in ('epoch', 'step', 'n_parameters') and isinstance(value, (int, float)):
                self.writer.add_scalar(key.replace('_', '/', 1), value, entry['epoch'])
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
