"""Flags, config files (`_base_` inheritance) and their precedence; value checks as strict in YAML as on the
command line; the authors' launch line; the shipped configs; the evaluation resize; RandAugment at the top
magnitude."""

import argparse

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from timm.data.auto_augment import AugmentOp
from torchvision import transforms

import main
import main_det
import main_seg
import models
from datasets import build_transform
from engine_dense import apply_recipe
from errors import UsageError


def parse(argv):
    return main.get_args_parser().parse_args(argv)


def test_authors_launch_line_keeps_its_meaning():
    args = parse(
        [
            '--warmup-epochs',
            '5',
            '--model',
            'RAVLT_T',
            '--data-path',
            'P',
            '--num_workers',
            '16',
            '--batch-size',
            '128',
            '--drop-path',
            '0.05',
            '--epoch',
            '300',
            '--dist-eval',
            '--output_dir',
            'D',
        ]
    )
    assert (args.warmup_epochs, args.model, args.data_path, args.num_workers, args.batch_size) == (
        5,
        'RAVLT_T',
        'P',
        16,
        128,
    )
    assert (args.drop_path, args.epochs, args.dist_eval, args.output_dir) == (0.05, 300, True, 'D')
    # The rest is the authors' recipe.
    assert (args.opt, args.lr, args.weight_decay, args.sched, args.min_lr, args.warmup_lr) == (
        'adamw',
        5e-4,
        0.05,
        'cosine',
        1e-5,
        1e-6,
    )
    assert (args.aa, args.mixup, args.cutmix, args.smoothing, args.reprob) == (
        'rand-m9-mstd0.5-inc1',
        0.8,
        1.0,
        0.1,
        0.25,
    )
    assert (args.repeated_aug, args.model_ema, args.model_ema_decay, args.train_interpolation) == (
        True,
        True,
        0.99996,
        'bicubic',
    )
    assert args.given == {
        'warmup_epochs',
        'model',
        'data_path',
        'num_workers',
        'batch_size',
        'drop_path',
        'epochs',
        'dist_eval',
        'output_dir',
    }


def test_command_line_overrides_config_file(tmp_path):
    config = tmp_path / 'run.yaml'
    config.write_text(
        'batch-size: 8\nlr: 2e-3\nepoch: 7\nno-model-ema: true\nnum-workers: 3\n'
        'model-kwargs: {depths: [1, 1, 1, 1]}\nopt-betas: [0.9, 0.95]\n'
    )
    args = parse(['--config', str(config), '--lr', '0.5', '--model-ema'])
    assert (args.batch_size, args.epochs, args.num_workers) == (8, 7, 3)  # from the file
    assert args.lr == 0.5 and args.model_ema is True  # the command line wins
    assert args.model_kwargs == {'depths': [1, 1, 1, 1]} and args.opt_betas == [0.9, 0.95]
    assert parse(['--config', str(config)]).model_ema is False
    assert isinstance(parse(['--config', str(config)]).lr, float)  # YAML reads 2e-3 as a string
    assert {'batch_size', 'lr', 'epochs', 'model_ema', 'num_workers', 'model_kwargs', 'opt_betas'} <= args.given


def test_base_config_is_inherited_and_overridden(tmp_path):
    (tmp_path / '_base_').mkdir()
    (tmp_path / '_base_' / 'recipe.yaml').write_text('batch-size: 128\nepochs: 300\nlr: 1.0e-3\n')
    (tmp_path / 'variant.yaml').write_text('_base_: _base_/recipe.yaml\nmodel: RAVLT_S\nlr: 2.0e-3\n')
    args = parse(['--config', str(tmp_path / 'variant.yaml')])
    assert (args.batch_size, args.epochs, args.lr, args.model) == (128, 300, 2e-3, 'RAVLT_S')
    (tmp_path / 'loop.yaml').write_text('_base_: loop.yaml\n')
    with pytest.raises(UsageError, match='inherits itself'):
        parse(['--config', str(tmp_path / 'loop.yaml')])


def test_written_config_reads_back_to_the_same_flags(tmp_path):
    parser = main.get_args_parser()
    args = parser.parse_args(
        [
            '--model',
            'RAVLT_S',
            '--model-kwargs',
            '{"depths": [1, 1, 1, 1]}',
            '--no-repeated-aug',
            '--batch-size',
            '16',
            '--cutmix-minmax',
            '0.2',
            '0.8',
        ]
    )
    path = tmp_path / 'config.yaml'
    path.write_text(yaml.safe_dump(parser.to_config(args)))
    again = parse(['--config', str(path)])
    assert {k: v for k, v in vars(again).items() if k != 'given'} == {
        k: v for k, v in vars(args).items() if k != 'given'
    } | {'config': str(path)}


