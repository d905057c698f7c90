"""Train and evaluate RAVLT RetinaNet and Mask R-CNN (torchvision) on COCO-format data.

    torchrun --nproc_per_node=8 main_det.py --task maskrcnn --model RAVLT_S --pretrained RAVLT_S.pth \
        --data-path /path/to/coco --output_dir out/maskrcnn_s_1x
    python main_det.py --data-path /path/to/coco --eval --resume out/maskrcnn_s_1x/checkpoint.pth

Recipes follow the authors' mmdet configs (AdamW, 500 linear warm-up steps, x0.1 at epochs 8 and 11 of 12;
`--config configs/det_maskrcnn_3x.yaml` for 36 epochs with multi-scale training). The learning rate is for
a total batch of 16 (2 images on each of 8 GPUs) and is not rescaled.
"""

import sys

if __name__ == '__main__':  # first, before the libraries load: freed memory stays in the process (allocator.py)
    from allocator import keep_freed_memory

    keep_freed_memory()

from timm.scheduler import MultiStepLRScheduler

import models
from cli import (
    COUNT,
    ArgumentParser,
    add_dense_arguments,
    add_run_arguments,
    apply_recipe,
    run_cli,
    show_recipe_defaults,
)
from dense_datasets import CocoInstances, check_img_scale, check_same_categories, collate_lists
from engine_dense import adamw, evaluate_coco, layout_probe
from errors import UsageError
from model_factory import create_dense_model
from run import Run, Task, run_task

RECIPES = {
    'retinanet': dict(lr=1e-4, weight_decay=1e-4, epochs=12, lr_steps=[8, 11], warmup_iters=500, warmup_ratio=1e-3),
    'maskrcnn': dict(lr=1e-4, weight_decay=0.05, epochs=12, lr_steps=[8, 11], warmup_iters=500, warmup_ratio=1e-3),
}
NORM_NO_DECAY = {'retinanet': False, 'maskrcnn': True}  # mmcv paramwise_cfg custom_keys 'norm'
FIRST_LABEL = {'retinanet': 0, 'maskrcnn': 1}  # torchvision's Mask R-CNN keeps label 0 for the background
# What --eval and --resume take from the checkpoint unless given.
MODEL_FLAGS = ('task', 'model', 'model_kwargs', 'img_scale')


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser('main_det.py', description='RAVLT detection and instance segmentation')
    training = add_run_arguments(parser, model='RAVLT_S', batch_size=2, num_workers=4, print_freq=50)
    add_dense_arguments(parser, training, list(RECIPES))
    training.add_argument(
        '--train-split', default='train2017', help='DATA/annotations/instances_SPLIT.json, DATA/SPLIT/'
    )
    parser.add_argument('--val-split', default='val2017', help='as --train-split')
    training.add_argument('--epochs', type=COUNT, default=None)
    training.add_argument(
        '--lr-steps',
        type=COUNT,
        nargs='+',
        default=None,
        metavar='EPOCH',
        help='epochs after which the learning rate drops x0.1',
    )
    parser.add_argument(
        '--img-scale',
        type=COUNT,
        nargs=2,
        default=[1333, 800],
        metavar=('LONG', 'SHORT'),
        help='resize bound, as in mmdet configs: the long side at most LONG, the short side SHORT',
    )
    training.add_argument(
        '--multiscale',
        action='store_true',
        help='train with the short side drawn from 0.6-1.0 x SHORT in steps of SHORT/25 (480-800, '
        "the authors' 3x recipe)",
    )
    show_recipe_defaults(parser, RECIPES)
    return parser


def check_args(args):
    """The flags together, once final (the checkpoint's --task taken): before any data or model is loaded."""
    apply_recipe(args, RECIPES)
    check_img_scale(args.img_scale)
    if not args.eval and max(args.lr_steps) > args.epochs:
        raise UsageError(
            f'--lr-steps {" ".join(map(str, args.lr_steps))} go beyond --epochs {args.epochs}: give '
            'steps within the epochs'
        )


def build_task(args, run: Run) -> Task:
    long, short = check_img_scale(args.img_scale)
    with_masks = args.task == 'maskrcnn'
    dataset_val = CocoInstances(args.data_path, args.val_split, False, with_masks, FIRST_LABEL[args.task])
    dataset_train = None
    if not args.eval:
        dataset_train = CocoInstances(args.data_path, args.train_split, True, with_masks, FIRST_LABEL[args.task])
        check_same_categories(dataset_train, dataset_val)
    min_size = tuple(short * k // 25 for k in range(15, 26)) if args.multiscale else short
    model = create_dense_model(
        args.task,
        args.model,
        dataset_val.num_classes,
        args.model_kwargs,
        args.drop_path,
        args.pretrained,
        min_size=min_size,
        max_size=long,
    )
    iou_types = ('bbox', 'segm') if with_masks else ('bbox',)

    def make_schedule(optimizer, steps_per_epoch):
        return MultiStepLRScheduler(
            optimizer,
            decay_t=[e * steps_per_epoch for e in args.lr_steps],
            decay_rate=0.1,
            warmup_t=args.warmup_iters,
            warmup_lr_init=args.lr * args.warmup_ratio,
            warmup_prefix=False,
            t_in_epochs=False,
        ), args.epochs * steps_per_epoch

    return Task(
        model=model,
        dataset_val=dataset_val,
        val_batch_size=1,
        collate_fn=collate_lists,
        evaluate=lambda model, loader: evaluate_coco(
            model, loader, dataset_val, iou_types, run.precision(model), args.print_freq
        ),
        meta={'task': args.task, 'model': models.resolve_model_name(args.model), 'classes': dataset_val.category_names},
        dataset_train=dataset_train,
        loss=lambda model, images, targets: model(images, targets),
        make_optimizer=lambda model: adamw(model, args.lr, args.weight_decay, NORM_NO_DECAY[args.task]),
        make_schedule=make_schedule,
        warmup_flag='--warmup-iters',
        layout_probe=layout_probe,
    )


def main(args):
    return run_task(get_args_parser(), args, MODEL_FLAGS, build_task, check_args)


def cli(argv=None):
    return main(get_args_parser().parse(argv))


if __name__ == '__main__':
    run_cli(cli, sys.argv[1:])
