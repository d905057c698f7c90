"""Train and evaluate RAVLT Semantic FPN and UperNet (segmentation_models_pytorch decoders) on
ADE20K-format data.

    torchrun --nproc_per_node=8 main_seg.py --task semfpn --model RAVLT_S --pretrained RAVLT_S.pth \
        --data-path /path/to/ADEChallengeData2016 --output_dir out/semfpn_s
    python main_seg.py --data-path /path/to/ADEChallengeData2016 --eval --resume out/semfpn_s/checkpoint.pth

Recipes follow the authors' mmseg configs: Semantic FPN 80k steps of AdamW lr 1e-4, weight decay 1e-4,
poly decay (power 0.9) towards 1e-4; UperNet 160k steps of AdamW lr 6e-5, weight decay 0.01 (none on
norms), 1500 warm-up steps, linear decay to 0. Batches of 2 on 8 GPUs; 512x512 crops.
"""

import sys

if __name__ == '__main__':  # first, before the libraries load: freed memory stays in the process (allocator.py)
    from allocator import keep_freed_memory

    keep_freed_memory()

from timm.scheduler import PolyLRScheduler

import models
from cli import (
    COUNT,
    NON_NEGATIVE,
    POSITIVE,
    ArgumentParser,
    add_dense_arguments,
    add_run_arguments,
    apply_recipe,
    run_cli,
    show_recipe_defaults,
)
from dense_datasets import IGNORE_INDEX, ADE20KSegmentation, check_img_scale
from engine_dense import adamw, evaluate_segmentation, layout_probe
from errors import UsageError
from model_factory import create_dense_model
from run import Run, Task, run_task

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
# What --eval and --resume take from the checkpoint unless given.
MODEL_FLAGS = ('task', 'model', 'model_kwargs', 'img_scale', 'num_classes', 'reduce_zero_label')


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser('main_seg.py', description='RAVLT semantic segmentation')
    training = add_run_arguments(parser, model='RAVLT_S', batch_size=2, num_workers=4, print_freq=50)
    add_dense_arguments(parser, training, list(RECIPES))
    training.add_argument('--train-split', default='training', help='DATA/images/SPLIT/, DATA/annotations/SPLIT/')
    parser.add_argument('--val-split', default='validation', help='as --train-split')
    parser.add_argument('--num-classes', type=COUNT, default=150)
    parser.add_argument(
        '--reduce-zero-label',
        action='store_true',
        help='label 0 is "other", ignored, and the classes are 1..N, as in ADE20K (default)',
    )
    parser.add_argument(
        '--no-reduce-zero-label',
        action='store_false',
        dest='reduce_zero_label',
        help='label files hold the classes from 0',
    )
    parser.set_defaults(reduce_zero_label=True)
    training.add_argument('--iters', type=COUNT, default=None, help='training steps')
    training.add_argument(
        '--eval-interval',
        type=COUNT,
        default=None,
        metavar='STEPS',
        help='evaluate after the epoch that passes each multiple of STEPS',
    )
    training.add_argument('--poly-power', type=POSITIVE, default=None)
    training.add_argument('--min-lr', type=NON_NEGATIVE, default=None)
    parser.add_argument(
        '--img-scale',
        type=COUNT,
        nargs=2,
        default=[2048, 512],
        metavar=('LONG', 'SHORT'),
        help='resize bound, as in mmseg configs: the long side at most LONG, the short side at most '
        'SHORT (training: times 0.5-2)',
    )
    training.add_argument('--crop-size', type=COUNT, default=512, help='training crop')
    show_recipe_defaults(parser, RECIPES)
    return parser


def check_args(args):
    """The flags together, once final (the checkpoint's --task taken): before any data or model is loaded."""
    apply_recipe(args, RECIPES)
    check_img_scale(args.img_scale)
    if args.num_classes >= IGNORE_INDEX:
        raise UsageError(f'--num-classes must be below {IGNORE_INDEX} (the ignored label), got {args.num_classes}')


def build_task(args, run: Run) -> Task:
    data = dict(
        num_classes=args.num_classes,
        img_scale=check_img_scale(args.img_scale),
        crop_size=args.crop_size,
        reduce_zero_label=args.reduce_zero_label,
    )
    dataset_val = ADE20KSegmentation(args.data_path, args.val_split, False, **data)
    dataset_train = None if args.eval else ADE20KSegmentation(args.data_path, args.train_split, True, **data)
    model = create_dense_model(
        args.task, args.model, args.num_classes, args.model_kwargs, args.drop_path, args.pretrained
    )

    def make_schedule(optimizer, steps_per_epoch):
        return PolyLRScheduler(
            optimizer,
            t_initial=args.iters,
            power=args.poly_power,
            lr_min=args.min_lr,
            warmup_t=args.warmup_iters,
            warmup_lr_init=args.lr * args.warmup_ratio,
            t_in_epochs=False,
        ), args.iters

    return Task(
        model=model,
        dataset_val=dataset_val,
        val_batch_size=1,
        evaluate=lambda model, loader: evaluate_segmentation(
            model, loader, args.num_classes, IGNORE_INDEX, run.precision(model), args.print_freq
        ),
        meta={'task': args.task, 'model': models.resolve_model_name(args.model), 'num_classes': args.num_classes},
        dataset_train=dataset_train,
        loss=lambda model, images, masks: model(images, masks),
        make_optimizer=lambda model: adamw(model, args.lr, args.weight_decay, NORM_NO_DECAY[args.task]),
        make_schedule=make_schedule,
        schedule_in_epochs=False,
        length_flag='--iters',
        warmup_flag='--warmup-iters',
        layout_probe=layout_probe,
        # after the epoch in which a multiple of --eval-interval steps was reached, and after the last
        evaluate_after=lambda before, after, total: (
            after // args.eval_interval > before // args.eval_interval or after == total
        ),
    )


def main(args):
    return run_task(get_args_parser(), args, MODEL_FLAGS, build_task, check_args)


def cli(argv=None):
    return main(get_args_parser().parse(argv))


if __name__ == '__main__':
    run_cli(cli, sys.argv[1:])
