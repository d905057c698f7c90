"""Every output (checkpoints, config.yaml, the scripts' JSON and PNG files) goes through utils.atomic_file: a
regular file is replaced whole or not at all, and nothing that is not a regular file is ever replaced: a
character device or a FIFO is written in place (a stand-in /dev/null and a FIFO in a temporary folder here,
never the machine's own), a folder, block device or socket is refused in one line. Ctrl-C during a save
lets the save finish, then stops with exit code 130."""

import os
import signal
import stat
import threading

import pytest
import torch

import checkpoints
import utils
from cli import run_cli
from errors import UsageError
from scripts import plot_logs

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason='os.mknod of a device node needs root')


def write_log(folder) -> str:
    """A run folder whose log.txt holds one epoch: what scripts/plot_logs.py draws."""
    folder.mkdir()
    (folder / 'log.txt').write_text('{"epoch": 0, "train_loss": 1.0}\n')
    return str(folder)


def temporaries(folder) -> list:
    return [name for name in os.listdir(folder) if name.endswith('.tmp')]


@needs_root
def test_a_character_device_is_written_in_place_never_replaced(tmp_path, capsys):
    null = tmp_path / 'null'
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is
    run = write_log(tmp_path / 'run')
    plot_logs.main(plot_logs.get_args_parser().parse([run, '--output', str(null)]))
    checkpoints.save_checkpoint({'epoch': 1}, null)
    assert stat.S_ISCHR(os.stat(null).st_mode) and os.stat(null).st_rdev == os.makedev(1, 3)
    assert temporaries(tmp_path) == [] and f'wrote {null}' in capsys.readouterr().out


@needs_root
def test_a_block_device_is_refused(tmp_path):
    disk = tmp_path / 'loop200'
    os.mknod(disk, stat.S_IFBLK | 0o600, os.makedev(7, 200))
    with pytest.raises(UsageError, match=f'refusing to write {disk}: it is a block device'):
        with utils.atomic_file(disk) as f:
            f.write(b'x')
    assert stat.S_ISBLK(os.stat(disk).st_mode) and temporaries(tmp_path) == []


def test_a_fifo_is_written_in_place_and_one_nobody_reads_is_refused(tmp_path):
    fifo = tmp_path / 'curves.png'
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo, 'rb').read()), daemon=True)
    reader.start()
    run = write_log(tmp_path / 'run')
    try:
        plot_logs.main(plot_logs.get_args_parser().parse([run, '--output', str(fifo)]))
    finally:
        reader.join(timeout=60)
    assert received and received[0].startswith(b'\x89PNG') and stat.S_ISFIFO(os.stat(fifo).st_mode)
    # Without a reader a write would wait forever: refused at once instead.
    with pytest.raises(UsageError, match=f'cannot write {fifo}: it is a FIFO that no process reads'):
        with utils.atomic_file(fifo) as f:
            f.write(b'x')
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and temporaries(tmp_path) == []


def test_a_folder_is_refused_and_nothing_is_left_beside_it(tmp_path):
    folder = tmp_path / 'results'
    folder.mkdir()
    with pytest.raises(UsageError, match=f'cannot write {folder}: it is a folder; give a file name'):
        with utils.atomic_file(folder, 'w') as f:
            f.write('{}')
    assert folder.is_dir() and os.listdir(tmp_path) == ['results']


def test_a_link_to_a_file_replaces_the_file_and_stays_a_link(tmp_path):
    (tmp_path / 'store').mkdir()
    target = tmp_path / 'store' / 'checkpoint.pth'
    checkpoints.save_checkpoint({'epoch': 1}, target)
    link = tmp_path / 'checkpoint.pth'
    link.symlink_to(target)
    checkpoints.save_checkpoint({'epoch': 2}, link)
    assert link.is_symlink() and checkpoints.load_checkpoint(target) == {'epoch': 2}
    assert temporaries(tmp_path) == [] and temporaries(tmp_path / 'store') == []


class CtrlCDuringWrite:
    """The file torch.save writes into, with Ctrl-C pressed (SIGINT to this process) at its `at`-th writes."""

    def __init__(self, f, at):
        self.f, self.at, self.calls = f, at, 0

    def write(self, data):
        self.calls += 1
        if self.calls in self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


@pytest.mark.parametrize('presses, saved', [((3,), 2), ((3, 5), 1)])
def test_ctrl_c_during_a_save_is_exit_130_and_the_file_whole(presses, saved, tmp_path, monkeypatch, capsys):
    """One Ctrl-C: the save finishes (the new file), then the run stops. A second one stops the save at once (the
    old file stays). Either way exit code 130 and one line, never torch's "unexpected pos"."""
    path = tmp_path / 'checkpoint.pth'
    checkpoints.save_checkpoint({'epoch': 1, 'w': torch.zeros(10)}, path)
    save = torch.save
    monkeypatch.setattr(torch, 'save', lambda obj, f: save(obj, CtrlCDuringWrite(f, presses)))

    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda argv: checkpoints.save_checkpoint({'epoch': 2, 'w': torch.ones(1000, 1000)}, path), [])
    monkeypatch.undo()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.splitlines() == [
        'error: interrupted; the checkpoints on disk are whole (the last one written is the resume point)'
    ]
    assert checkpoints.load_checkpoint(path)['epoch'] == saved and temporaries(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