@pytest.mark.parametrize(
    'text, message',
    [
        ('batch-size: many\n', "argument --batch-size: expected an integer, got 'many' (in config"),
        ('data-set: IMAGENET\n', "argument --data-set: invalid choice: 'IMAGENET'"),
        ('eval: 1\n', 'expected true or false'),
        ('- a list\n', 'must map flag names to values'),
        ('model-kwargs: "[1, 2]"\n', 'expected a JSON object'),
        # Values the command line would refuse, refused in YAML too (not rounded, not taken for 1).
        ('epochs: 2.7\n', "argument --epochs/--epoch: expected an integer, got '2.7'"),
        ('batch-size: true\n', 'expected an integer'),
        ('smoothing: 1.5\n', 'must be in [0, 1), got 1.5'),
        ('weight-decay: -0.1\n', 'must be in [0, inf), got -0.1'),
        ('warmup-epochs: -1\n', 'must be in [0, inf), got -1'),
        ('model-ema-decay: 2\n', 'must be in [0, 1], got 2'),
        ('lr: -1\n', 'must be in (0, inf), got -1'),
        ('lr: .nan\n', 'must be in (0, inf), got nan'),
        ('cutmix-minmax: [0.2]\n', 'argument --cutmix-minmax: expected 2 arguments'),
        ('lr:\n', 'lr in config'),  # empty, where the flag has a default
        ('model-ema: [true]\n', 'expected true or false'),
    ],
)
def test_bad_config_values(tmp_path, text, message):
    path = tmp_path / 'bad.yaml'
    path.write_text(text)
    with pytest.raises(UsageError) as error:
        parse(['--config', str(path)])
    assert message in str(error.value) and '\n' not in str(error.value)


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--lr', '-1'], 'argument --lr: must be in (0, inf), got -1'),
        (['--lr', 'inf'], 'argument --lr: must be in (0, inf), got inf'),
        (['--epochs', '0'], 'argument --epochs/--epoch: must be in [1, inf), got 0'),
        (['--batch-size', 'many'], "argument --batch-size: expected an integer, got 'many'"),
        (['--smoothing', '1'], 'must be in [0, 1), got 1'),
        (['--remode', 'zeros'], "invalid choice: 'zeros'"),
    ],
)
def test_bad_values_on_the_command_line(argv, message):
    with pytest.raises(UsageError) as error:
        parse(argv)
    assert message in str(error.value)


@pytest.mark.parametrize('variant', ['t', 's', 'b', 'l'])
def test_variant_configs_hold_the_authors_recipe(variant):
    """A variant file is two lines over the recipe written once in configs/_base_/; the drop path is the
    variant's own (models.RAVLT_CONFIGS)."""
    args = parse(['--config', f'configs/ravlt_{variant}.yaml', '--data-path', 'P'])
    assert args.model == f'RAVLT_{variant.upper()}' and args.drop_path is None
    defaults = {k: v for k, v in vars(parse(['--data-path', 'P'])).items() if k != 'given'}
    assert {k: v for k, v in vars(args).items() if k != 'given'} == dict(
        defaults, config=args.config, model=args.model, batch_size=128, dist_eval=True
    )
    with torch.device('meta'):
        model = timm.create_model(models.resolve_model_name(args.model))
    last_block = model.layers[-1].blocks[-1]
    assert last_block.drop_path.drop_prob == pytest.approx(models.RAVLT_CONFIGS[f'ravlt_{variant}']['drop_path_rate'])


@pytest.mark.parametrize('kind', ['linear', 'rala_no_alpha', 'rala_no_gate_lepe', 'rala', 'softmax'])
def test_ablation_configs_are_the_ravlt_t_recipe_with_one_attention_kind(kind):
    """configs/ablation/: RAVLT-T's recipe, flag for flag, with the kind in the stages that have RALA (every stage
    for softmax); the model builds with that kind's modules."""
    args = parse(['--config', f'configs/ablation/ravlt_t_{kind}.yaml', '--data-path', 'P'])
    recipe = parse(['--config', 'configs/ravlt_t.yaml', '--data-path', 'P'])
    expected = [kind] * 4 if kind == 'softmax' else [kind, kind, 'softmax', 'softmax']
    assert args.model_kwargs == {'attn_types': expected}
    ignored = {'given', 'config', 'model_kwargs'}
    assert {k: v for k, v in vars(args).items() if k not in ignored} == {
        k: v for k, v in vars(recipe).items() if k not in ignored
    }
    with torch.device('meta'):
        model = timm.create_model(models.resolve_model_name(args.model), **args.model_kwargs)

    def kind(attn):
        return type(attn), getattr(attn, 'alpha', None), getattr(attn, 'gate_lepe', None)

    assert [kind(stage.blocks[0].attn) for stage in model.layers] == [
        kind(models.ATTENTION_TYPES[k](16, 1)) for k in expected
    ]


