"""Train and evaluate RAVLT Semantic FPN and UperNet (segmentation_models_pytorch decoders) on ADE20K-format data.

    torchrun --nproc_per_node=8 main_seg.py --task semfpn --model RAVLT_S --pretrained RAVLT_S.pth \
        --data-path /path/to/ADEChallengeData2016 --output_dir out/semfpn_s
    python main_seg.py --data-path /path/to/ADEChallengeData2016 --eval --resume out/semfpn_s/checkpoint.pth

Recipes follow the authors' mmseg configs: Semantic FPN 80k steps of AdamW lr 1e-4, weight decay 1e-4, poly decay
(power 0.9) towards 1e-4; UperNet 160k steps of AdamW lr 6e-5, weight decay 0.01 (none on norms), 1500 warm-up
steps, linear decay to 0. Batches of 2 on 8 GPUs; 512x512 crops. The schedule counts steps, whatever the process
count: a run resumed with another one ends at exactly --iters.
"""

import argparse
import functools

import torch
from timm.scheduler import PolyLRScheduler

import cli
import models
import utils
from datasets_dense import IGNORE_INDEX, ADE20KSegmentation
from engine_dense import (
    adamw,
    add_dense_arguments,
    apply_recipe,
    check_img_scale,
    evaluate_segmentation,
    show_recipe_defaults,
)
from errors import UsageError
from model_factory import create_dense_model
from models.dense import dense_backbone
from run import Run

RECIPES = {
    'semfpn': dict(
        lr=1e-4,
        weight_decay=1e-4,
        iters=80000,
        eval_interval=4000,
        warmup_iters=0,
        warmup_ratio=1.0,
        poly_power=0.9,
        min_lr=1e-4,
    ),
    'upernet': dict(
        lr=6e-5,
        weight_decay=0.01,
        iters=160000,
        eval_interval=8000,
        warmup_iters=1500,
        warmup_ratio=1e-6,
        poly_power=1.0,
        min_lr=0.0,
    ),
}
NORM_NO_DECAY = {'semfpn': False, 'upernet': True}  # mmcv paramwise_cfg custom_keys 'norm'
MODEL_FLAGS = ('task', 'model', 'model_kwargs', 'img_scale', 'num_classes', 'reduce_zero_label')


def get_args_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser('main_seg.py', description='RAVLT semantic segmentation')
    training = cli.add_common_arguments(parser, model='RAVLT_S', batch_size=2, num_workers=4, print_freq=50)
    add_dense_arguments(parser, training, RECIPES)
    training.add_argument('--train-split', default='training', help='DATA/images/SPLIT/, DATA/annotations/SPLIT/')
    parser.add_argument('--val-split', default='validation', help='as --train-split')
    parser.add_argument('--num-classes', type=cli.COUNT, default=150)
    parser.add_argument(
        '--reduce-zero-label',
        action=argparse.BooleanOptionalAction,
        default=True,
        help='label 0 is "other", ignored, and the classes are 1..N, as in ADE20K',
    )
    training.add_argument('--iters', type=cli.COUNT, default=None, help='training steps')
    training.add_argument(
        '--eval-interval',
        type=cli.COUNT,
        default=None,
        metavar='STEPS',
        help='evaluate after the epoch that passes each multiple of STEPS',
    )
    training.add_argument('--poly-power', type=cli.POSITIVE, default=None)
    training.add_argument('--min-lr', type=cli.NON_NEGATIVE, default=None)
    parser.add_argument(
        '--img-scale',
        type=cli.COUNT,
        nargs=2,
        default=[2048, 512],
        metavar=('LONG', 'SHORT'),
        help='resize bound, as in mmseg configs (training: times 0.5-2)',
    )
    training.add_argument('--crop-size', type=cli.COUNT, default=512, help='training crop')
    show_recipe_defaults(parser, RECIPES)
    return parser


def main(args):
    with Run(get_args_parser(), args, MODEL_FLAGS) as run:
        apply_recipe(args, RECIPES)
        if args.num_classes >= IGNORE_INDEX:
            raise UsageError(f'--num-classes must be below {IGNORE_INDEX} (the ignored label), got {args.num_classes}')
        data = dict(
            num_classes=args.num_classes,
            img_scale=check_img_scale(args.img_scale),
            crop_size=args.crop_size,
            reduce_zero_label=args.reduce_zero_label,
        )
        dataset_val = ADE20KSegmentation(args.data_path, args.val_split, False, **data)
        model = create_dense_model(
            args.task, args.model, args.num_classes, args.model_kwargs, args.drop_path, args.pretrained
        )
        meta = {'task': args.task, 'model': models.resolve_model_name(args.model), 'num_classes': args.num_classes}
        probe = (dense_backbone(model), torch.zeros(1, 3, 64, 64))
        model, _ = run.prepare(model, meta, probe=probe, train=not args.eval)
        evaluate = functools.partial(
            evaluate_segmentation, num_classes=args.num_classes, ignore_index=IGNORE_INDEX, print_freq=args.print_freq
        )
        loader_val = run.val_loader(dataset_val, 1, sharded=True)
        if args.eval:
            return run.evaluate(model, None, loader_val, evaluate)

        dataset_train = ADE20KSegmentation(args.data_path, args.train_split, True, **data)
        sampler = torch.utils.data.DistributedSampler(
            dataset_train, run.world_size, args.rank, seed=args.seed, drop_last=True
        )
        loader_train = utils.data_loader(dataset_train, sampler, args.batch_size, args, drop_last=True)
        optimizer = adamw(model, args.lr, args.weight_decay, NORM_NO_DECAY[args.task])
        lr_scheduler = PolyLRScheduler(
            optimizer,
            t_initial=args.iters,
            power=args.poly_power,
            lr_min=args.min_lr,
            warmup_t=args.warmup_iters,
            warmup_lr_init=args.lr * args.warmup_ratio,
            t_in_epochs=False,
        )
        return run.train(
            model,
            None,
            optimizer,
            lr_scheduler,
            loader_train,
            loader_val,
            evaluate,
            meta=meta,
            total_steps=args.iters,
            steps_fixed=True,
            eval_interval=args.eval_interval,
            length_flag='--iters',
        )


if __name__ == '__main__':
    with cli.one_line_errors():
        main(get_args_parser().parse_args())
