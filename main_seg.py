"""Train and evaluate RAVLT Semantic FPN and UperNet (segmentation_models_pytorch decoders) on
ADE20K-format data.

    torchrun --nproc_per_node=8 main_seg.py --task semfpn --model RAVLT_S --pretrained RAVLT_S.pth \
        --data-path /path/to/ADEChallengeData2016 --output_dir out/semfpn_s
    python main_seg.py --task semfpn --model RAVLT_S --data-path /path/to/ADEChallengeData2016 --eval \
        --resume out/semfpn_s/checkpoint.pth

Recipes follow the authors' mmseg configs: Semantic FPN 80k steps of AdamW lr 1e-4, weight decay 1e-4,
poly decay (power 0.9) towards 1e-4; UperNet 160k steps of AdamW lr 6e-5, weight decay 0.01 (none on
norms), 1500 warm-up steps, linear decay to 0. Batches of 2 on 8 GPUs; 512x512 crops.
"""
import sys

from timm.scheduler import PolyLRScheduler

import models
import utils
from dense_datasets import IGNORE_INDEX, ADE20KSegmentation
from engine_dense import build_model, evaluate_segmentation, get_common_args_parser, parse_args, run, setup

RECIPES = {
    'semfpn': dict(lr=1e-4, weight_decay=1e-4, iters=80000, eval_interval=4000, warmup_iters=0, warmup_ratio=1.0,
                   poly_power=0.9, min_lr=1e-4),
    'upernet': dict(lr=6e-5, weight_decay=0.01, iters=160000, eval_interval=8000, warmup_iters=1500,
                    warmup_ratio=1e-6, poly_power=1.0, min_lr=0.0),
}
NORM_NO_DECAY = {'semfpn': False, 'upernet': True}  # mmcv paramwise_cfg custom_keys 'norm'


def get_args_parser():
    parser = get_common_args_parser('main_seg.py', 'RAVLT semantic segmentation', list(RECIPES))
    parser.add_argument('--train-split', default='training', help='DATA/images/SPLIT/, DATA/annotations/SPLIT/')
    parser.add_argument('--val-split', default='validation')
    parser.add_argument('--num-classes', type=int, default=150)
    parser.add_argument('--no-reduce-zero-label', action='store_false', dest='reduce_zero_label',
                        help='label files hold the classes from 0 (default: 0 is "other", ignored, as in ADE20K)')
    parser.add_argument('--iters', type=int, default=None, help='training steps (default: 80k Semantic FPN, '
                        '160k UperNet)')
    parser.add_argument('--eval-interval', type=int, default=None, metavar='STEPS',
                        help='evaluate after the epoch that passes each multiple of STEPS (default 4000 / 8000)')
    parser.add_argument('--poly-power', type=float, default=None)
    parser.add_argument('--min-lr', type=float, default=None)
    parser.add_argument('--img-scale', type=int, nargs=2, default=[2048, 512], metavar=('LONG', 'SHORT'),
                        help='resize to fit LONG x SHORT (training: times 0.5-2)')
    parser.add_argument('--crop-size', type=int, default=512, help='training crop')
    return parser


def main(args):
    amp_dtype = setup(args)
    if args.num_classes < 1 or args.num_classes >= IGNORE_INDEX:
        raise utils.UsageError(f'--num-classes must be between 1 and {IGNORE_INDEX - 1}, got {args.num_classes}')
    data = dict(num_classes=args.num_classes, img_scale=tuple(args.img_scale), crop_size=args.crop_size,
                reduce_zero_label=args.reduce_zero_label)
    dataset_val = ADE20KSegmentation(args.data_path, args.val_split, False, **data)
    dataset_train = None if args.eval else ADE20KSegmentation(args.data_path, args.train_split, True, **data)
    model = build_model(args, args.num_classes)
    meta = {'task': args.task, 'model': models.resolve_model_name(args.model), 'num_classes': args.num_classes}

    def evaluate(model, data_loader):
        return evaluate_segmentation(model, data_loader, args.num_classes, IGNORE_INDEX, args.device, amp_dtype,
                                     args.print_freq)

    def make_scheduler(optimizer, steps_per_epoch, total_steps):
        return PolyLRScheduler(optimizer, t_initial=total_steps, power=args.poly_power, lr_min=args.min_lr,
                               warmup_t=args.warmup_iters, warmup_lr_init=args.lr * args.warmup_ratio,
                               t_in_epochs=False)

    return run(args, model, meta, dataset_train, dataset_val, None, 1, evaluate, lambda steps_per_epoch: args.iters,
               make_scheduler, NORM_NO_DECAY[args.task], eval_interval=args.eval_interval)


def cli(argv=None):
    return main(parse_args(get_args_parser(), RECIPES, argv))


if __name__ == '__main__':
    utils.run_cli(cli, sys.argv[1:])
