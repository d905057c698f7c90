"""What an image folder holds is read as it is, or refused in one line: each folder once (a symbolic link loop
or a second link to one folder would count its images again), only regular files (a FIFO named x.png would
block the run forever), and every depth in 8-bit RGB (16-bit PNGs scaled, not clipped; float TIFFs in [0, 1]
scaled; depths whose range is unknown refused)."""

import os

import numpy as np
import pytest
from PIL import Image

import main
from cli import run_cli
from datasets import ImageFolder
from errors import UsageError
from train_helpers import TINY, assert_one_line_error, run_main

pytestmark = pytest.mark.usefixtures('one_thread')


def image_folders(root, classes=('a', 'b'), images=2):
    for split in ('train', 'val'):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(images):
                Image.new('RGB', (8, 8), (40 * i, 80, 120)).save(folder / f'{i}.png')
    return root


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


def test_a_symbolic_link_loop_is_refused_naming_the_link(tmp_path):
    root = image_folders(tmp_path / 'data')
    (root / 'train' / 'a' / 'loop').symlink_to('.')
    with pytest.raises(
        UsageError,
        match=f'{root / "train" / "a" / "loop"} is {root / "train" / "a"} again '
        r'\(a symbolic link loop',
    ):
        ImageFolder(str(root / 'train'))


def test_a_second_link_to_one_folder_is_refused_and_a_linked_class_folder_counts_once(tmp_path):
    root = image_folders(tmp_path / 'data')
    elsewhere = image_folders(tmp_path / 'elsewhere', classes=('c',), images=3)
    (root / 'train' / 'c').symlink_to(elsewhere / 'train' / 'c')  # data kept elsewhere: a class like any other
    dataset = ImageFolder(str(root / 'train'))
    assert dataset.classes == ['a', 'b', 'c'] and len(dataset) == 7
    assert [os.path.basename(p) for p, label in dataset.samples if label == 2] == ['0.png', '1.png', '2.png']
    (root / 'train' / 'b' / 'more').symlink_to(root / 'train' / 'a')
    with pytest.raises(UsageError, match='two links to one folder'):
        ImageFolder(str(root / 'train'))


def test_a_fifo_named_like_an_image_is_refused_before_it_can_block(tmp_path):
    root = image_folders(tmp_path / 'data')
    os.mkfifo(root / 'train' / 'b' / 'x.png')
    with pytest.raises(UsageError, match=f'{root / "train" / "b" / "x.png"} is a FIFO, not a regular file'):
        ImageFolder(str(root / 'train'))


@pytest.mark.slow
@pytest.mark.parametrize(
    'make, fragments',
    [
        (
            lambda root: (root / 'train' / 'a' / 'loop').symlink_to('.'),
            ['symbolic link loop', 'its images would count twice; remove the link'],
        ),
        (lambda root: os.mkfifo(root / 'train' / 'b' / 'x.png'), ['x.png is a FIFO', 'only regular files are images']),
    ],
)
def test_main_refuses_such_a_folder_in_one_line(make, fragments, tmp_path):
    root = image_folders(tmp_path / 'data')
    make(root)
    result = run_main(TRAIN + ['--data-path', root], timeout=120)
    assert_one_line_error(result.returncode, result.stdout, result.stderr, 2, *fragments)


def write_image(root, name, array):
    folder = root / 'train' / 'a'
    folder.mkdir(parents=True)
    Image.fromarray(array).save(folder / name)
    return ImageFolder(str(root / 'train'))


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    levels = (np.arange(1024, dtype=np.uint16) * 64).reshape(32, 32)  # 1,024 levels over the 16-bit range
    dataset = write_image(tmp_path, 'deep.png', levels)
    assert Image.open(dataset.samples[0][0]).mode == 'I;16'
    image = np.asarray(dataset[0][0])
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    np.testing.assert_array_equal(image[..., 0], np.rint(levels / 257.0).astype(np.uint8))
    assert (image[..., 0] == image[..., 2]).all() and len(np.unique(image)) == 256  # every 8-bit level


def test_float_tiff_in_0_1_is_scaled_and_other_ranges_refused(tmp_path):
    values = (np.arange(1024, dtype=np.float32) / 1023).reshape(32, 32)
    dataset = write_image(tmp_path / 'unit', 'float.tiff', values)
    image = np.asarray(dataset[0][0])
    np.testing.assert_array_equal(image[..., 1], np.rint(values.astype(np.float64) * 255).astype(np.uint8))
    assert image.max() == 255 and len(np.unique(image)) == 256
    with pytest.raises(ValueError, match='a floating-point image with values from 0 to 300, not from 0 to 1'):
        write_image(tmp_path / 'wide', 'float.tiff', np.linspace(0, 300, 64, dtype=np.float32).reshape(8, 8))[0]
    with pytest.raises(ValueError, match='a 32-bit integer image'):
        write_image(tmp_path / 'int32', 'int.tiff', np.arange(64, dtype=np.int32).reshape(8, 8) * 10**6)[0]


@pytest.mark.slow
def test_a_float_image_out_of_range_stops_training_naming_it(tmp_path, capsys):
    root = image_folders(tmp_path / 'data', images=3)  # 6 images with it: 3 batches of 2, each image read
    path = root / 'train' / 'a' / '2.png'
    path.unlink()
    path = path.with_name('wide.tiff')
    Image.fromarray(np.full((8, 8), 7.5, np.float32)).save(path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main.cli, [str(a) for a in TRAIN + ['--data-path', root]])
    captured = capsys.readouterr()
    assert_one_line_error(
        exit_info.value.code,
        captured.out,
        captured.err,
        2,
        str(path),
        'a floating-point image with values from 7.5 to 7.5',
    )
