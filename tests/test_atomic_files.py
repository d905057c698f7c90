"""Every output (checkpoints, config.yaml, eval_results.json, the scripts' JSON and figures) goes through
utils.atomic_file: a regular file is replaced whole or not at all, and nothing that is not a regular file is ever
replaced: a folder, a FIFO or a character device (a stand-in /dev/null here, never the machine's own) is refused in
one line before anything is written. utils.check_output_file refuses such outputs before any work."""

import os
import stat

import pytest
import torch

import checkpoints
import utils
from errors import UsageError

CHARACTER_DEVICE = os.geteuid() == 0  # os.mknod of a device node needs root; a FIFO needs nothing


def temporaries(folder) -> list:
    return [name for name in os.listdir(folder) if name.endswith('.tmp')]


def test_a_failed_write_keeps_the_old_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    checkpoints.save_checkpoint({'epoch': 1, 'w': torch.zeros(10)}, path)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C, a kill of the writer's thread ... halfway through
        with utils.atomic_file(path) as f:
            f.write(b'half a checkpoint')
            raise KeyboardInterrupt
    assert checkpoints.load_checkpoint(path)['epoch'] == 1 and os.listdir(tmp_path) == ['checkpoint.pth']


def test_a_folder_is_refused_and_nothing_is_left_beside_it(tmp_path):
    folder = tmp_path / 'results'
    folder.mkdir()
    with pytest.raises(UsageError, match=f'refusing to replace {folder}: it is not a regular file'):
        with utils.atomic_file(folder, 'w') as f:
            f.write('{}')
    assert folder.is_dir() and os.listdir(tmp_path) == ['results']


def make_node(path, kind: str):
    if kind == 'FIFO':
        os.mkfifo(path)
    else:  # what /dev/null is
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))


def is_node(path, kind: str) -> bool:
    mode = os.lstat(path).st_mode
    return stat.S_ISFIFO(mode) if kind == 'FIFO' else stat.S_ISCHR(mode) and os.lstat(path).st_rdev == os.makedev(1, 3)


@pytest.mark.parametrize('kind', ['FIFO'] + (['character device'] if CHARACTER_DEVICE else []))
def test_a_fifo_or_device_is_never_replaced_by_a_regular_file(kind, tmp_path):
    """--output /dev/null (or a FIFO) would otherwise become a regular file by the rename: refused before any
    byte is written, and left as it was, also through a symbolic link."""
    node = tmp_path / 'null'
    make_node(node, kind)
    (tmp_path / 'link.pth').symlink_to(node)
    for path in (node, tmp_path / 'link.pth'):
        with pytest.raises(UsageError, match=f'refusing to replace {path}: it is not a regular file'):
            checkpoints.save_checkpoint({'epoch': 1}, path)
    assert is_node(node, kind) and temporaries(tmp_path) == []


def test_check_output_file_refuses_what_a_rename_would_replace_before_any_work(tmp_path):
    (tmp_path / 'results').mkdir()
    for path in ('/dev/null', tmp_path / 'results'):  # check_output_file writes nothing: the real /dev/null is safe
        with pytest.raises(UsageError, match=f'--output {path} exists and is not a regular file: give a file name'):
            utils.check_output_file(path, '--output')
    with pytest.raises(UsageError, match='its folder does not exist'):
        utils.check_output_file(tmp_path / 'nowhere' / 'a.json', '--json')
    with pytest.raises(UsageError, match=r'expected a file name ending in \.png or \.pdf'):
        utils.check_output_file(tmp_path / 'checkpoint.pth', '--output', suffixes=('.png', '.pdf'))
    utils.check_output_file(tmp_path / 'curves.png', '--output', suffixes=('.png', '.pdf'))  # new: fine
    assert os.listdir(tmp_path) == ['results']


def test_a_link_to_a_file_replaces_the_file_and_stays_a_link(tmp_path):
    (tmp_path / 'store').mkdir()
    target = tmp_path / 'store' / 'checkpoint.pth'
    checkpoints.save_checkpoint({'epoch': 1}, target)
    link = tmp_path / 'checkpoint.pth'
    link.symlink_to(target)
    checkpoints.save_checkpoint({'epoch': 2}, link)
    assert link.is_symlink() and checkpoints.load_checkpoint(target) == {'epoch': 2}
    assert temporaries(tmp_path) == [] and temporaries(tmp_path / 'store') == []


def test_one_serialisation_under_several_names(tmp_path):
    """best.pth and checkpoint.pth of an epoch: each replaced whole, the same bytes, no temporaries left."""
    for name in ('best.pth', 'checkpoint.pth'):
        (tmp_path / name).write_bytes(b'an older epoch')
    checkpoints.save_checkpoint({'epoch': 3, 'w': torch.ones(4)}, tmp_path / 'best.pth', tmp_path / 'checkpoint.pth')
    assert (tmp_path / 'best.pth').read_bytes() == (tmp_path / 'checkpoint.pth').read_bytes()
    assert checkpoints.load_checkpoint(tmp_path / 'checkpoint.pth')['epoch'] == 3
    assert sorted(os.listdir(tmp_path)) == ['best.pth', 'checkpoint.pth']
