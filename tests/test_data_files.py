"""Image files as main.py meets them: a file that cannot be read as an image (cut short by a copy, gone since the
folder was listed) ends the run with one line naming it, whether the main process or a data-loading worker
reads it, in training and in evaluation; a tiny image (1 x 1) is an image like any other. A bug in a worker (not
a bad file) ends the run with its traceback: the workers, which leave SIGTERM to their process, never keep it
from exiting."""

import subprocess
import sys

import pytest
from PIL import Image

import main
from helpers import ROOT
from train_helpers import TINY, assert_one_line_error, command_env, run_here

pytestmark = pytest.mark.usefixtures('one_thread')

TRAIN = TINY + [
    '--batch-size',
    '2',
    '--epochs',
    '1',
    '--mixup',
    '0',
    '--cutmix',
    '0',
    '--no-repeated-aug',
    '--no-model-ema',
    '--warmup-epochs',
    '0',
    '--aa',
    'none',
]


def image_folders(root, classes=('a', 'b'), images=2, size=(8, 8)):
    """An IMNET-style tree: `images` images of `size` per class in train/ and val/."""
    for split in ('train', 'val'):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(images):
                Image.new('RGB', size, (40 * i, 80, 120)).save(folder / f'{i}.png')
    return root


def cut_short(path):
    """A JPEG whose end is missing, as an interrupted copy leaves it."""
    Image.new('RGB', (64, 64), (10, 200, 30)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.parametrize('workers', ['0', '2'])
def test_a_truncated_training_image_is_one_line_naming_it(workers, tmp_path):
    root = image_folders(tmp_path / 'data')
    (root / 'train' / 'a' / '1.png').unlink()  # 4 images: every one is read
    truncated = root / 'train' / 'a' / 'cut.jpg'
    cut_short(truncated)
    result = run_here(main, TRAIN + ['--data-path', root, '--num_workers', workers])
    line = assert_one_line_error(
        result.returncode, result.stdout, result.stderr, 2, f'cannot load {truncated}', 'truncated'
    )
    assert 'DataLoader worker' not in line


def test_an_image_gone_since_the_folder_was_listed_is_one_line_naming_it_in_a_worker(tmp_path):
    root = image_folders(tmp_path / 'data')
    (root / 'train' / 'b' / '1.png').unlink()
    gone = root / 'train' / 'b' / 'gone.png'
    gone.symlink_to(root / 'nowhere.png')  # listed by its name, then missing when read
    result = run_here(main, TRAIN + ['--data-path', root, '--num_workers', '2'])
    assert_one_line_error(result.returncode, result.stdout, result.stderr, 2, f'cannot load {gone}', 'No such file')


def test_a_damaged_validation_image_is_one_line_naming_it(tmp_path):
    root = image_folders(tmp_path / 'data')
    damaged = root / 'val' / 'b' / 'noise.png'
    damaged.write_bytes(b'\x89PNG\r\n\x1a\n' + b'not a picture' * 10)
    result = run_here(main, TINY + ['--data-path', root, '--eval', '--batch-size', '2'])
    assert_one_line_error(
        result.returncode, result.stdout, result.stderr, 2, f'cannot load {damaged}', 'cannot identify image file'
    )


def test_one_pixel_training_images_train(tmp_path):
    root = image_folders(tmp_path / 'data', size=(1, 1))
    result = run_here(main, TRAIN + ['--data-path', root, '--output_dir', tmp_path / 'out'])
    assert result.returncode == 0, result.stderr
    assert '* Weights: acc1 ' in result.stdout and (tmp_path / 'out' / 'checkpoint.pth').is_file()


# main.py with a bug in the loading of every sample.
BUGGY_MAIN = """
import sys
import cli, main, utils
def broken(self, item):
    raise KeyError('a bug in a transform')
utils.SeededDataset.__getitem__ = broken
with cli.one_line_errors():
    main.main(main.get_args_parser().parse_args(sys.argv[1:]))
"""


@pytest.mark.slow  # a new interpreter
def test_a_bug_in_a_loader_worker_ends_the_run_with_its_traceback(tmp_path):
    root = image_folders(tmp_path / 'data')
    argv = [str(a) for a in TRAIN + ['--data-path', root, '--num_workers', '2']]
    result = subprocess.run(
        [sys.executable, '-c', BUGGY_MAIN, *argv],
        cwd=ROOT,
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert 'Caught KeyError in DataLoader worker process' in result.stderr
    assert result.stderr.rstrip().endswith("KeyError: 'a bug in a transform'")
