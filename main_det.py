"""Train and evaluate RAVLT RetinaNet and Mask R-CNN (torchvision) on COCO-format data.

    torchrun --nproc_per_node=8 main_det.py --task maskrcnn --model RAVLT_S --pretrained RAVLT_S.pth \
        --data-path /path/to/coco --output_dir out/maskrcnn_s_1x
    python main_det.py --data-path /path/to/coco --eval --resume out/maskrcnn_s_1x/checkpoint.pth

Recipes follow the authors' mmdet configs (AdamW, 500 linear warm-up steps, x0.1 at epochs 8 and 11 of 12;
`--config configs/det_maskrcnn_3x.yaml` for 36 epochs with multi-scale training). The learning rate is for a total
batch of 16 (2 images on each of 8 GPUs) and is not rescaled.
"""

import argparse
import functools

import torch
from timm.scheduler import MultiStepLRScheduler

import cli
import models
import utils
from datasets_dense import CocoInstances, check_same_categories, collate_lists
from engine_dense import adamw, add_dense_arguments, apply_recipe, check_img_scale, evaluate_coco, show_recipe_defaults
from errors import UsageError
from model_factory import create_dense_model
from models.dense import dense_backbone
from run import Run

RECIPES = {
    'retinanet': dict(lr=1e-4, weight_decay=1e-4, epochs=12, lr_steps=[8, 11], warmup_iters=500, warmup_ratio=1e-3),
    'maskrcnn': dict(lr=1e-4, weight_decay=0.05, epochs=12, lr_steps=[8, 11], warmup_iters=500, warmup_ratio=1e-3),
}
NORM_NO_DECAY = {'retinanet': False, 'maskrcnn': True}  # mmcv paramwise_cfg custom_keys 'norm'
FIRST_LABEL = {'retinanet': 0, 'maskrcnn': 1}  # torchvision's Mask R-CNN keeps label 0 for the background
MODEL_FLAGS = ('task', 'model', 'model_kwargs', 'img_scale')  # what --eval and --resume take from the checkpoint


def get_args_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser('main_det.py', description='RAVLT detection and instance segmentation')
    training = cli.add_common_arguments(parser, model='RAVLT_S', batch_size=2, num_workers=4, print_freq=50)
    add_dense_arguments(parser, training, RECIPES)
    training.add_argument(
        '--train-split', default='train2017', help='DATA/annotations/instances_SPLIT.json, DATA/SPLIT/'
    )
    parser.add_argument('--val-split', default='val2017', help='as --train-split')
    training.add_argument('--epochs', type=cli.COUNT, default=None)
    training.add_argument(
        '--lr-steps',
        type=cli.COUNT,
        nargs='+',
        default=None,
        metavar='EPOCH',
        help='epochs after which the learning rate drops x0.1',
    )
    parser.add_argument(
        '--img-scale',
        type=cli.COUNT,
        nargs=2,
        default=[1333, 800],
        metavar=('LONG', 'SHORT'),
        help='resize bound, as in mmdet configs: the long side at most LONG, the short side SHORT',
    )
    training.add_argument(
        '--multiscale',
        action=argparse.BooleanOptionalAction,
        default=False,
        help="short side drawn from 0.6-1.0 x SHORT in steps of SHORT/25 (the authors' 3x recipe)",
    )
    show_recipe_defaults(parser, RECIPES)
    return parser


def main(args):
    with Run(get_args_parser(), args, MODEL_FLAGS) as run:
        apply_recipe(args, RECIPES)
        long, short = check_img_scale(args.img_scale)
        if not args.eval and max(args.lr_steps) > args.epochs:
            raise UsageError(f'--lr-steps {" ".join(map(str, args.lr_steps))} go beyond --epochs {args.epochs}')
        with_masks, first_label = args.task == 'maskrcnn', FIRST_LABEL[args.task]
        dataset_val = CocoInstances(args.data_path, args.val_split, False, with_masks, first_label)
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
        meta = {
            'task': args.task,
            'model': models.resolve_model_name(args.model),
            'classes': dataset_val.category_names,
        }
        probe = (dense_backbone(model), torch.zeros(1, 3, 64, 64))
        model, _ = run.prepare(model, meta, probe=probe, train=not args.eval)
        iou_types = ('bbox', 'segm') if with_masks else ('bbox',)
        evaluate = functools.partial(
            evaluate_coco, dataset=dataset_val, iou_types=iou_types, print_freq=args.print_freq
        )
        loader_val = run.val_loader(dataset_val, 1, sharded=True, collate_fn=collate_lists)
        if args.eval:
            return run.evaluate(model, None, loader_val, evaluate)

        dataset_train = CocoInstances(args.data_path, args.train_split, True, with_masks, first_label)
        check_same_categories(dataset_train, dataset_val)
        sampler = torch.utils.data.DistributedSampler(
            dataset_train, run.world_size, args.rank, seed=args.seed, drop_last=True
        )
        loader_train = utils.data_loader(dataset_train, sampler, args.batch_size, args, collate_lists, drop_last=True)
        optimizer = adamw(model, args.lr, args.weight_decay, NORM_NO_DECAY[args.task])
        steps_per_epoch = len(loader_train)
        lr_scheduler = MultiStepLRScheduler(
            optimizer,
            decay_t=[e * steps_per_epoch for e in args.lr_steps],
            decay_rate=0.1,
            warmup_t=args.warmup_iters,
            warmup_lr_init=args.lr * args.warmup_ratio,
            warmup_prefix=False,
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
            total_steps=args.epochs * steps_per_epoch,
        )


if __name__ == '__main__':
    with cli.one_line_errors():
        main(get_args_parser().parse_args())
