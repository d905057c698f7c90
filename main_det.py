"""Train and evaluate RAVLT RetinaNet and Mask R-CNN (torchvision) on COCO-format data.

    torchrun --nproc_per_node=8 main_det.py --task maskrcnn --model RAVLT_S --pretrained RAVLT_S.pth \
        --data-path /path/to/coco --output_dir out/maskrcnn_s_1x
    python main_det.py --task maskrcnn --model RAVLT_S --data-path /path/to/coco --eval --resume out/.../checkpoint.pth

Recipes follow the authors' mmdet configs (AdamW, 500 linear warm-up steps, x0.1 at epochs 8 and 11 of 12;
`--config configs/det_maskrcnn_3x.yaml` for 36 epochs with multi-scale training). The learning rate is for
a total batch of 16 (2 images on each of 8 GPUs) and is not rescaled.
"""
import sys

from timm.scheduler import MultiStepLRScheduler

import models
import utils
from dense_datasets import CocoInstances, check_same_categories, collate_lists
from engine_dense import build_model, evaluate_coco, get_common_args_parser, parse_args, run, setup

RECIPES = {
    'retinanet': dict(lr=1e-4, weight_decay=1e-4, epochs=12, lr_steps=[8, 11], warmup_iters=500, warmup_ratio=1e-3),
    'maskrcnn': dict(lr=1e-4, weight_decay=0.05, epochs=12, lr_steps=[8, 11], warmup_iters=500, warmup_ratio=1e-3),
}
NORM_NO_DECAY = {'retinanet': False, 'maskrcnn': True}  # mmcv paramwise_cfg custom_keys 'norm'
FIRST_LABEL = {'retinanet': 0, 'maskrcnn': 1}  # torchvision's Mask R-CNN keeps label 0 for the background


def get_args_parser():
    parser = get_common_args_parser('main_det.py', 'RAVLT detection and instance segmentation', list(RECIPES))
    parser.add_argument('--train-split', default='train2017', help='DATA/annotations/instances_SPLIT.json, DATA/SPLIT/')
    parser.add_argument('--val-split', default='val2017')
    parser.add_argument('--epochs', type=int, default=None, help='default 12')
    parser.add_argument('--lr-steps', type=int, nargs='+', default=None, metavar='EPOCH',
                        help='epochs after which the learning rate drops x0.1 (default 8 11)')
    parser.add_argument('--img-scale', type=int, nargs=2, default=[800, 1333], metavar=('SHORT', 'LONG'),
                        help='resize so the short side is SHORT and the long side at most LONG')
    parser.add_argument('--multiscale', action='store_true',
                        help='train with the short side drawn from 0.6-1.0 x SHORT in steps of SHORT/25 '
                        '(480-800, the authors\' 3x recipe)')
    return parser


def main(args):
    amp_dtype = setup(args)
    with_masks = args.task == 'maskrcnn'
    dataset_val = CocoInstances(args.data_path, args.val_split, False, with_masks, FIRST_LABEL[args.task])
    dataset_train = None
    if not args.eval:
        dataset_train = CocoInstances(args.data_path, args.train_split, True, with_masks, FIRST_LABEL[args.task])
        check_same_categories(dataset_train, dataset_val)
    short, long = args.img_scale
    min_size = tuple(short * k // 25 for k in range(15, 26)) if args.multiscale else short
    model = build_model(args, dataset_val.num_classes, min_size=min_size, max_size=long)
    meta = {'task': args.task, 'model': models.resolve_model_name(args.model), 'classes': dataset_val.category_names}
    iou_types = ('bbox', 'segm') if with_masks else ('bbox',)

    def evaluate(model, data_loader):
        return evaluate_coco(model, data_loader, dataset_val, iou_types, args.device, amp_dtype, args.print_freq)

    def make_scheduler(optimizer, steps_per_epoch, total_steps):
        return MultiStepLRScheduler(optimizer, decay_t=[e * steps_per_epoch for e in args.lr_steps], decay_rate=0.1,
                                    warmup_t=args.warmup_iters, warmup_lr_init=args.lr * args.warmup_ratio,
                                    warmup_prefix=False, t_in_epochs=False)

    return run(args, model, meta, dataset_train, dataset_val, collate_lists, 1, evaluate,
               lambda steps_per_epoch: args.epochs * steps_per_epoch, make_scheduler, NORM_NO_DECAY[args.task])


def cli(argv=None):
    return main(parse_args(get_args_parser(), RECIPES, argv))


if __name__ == '__main__':
    utils.run_cli(cli, sys.argv[1:])