def test_demo_config_parses():
    args = parse(['--config', 'configs/demo_digits.yaml'])
    assert (args.data_set, args.device, args.input_size) == ('DIGITS', 'cpu', 32)
    assert args.model_kwargs['embed_dims'] == [32, 64, 128, 256]


def test_dense_recipes_fill_the_flags_not_given(tmp_path):
    args = main_det.get_args_parser().parse_args(['--config', 'configs/det_maskrcnn_3x.yaml'])
    apply_recipe(args, main_det.RECIPES)
    assert (args.task, args.epochs, args.lr_steps, args.multiscale) == ('maskrcnn', 36, [27, 33], True)
    assert (args.weight_decay, args.warmup_iters, args.warmup_ratio, args.img_scale) == (0.05, 500, 1e-3, [1333, 800])
    args = main_seg.get_args_parser().parse_args(['--task', 'upernet', '--lr', '1e-4'])
    apply_recipe(args, main_seg.RECIPES)
    assert (args.lr, args.iters, args.warmup_iters, args.poly_power, args.min_lr) == (1e-4, 160000, 1500, 1.0, 0.0)


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
    # 'inc1' posterize keeps 4 - int(magnitude / 10 * 4) bits: none at magnitude 10 (Pillow 13 refuses 0 bits).
    build_transform(True, parse(['--input-size', '64']))  # installs the op before timm builds the policy's ops
    op = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert np.asarray(op(image)).max() == 0


def help_entries(text: str) -> dict:
    """{first flag: its whole entry} of an argparse --help text."""
    entries, current = {}, None
    for line in text.splitlines():
        if line.startswith('  -'):
            current = line.split()[0].rstrip(',')
            entries[current] = line
        elif line.startswith('    ') and current:
            entries[current] += ' ' + line.strip()
        else:
            current = None
    return entries


def entry_point_parsers():
    """The entry points' parsers (the scripts' come from the same cli.ArgumentParser)."""
    return {module.__name__: module.get_args_parser() for module in (main, main_det, main_seg)}


def test_help_shows_every_flags_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(['--help'])
    assert exit_info.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    assert len(entries) > 50
    assert [flag for flag, entry in entries.items() if 'default' not in entry and flag != '-h'] == []
    # What a default depends on is said.
    assert 'per 512 images' in entries['--lr'] and '(default: 0.0005)' in entries['--lr']
    assert "the variant's own: RAVLT_T 0.1, RAVLT_S 0.15, RAVLT_B 0.4, RAVLT_L 0.55" in entries['--drop-path']
    assert '(default: 64)' in entries['--batch-size'] and '(default: 300)' in entries['--epochs']
    assert '(default: RAVLT_T)' in entries['--model']
    assert entries['--model-ema'].startswith('  --model-ema, --no-model-ema ')
    assert entries['--model-ema'].endswith('(default: True)')
    assert entries['--seed'].endswith('(default: 0)')  # a flag without help text
    det = help_entries(main_det.get_args_parser().format_help())
    assert det['--epochs'].endswith("(default: 12 for retinanet, 12 for maskrcnn, the --task recipe's)")
    assert '(default: [8, 11] for retinanet' in det['--lr-steps']
    seg = help_entries(main_seg.get_args_parser().format_help())
    assert '80000 for semfpn, 160000 for upernet' in seg['--iters']
    for name, parser in entry_point_parsers().items():
        missing = [
            flag
            for flag, entry in help_entries(parser.format_help()).items()
            if 'default' not in entry
            and 'required' not in entry
            and flag != '-h'
            and not parser._option_string_actions[flag].required
        ]
        assert missing == [], name


def test_no_parser_takes_an_abbreviation():
    for parser in entry_point_parsers().values():
        flag = next(f for f in parser._option_string_actions if f.startswith('--') and len(f) > 6 and f != '--help')
        with pytest.raises(UsageError, match=f"unknown flag '{flag[:-2]}'; did you mean '{flag}'"):
            parser.parse_args([flag[:-2], '1'])


def test_hflip_sets_the_training_flip():
    """Digits and text change meaning when flipped: --hflip 0 leaves the flip out."""

    def flips(argv):
        return [
            t.p for t in build_transform(True, parse(argv)).transforms if isinstance(t, transforms.RandomHorizontalFlip)
        ]

    assert flips([]) == [0.5] and flips(['--hflip', '0']) == []
    assert flips(['--hflip', '0.2', '--input-size', '32']) == [0.2]
