"""Flags, config files and their precedence; the authors' launch line; the shipped configs; the
evaluation resize; RandAugment at the top magnitude."""
import argparse

import numpy as np
import pytest
import yaml
from PIL import Image
from timm.data.auto_augment import AugmentOp
from torchvision import transforms

import main
from datasets import build_transform
from utils import UsageError


def test_authors_launch_line_keeps_its_meaning():
    args = main.parse_args(['--warmup-epochs', '5', '--model', 'RAVLT_T', '--data-path', 'P', '--num_workers', '16',
                            '--batch-size', '128', '--drop-path', '0.05', '--epoch', '300', '--dist-eval',
                            '--output_dir', 'D'])
    assert (args.warmup_epochs, args.model, args.data_path, args.num_workers, args.batch_size) == \
        (5, 'RAVLT_T', 'P', 16, 128)
    assert (args.drop_path, args.epochs, args.dist_eval, args.output_dir) == (0.05, 300, True, 'D')
    # The rest is the authors' recipe.
    assert (args.opt, args.lr, args.weight_decay, args.sched, args.min_lr, args.warmup_lr) == \
        ('adamw', 5e-4, 0.05, 'cosine', 1e-5, 1e-6)
    assert (args.aa, args.mixup, args.cutmix, args.smoothing, args.reprob) == \
        ('rand-m9-mstd0.5-inc1', 0.8, 1.0, 0.1, 0.25)
    assert (args.repeated_aug, args.model_ema, args.model_ema_decay, args.train_interpolation) == \
        (True, True, 0.99996, 'bicubic')


def test_command_line_overrides_config_file(tmp_path):
    config = tmp_path / 'run.yaml'
    config.write_text('batch-size: 8\nlr: 2e-3\nepoch: 7\nno-model-ema: true\nnum-workers: 3\n'
                      'model-kwargs: {depths: [1, 1, 1, 1]}\nopt-betas: [0.9, 0.95]\n')
    args = main.parse_args(['--config', str(config), '--lr', '0.5', '--model-ema'])
    assert (args.batch_size, args.epochs, args.num_workers) == (8, 7, 3)  # from the file
    assert args.lr == 0.5 and args.model_ema is True  # the command line wins
    assert args.model_kwargs == {'depths': [1, 1, 1, 1]} and args.opt_betas == [0.9, 0.95]
    assert main.parse_args(['--config', str(config)]).model_ema is False
    assert isinstance(main.parse_args(['--config', str(config)]).lr, float)  # YAML reads 2e-3 as a string


def test_written_config_reads_back_to_the_same_flags(tmp_path):
    args = main.parse_args(['--model', 'RAVLT_S', '--model-kwargs', '{"depths": [1, 1, 1, 1]}', '--no-repeated-aug',
                            '--batch-size', '16', '--cutmix-minmax', '0.2', '0.8'])
    path = tmp_path / 'config.yaml'
    path.write_text(yaml.safe_dump(main.args_to_config(args)))
    assert vars(main.parse_args(['--config', str(path)])) == dict(vars(args), config=str(path))


@pytest.mark.parametrize('text, message', [
    ('batch-size: many\n', "batch-size: 'many' in config"),
    ('data-set: IMAGENET\n', 'is not one of IMNET, CIFAR, FAKE, DIGITS'),
    ('eval: 1\n', 'eval in config'),
    ('- a list\n', 'must map flag names to values'),
    ('model-kwargs: "[1, 2]"\n', 'expected a JSON object'),
])
def test_bad_config_values(tmp_path, text, message):
    path = tmp_path / 'bad.yaml'
    path.write_text(text)
    with pytest.raises(UsageError, match=message.replace('(', r'\(').replace('[', r'\[')):
        main.parse_args(['--config', str(path)])


@pytest.mark.parametrize('variant, drop_path', [('t', 0.1), ('s', 0.15), ('b', 0.4), ('l', 0.55)])
def test_variant_configs_hold_the_authors_recipe(variant, drop_path):
    args = main.parse_args(['--config', f'configs/ravlt_{variant}.yaml', '--data-path', 'P'])
    assert args.model == f'RAVLT_{variant.upper()}' and args.drop_path == drop_path
    assert vars(args) == dict(vars(main.parse_args(['--data-path', 'P'])), config=args.config, model=args.model,
                              drop_path=drop_path, batch_size=128, num_workers=16, dist_eval=True)


def test_demo_config_parses():
    args = main.parse_args(['--config', 'configs/demo_digits.yaml'])
    assert (args.data_set, args.device, args.input_size) == ('DIGITS', 'cpu', 32)
    assert args.model_kwargs['embed_dims'] == [32, 64, 128, 256]


def resize_and_crop(size: int):
    transform = build_transform(False, argparse.Namespace(data_set='IMNET', input_size=size))
    resize = next(t for t in transform.transforms if isinstance(t, transforms.Resize))
    crop = next(t for t in transform.transforms if isinstance(t, transforms.CenterCrop))
    return resize.size, crop.size, resize.interpolation


def test_eval_resizes_by_256_over_224_up_to_224_only():
    assert resize_and_crop(224) == (256, (224, 224), transforms.InterpolationMode.BICUBIC)
    assert resize_and_crop(160) == (182, (160, 160), transforms.InterpolationMode.BICUBIC)
    assert resize_and_crop(384)[:2] == (384, (384, 384))


def test_randaugment_posterize_at_top_magnitude_gives_a_black_image():
    # 'inc1' posterize keeps 4 - int(magnitude / 10 * 4) bits: none at magnitude 10.
    op = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert np.asarray(op(image)).max() == 0
