"""The run's output folder (--output_dir), held by rank 0: an exclusive lock for the run's lifetime (the kernel
drops it when the process dies, killed or not; where the file system has no locks, a warning), and its files:
config.yaml, log.txt (one JSON line per epoch), TensorBoard events, eval_results.json; checkpoints.py writes the
checkpoints into it."""

import errno
import fcntl
import json
import os
import tempfile
from typing import Optional

from errors import UsageError
from utils import atomic_file, remove_stale_temporaries

LOG_FILE = 'log.txt'
# flock's errors where the file system has no locks (some network file systems: NFS without its lock service).
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


class OutputFolder:
    """Checked on creation (an existing folder is also locked then); made and locked by `create()`, which a run
    calls once its inputs are known good and before it writes anything: a refused run leaves nothing behind."""

    def __init__(self, path: str):
        self.path, self.writer, self._lock, self.created = path, None, None, False
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise UsageError(f'--output_dir {path} exists and is not a folder')
            self._check_writable()
            self._take_lock()
            return
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise UsageError(f'--output_dir {path} lies under a file, not a folder')
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(
                f'cannot write to --output_dir {path} (permission denied in {parent}): choose a writable folder'
            )

    def create(self):
        """Make the folder if it is new, hold its lock, and remove the temporary files of an interrupted save."""
        if self.created:
            return
        try:
            os.makedirs(self.path, exist_ok=True)
        except FileExistsError:
            raise UsageError(f'--output_dir {self.path} exists and is not a folder') from None
        except NotADirectoryError:
            raise UsageError(f'--output_dir {self.path} lies under a file, not a folder') from None
        except OSError as e:
            raise UsageError(
                f'cannot write to --output_dir {self.path} ({e.strerror.lower()}): choose a writable folder'
            ) from None
        self._check_writable()
        if self._lock is None:
            self._take_lock()
        self.created = True
        removed = remove_stale_temporaries(self.path)
        if removed:
            print(f'Removed {len(removed)} temporary file(s) left by an interrupted save: {", ".join(removed)}')

    def _check_writable(self):
        try:
            tempfile.TemporaryFile(dir=self.path).close()
        except OSError as e:
            raise UsageError(
                f'cannot write to --output_dir {self.path} ({e.strerror.lower()}): choose a writable folder'
            ) from None

    def _take_lock(self):
        self._lock = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            self._lock = None
            raise UsageError(
                f'another run is using --output_dir {self.path} right now: wait for it to end or choose another folder'
            ) from None
        except OSError as e:
            if e.errno not in NO_LOCKS:
                os.close(self._lock)
                self._lock = None
                raise
            print(
                f'warning: --output_dir {self.path} is on a file system without file locks ({e.strerror}): the run '
                'goes on unlocked, so make sure no other run uses this folder at the same time (or choose a '
                'folder on a local or lock-capable file system)'
            )

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_text(self, name: str, text: str):
        """Replace a small file atomically."""
        with atomic_file(self.file(name), 'w') as f:
            f.write(text)

    def read_log(self) -> list:
        """The complete JSON lines of log.txt (a line cut off by a kill is left out)."""
        entries = []
        if os.path.isfile(self.file(LOG_FILE)):
            with open(self.file(LOG_FILE)) as f:
                for line in f:
                    try:
                        entries.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get('epoch'), int)]

    def restore_log(self, last_epoch: int, last_entry: Optional[dict]):
        """At a (re)start: log.txt holds each epoch up to `last_epoch` (the resumed checkpoint's) exactly once,
        that epoch's line from the checkpoint when it has it (a kill may have come before the line was written),
        and the TensorBoard events are rewritten from it."""
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
