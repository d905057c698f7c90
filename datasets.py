"""Data sets and their transforms: ImageNet class folders (IMNET), CIFAR-100 (CIFAR), random images
(FAKE) and scikit-learn's handwritten digits (DIGITS, shipped inside the package)."""

import os
import stat

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from errors import UsageError

DATA_SETS = ('IMNET', 'CIFAR', 'FAKE', 'DIGITS')
FAKE_SIZES = {True: 1024, False: 256}  # train / val images of the FAKE set
DIGITS_VAL_SIZE = 360  # of load_digits' 1,797 images; the other 1,437 train


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op, with 0 bits giving a black image as in Pillow < 13: the authors' RandAugment
    policy (rand-m9-mstd0.5-inc1) asks for 0 bits whenever the sampled magnitude reaches 10, and
    Pillow 13 raises on that."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def use_zero_bit_posterize():
    """Make timm's RandAugment build its posterize ops with `posterize` above (timm looks ops up by name when a
    policy is built, so this runs before create_transform)."""
    for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        auto_augment.NAME_TO_OP[name] = posterize


class Digits(torch.utils.data.Dataset):
    """scikit-learn's 8x8 handwritten digits (10 classes) with a fixed, stratified train/val split.
    Images are returned as (3, 8, 8) tensors in [0, 1] for the transform to upscale."""

    def __init__(self, train: bool, transform=None):
        from sklearn.datasets import load_digits  # the demo's data: scikit-learn is the `demo` extra
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        indices = train_test_split(
            range(len(digits.target)), test_size=DIGITS_VAL_SIZE, stratify=digits.target, random_state=0
        )[0 if train else 1]
        self.images = torch.tensor(digits.images[indices], dtype=torch.float32) / 16.0
        self.targets = torch.tensor(digits.target[indices]).tolist()
        self.classes = [str(c) for c in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def sample_path(self, index: int) -> str:
        return f'DIGITS image {index}'

    def __getitem__(self, index: int):
        image = self.images[index].expand(3, -1, -1)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


FILE_KINDS = (
    (stat.S_ISFIFO, 'a FIFO'),
    (stat.S_ISSOCK, 'a socket'),
    (stat.S_ISCHR, 'a character device'),
    (stat.S_ISBLK, 'a block device'),
)


def file_kind(mode: int) -> str:
    return next((name for test, name in FILE_KINDS if test(mode)), 'not a regular file')


def open_regular(path: str):
    """`path` opened for reading in binary, if it is a regular file; anything else (a FIFO named x.png, a device)
    raises ValueError at once, without blocking on it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ValueError(f'{file_kind(mode)}, not a regular file: only regular files are data')
    return os.fdopen(fd, 'rb')


def load_rgb_image(path: str) -> Image.Image:
    """An image file as 8-bit RGB, whatever its depth: 16-bit images scaled from 0-65535 to 0-255 (Pillow's
    convert('RGB') would clip them at 255), floating-point ones from 0-1 to 0-255. Other depths (32-bit integers,
    floats outside 0-1) raise ValueError rather than be guessed. Only a regular file is read: a FIFO or a device
    raises at once, without blocking."""
    with open_regular(path) as f:
        image = Image.open(f)
        if image.mode.startswith('I;16'):
            levels = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
            image = Image.fromarray(np.rint(levels).astype(np.uint8), 'L')
        elif image.mode == 'F':
            values = np.asarray(image, dtype=np.float64)
            low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
            if not (0.0 <= low and high <= 1.0):
                raise ValueError(
                    f'a floating-point image with values from {low:g} to {high:g}, not from 0 to 1: '
                    'convert it to 8 or 16 bits per channel'
                )
            image = Image.fromarray(np.rint(values * 255.0).astype(np.uint8), 'L')
        elif image.mode in ('I', 'I;32', 'I;32B', 'I;32L'):
            raise ValueError(f'a 32-bit integer image (mode {image.mode}): convert it to 8 or 16 bits per channel')
        return image.convert('RGB')


def _class_samples(class_dir: str, class_index: int, seen: dict) -> list:
    """(path, class_index) of the image files under `class_dir`, in torchvision's order (folders by path, files
    by name), following symbolic links. A folder reached twice (a link loop, two links to one folder) and a
    file that is not a regular one (a FIFO named x.png) are one-line UsageErrors: its images would count twice,
    or reading it would block. A dangling link is listed (its read fails naming it)."""
    folders, pending = [], [class_dir]
    while pending:
        folder = pending.pop()
        real = os.path.realpath(folder)
        if real in seen:
            raise UsageError(
                f'{folder} is {seen[real]} again (a symbolic link loop, or two links to one folder): '
                'its images would count twice; remove the link'
            )
        seen[real] = folder
        files = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir():
                        pending.append(entry.path)
                    elif has_file_allowed_extension(entry.name, IMG_EXTENSIONS):
                        if not entry.is_file() and os.path.exists(entry.path):
                            kind = file_kind(os.stat(entry.path).st_mode)
                            raise UsageError(
                                f'{entry.path} is {kind}, not a regular file: only regular files are '
                                'images; remove it from the data folder'
                            )
                        files.append(entry.name)
        except OSError as e:
            raise UsageError(f'cannot read the folder {folder} ({e.strerror.lower()})') from None
        folders.append((folder, sorted(files)))
    return [(os.path.join(folder, name), class_index) for folder, files in sorted(folders) for name in files]


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder that lists only regular files, each folder once (see _class_samples), reads
    every image depth correctly (load_rgb_image), and names the file behind a sample (for one-line load errors)."""

    def __init__(self, root: str, transform=None):
        super().__init__(root, transform=transform, loader=load_rgb_image)

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False) -> list:
        seen, samples, empty = {os.path.realpath(directory): directory}, [], []
        for name in sorted(class_to_idx):
            found = _class_samples(os.path.join(directory, name), class_to_idx[name], seen)
            samples += found
            if not found:
                empty.append(name)
        if empty and not allow_empty:
            raise UsageError(
                f'{directory}: found no images for the classes {", ".join(empty[:5])}'
                f'{" ..." if len(empty) > 5 else ""} (image files end in {", ".join(IMG_EXTENSIONS)})'
            )
        return samples

    def sample_path(self, index: int) -> str:
        return self.samples[index][0]


