"""Data sets and their transforms: ImageNet class folders (IMNET), CIFAR-100 (CIFAR), random images (FAKE) and
scikit-learn's handwritten digits (DIGITS, shipped inside the package)."""

import os

import torch
from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform
from torchvision import datasets, transforms

from errors import UsageError

DATA_SETS = ('IMNET', 'CIFAR', 'FAKE', 'DIGITS')
FAKE_SIZES = {True: 1024, False: 256}  # train / val images of the FAKE set
DIGITS_VAL_SIZE = 360  # of load_digits' 1,797 images; the other 1,437 train


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op, with 0 bits giving a black image as in Pillow < 13: the authors' RandAugment policy
    (rand-m9-mstd0.5-inc1) asks for 0 bits whenever the sampled magnitude reaches 10, and Pillow 13 raises."""
    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, bits_to_keep) if bits_to_keep > 0 else Image.new(img.mode, img.size)


class Digits(torch.utils.data.Dataset):
    """scikit-learn's 8x8 handwritten digits (10 classes) with a fixed, stratified train/val split, as (3, 8, 8)
    tensors in [0, 1] for the transform to upscale."""

    def __init__(self, train: bool, transform=None):
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        except ImportError:
            raise UsageError('--data-set DIGITS needs scikit-learn: pip install scikit-learn') from None
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

    def __getitem__(self, index: int):
        return self.transform(self.images[index].expand(3, -1, -1)), self.targets[index]


def image_folder(root: str, transform) -> datasets.ImageFolder:
    """torchvision's ImageFolder, whose layout problems are one line saying how to fix them."""
    if not os.path.isdir(root):
        raise UsageError(
            f'{os.path.dirname(root)} has no {os.path.basename(root)}/ folder: --data-set IMNET expects '
            'DATA/train/<class>/<images> and DATA/val/<class>/<images>'
        )
    try:
        return datasets.ImageFolder(root, transform=transform)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise UsageError(
            f'{root}: {str(e).splitlines()[0]} (DATA/val/ must be sorted into class folders too)'
        ) from None


def build_dataset(is_train: bool, args):
    """(dataset, number of classes) for `args.data_set`, the train or val split."""
    transform = build_transform(is_train, args)
    if args.data_set == 'DIGITS':
        return Digits(is_train, transform), 10
    if args.data_set == 'FAKE':  # different offsets give train and val different images
        size = (3, args.input_size, args.input_size)
        offset = 0 if is_train else FAKE_SIZES[True]
        return datasets.FakeData(FAKE_SIZES[is_train], size, 1000, transform, random_offset=offset), 1000
    if not os.path.isdir(args.data_path or ''):
        raise UsageError(f'--data-path {args.data_path!r} is not a folder (--data-set {args.data_set} needs one)')
    if args.data_set == 'CIFAR':
        try:
            return datasets.CIFAR100(args.data_path, train=is_train, transform=transform, download=False), 100
        except RuntimeError:
            raise UsageError(
                f'CIFAR-100 not found under {args.data_path}: extract cifar-100-python.tar.gz there '
                '(DATA/cifar-100-python/train, test, meta)'
            ) from None
    dataset = image_folder(os.path.join(args.data_path, 'train' if is_train else 'val'), transform)
    return dataset, len(dataset.classes)


def build_transform(is_train: bool, args):
    """The authors' (DeiT's) transforms: for training RandomResizedCrop, flip, RandAugment, colour jitter (which
    timm leaves out when RandAugment is on) and random erasing (a padded random crop at 32 px and below); for
    evaluation a resize of the short side to input_size * 256 / 224 and a centre crop (no resize ratio above
    224 px, none at 32 px and below), bicubic. DIGITS uses a light crop-and-upscale of its 8x8 images instead."""
    size = args.input_size
    if args.data_set == 'DIGITS':
        crop = transforms.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.15))
        return transforms.Compose(
            [crop if is_train else transforms.Resize(size), transforms.Normalize([0.5] * 3, [0.5] * 3)]
        )
    if is_train:
        for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):  # looked up when a policy is built
            auto_augment.NAME_TO_OP[name] = posterize
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