def _image_folder(root: str, transform):
    """An ImageFolder whose layout problems become one-line UsageErrors saying how to fix them."""
    split = os.path.basename(root)
    if not os.path.isdir(root):
        raise UsageError(
            f'{os.path.dirname(root)} has no {split}/ folder: --data-set IMNET expects '
            f'DATA/train/<class>/<images> and DATA/val/<class>/<images>'
        )
    entries = os.listdir(root)
    if not any(os.path.isdir(os.path.join(root, e)) for e in entries):
        raise UsageError(
            f'{root} has no class folders ({len(entries)} file(s) directly in it): put its images '
            'into one folder per class named as in train/ (for ImageNet val, e.g. with the '
            'widely used valprep.sh)'
        )
    try:
        return ImageFolder(root, transform=transform)
    except FileNotFoundError as e:
        raise UsageError(f'{root}: {str(e).splitlines()[0]}') from None


def build_dataset(is_train: bool, args):
    """(dataset, number of classes) for `args.data_set`, the train or val split."""
    transform = build_transform(is_train, args)
    if args.data_set == 'DIGITS':
        return Digits(is_train, transform), 10
    if args.data_set == 'FAKE':
        # Different offsets give train and val different images.
        return datasets.FakeData(
            FAKE_SIZES[is_train],
            (3, args.input_size, args.input_size),
            1000,
            transform,
            random_offset=0 if is_train else FAKE_SIZES[True],
        ), 1000
    if not args.data_path:
        raise UsageError(f'--data-set {args.data_set} needs --data-path')
    if not os.path.isdir(args.data_path):
        raise UsageError(f'--data-path {args.data_path} does not exist or is not a folder')
    if args.data_set == 'CIFAR':
        try:
            return datasets.CIFAR100(args.data_path, train=is_train, transform=transform, download=False), 100
        except RuntimeError:
            raise UsageError(
                f'CIFAR-100 not found under {args.data_path}: extract '
                'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz there '
                '(giving DATA/cifar-100-python/train, test, meta)'
            ) from None
    if not os.listdir(args.data_path):
        raise UsageError(
            f'--data-path {args.data_path} is empty: --data-set IMNET expects '
            'DATA/train/<class>/<images> and DATA/val/<class>/<images>'
        )
    dataset = _image_folder(os.path.join(args.data_path, 'train' if is_train else 'val'), transform)
    return dataset, len(dataset.classes)


def build_transform(is_train: bool, args):
    """The authors' (DeiT's) transforms: for training RandomResizedCrop, flip, RandAugment, colour
    jitter and random erasing (a padded random crop at 32 px and below); for evaluation a resize of
    the short side to input_size * 256 / 224 and a centre crop (no resize ratio above 224 px, none at
    32 px and below), bicubic. DIGITS uses a light crop-and-upscale of its 8x8 images instead."""
    size = args.input_size
    if args.data_set == 'DIGITS':
        resize = (
            transforms.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.15))
            if is_train
            else transforms.Resize(size)
        )
        return transforms.Compose([resize, transforms.Normalize([0.5] * 3, [0.5] * 3)])
    if is_train:
        use_zero_bit_posterize()
        transform = create_transform(
            size,
            is_training=True,
            hflip=args.hflip,
            color_jitter=args.color_jitter,
            auto_augment=args.aa if args.aa and args.aa != 'none' else None,
            interpolation=args.train_interpolation,
            re_prob=args.reprob,
            re_mode=args.remode,
            re_count=args.recount,
        )
        if size <= 32:
            transform.transforms[0] = transforms.RandomCrop(size, padding=4, pad_if_needed=True)
        return transform
    crop_pct = 224 / 256 if 32 < size <= 224 else 1.0
    return create_transform(size, is_training=False, interpolation='bicubic', crop_pct=crop_pct)
