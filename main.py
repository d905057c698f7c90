"""Train and evaluate RAVLT (or any timm model) on ImageNet, CIFAR-100, random images or DIGITS.

    python main.py --config configs/demo_digits.yaml --output_dir output/demo_digits
    torchrun --nproc_per_node=8 main.py --model RAVLT_S --data-path /path/to/imagenet --output_dir out
    python main.py --eval --resume RAVLT_S.pth --data-path /path/to/imagenet

Flags follow DeiT and the authors' script, whose recipe the defaults are; `--config FILE` reads a YAML file whose
keys are flag names (the command line overrides it). The run itself (processes, resuming, the epoch loop,
checkpoints, logs) is run.py's; this file holds what is particular to classification.
"""

import argparse
import functools

import torch
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import checkpoints
import cli
import engine
import utils
from cli import COUNT, FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, number_type
from datasets import DATA_SETS, build_dataset
from errors import UsageError
from model_factory import checkpoint_classes, create_model, model_from_checkpoint
from models import RAVLT_CONFIGS, resolve_model_name
from run import Run

# The flags that describe the model and its evaluation: --eval and --resume take them from the checkpoint.
MODEL_FLAGS = ('model', 'model_kwargs', 'input_size', 'data_set')


def get_args_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser('main.py', description='RAVLT training and evaluation')
    training = cli.add_common_arguments(parser, model='RAVLT_T', batch_size=64, num_workers=10, print_freq=10)
    optimizer = parser.add_argument_group('training: optimizer')
    schedule = parser.add_argument_group('training: learning-rate schedule')
    augmentation = parser.add_argument_group('training: augmentation (DIGITS has its own light crop-and-upscale)')
    mixing = parser.add_argument_group('training: label smoothing, mixup and cutmix')
    training.add_argument('--epochs', '--epoch', default=300, type=COUNT)
    parser.add_argument('--input-size', default=224, type=COUNT, help='image size (pixels, square)')
    training.add_argument('--drop', type=FRACTION, default=0.0, metavar='PCT', help='dropout before the classifier')
    parser.add_argument(
        '--model-ema',
        action=argparse.BooleanOptionalAction,
        default=True,
        help='keep an EMA of the weights; --eval reports it when the checkpoint has one',
    )
    training.add_argument(
        '--model-ema-decay',
        type=FRACTION,
        default=0.99996,
        help='EMA decay per step at a total batch of 512; used as decay ** (total batch / 512)',
    )
    training.add_argument('--model-ema-warmup', action='store_true', help="ramp the EMA decay up (timm's warm-up)")
    training.add_argument(
        '--model-ema-force-cpu',
        action='store_true',
        help="keep the EMA weights in host memory (evaluated on the run's device)",
    )

    optimizer.add_argument('--opt', default='adamw', metavar='OPTIMIZER', help='a timm optimizer name')
    optimizer.add_argument('--opt-eps', default=1e-8, type=POSITIVE, metavar='EPSILON')
    optimizer.add_argument(
        '--opt-betas',
        default=None,
        type=number_type(float, 0, 1, high_open=True),
        nargs='+',
        metavar='BETA',
        help="(default: the optimizer's own)",
    )
    optimizer.add_argument('--clip-grad', type=POSITIVE, default=None, metavar='NORM', help='clip the gradient norm')
    optimizer.add_argument('--momentum', type=FRACTION, default=0.9, metavar='M', help='SGD momentum')
    optimizer.add_argument('--weight-decay', type=NON_NEGATIVE, default=0.05)

    schedule.add_argument('--sched', default='cosine', metavar='SCHEDULER', help='a timm scheduler name')
    schedule.add_argument(
        '--lr',
        type=POSITIVE,
        default=5e-4,
        metavar='LR',
        help='learning rate per 512 images of total batch: the optimizer runs at LR x total batch / 512',
    )
    schedule.add_argument('--warmup-lr', type=NON_NEGATIVE, default=1e-6, metavar='LR')
    schedule.add_argument('--min-lr', type=NON_NEGATIVE, default=1e-5, metavar='LR')
    schedule.add_argument('--warmup-epochs', type=NON_NEGATIVE_INT, default=5, metavar='N')
    schedule.add_argument(
        '--sched-on-updates',
        action='store_true',
        help='step the schedule after every optimizer step, not once per epoch (short runs)',
    )
    schedule.add_argument(
        '--sched-after-epoch',
        action='store_true',
        help="step the schedule after each epoch, as the authors' loop does: epoch e >= 1 trains at lr(e - 1), "
        'epochs 0 and 1 at --warmup-lr (default: epoch e at lr(e))',
    )
    schedule.add_argument('--decay-epochs', type=POSITIVE, default=30, metavar='N', help='for the step scheduler')
    schedule.add_argument('--decay-rate', type=POSITIVE, default=0.1, metavar='RATE', help='for the step scheduler')

    augmentation.add_argument(
        '--hflip',
        type=FRACTION,
        default=0.5,
        metavar='PROB',
        help='horizontal flip probability (0 for images a flip changes: digits, text)',
    )
    augmentation.add_argument(
        '--color-jitter',
        type=NON_NEGATIVE,
        default=0.4,
        metavar='PCT',
        help='(timm leaves it out when RandAugment is on, as in the recipe)',
    )
    augmentation.add_argument(
        '--aa',
        default='rand-m9-mstd0.5-inc1',
        metavar='NAME',
        help='RandAugment / AutoAugment policy ("none" for none)',
    )
    augmentation.add_argument('--train-interpolation', default='bicubic', choices=['random', 'bilinear', 'bicubic'])
    augmentation.add_argument(
        '--repeated-aug', action=argparse.BooleanOptionalAction, default=True, help='repeated augmentation x3'
    )
    augmentation.add_argument('--reprob', type=FRACTION, default=0.25, metavar='PCT', help='random erasing probability')
    augmentation.add_argument(
        '--remode', default='pixel', choices=['const', 'rand', 'pixel'], help='random erasing mode'
    )
    augmentation.add_argument('--recount', type=COUNT, default=1, help='random erasing count')

    mixing.add_argument(
        '--smoothing', type=number_type(float, 0, 1, high_open=True), default=0.1, help='label smoothing'
    )
    mixing.add_argument('--mixup', type=NON_NEGATIVE, default=0.8, help='mixup alpha, on if > 0')
    mixing.add_argument('--cutmix', type=NON_NEGATIVE, default=1.0, help='cutmix alpha, on if > 0')
    mixing.add_argument(
        '--cutmix-minmax',
        type=FRACTION,
        nargs=2,
        default=None,
        metavar=('MIN', 'MAX'),
        help='cutmix min/max ratio; overrides alpha and turns cutmix on',
    )
    mixing.add_argument('--mixup-prob', type=FRACTION, default=1.0, help='probability of mixup or cutmix per batch')
    mixing.add_argument(
        '--mixup-switch-prob', type=FRACTION, default=0.5, help='probability of cutmix when both are on'
    )
    mixing.add_argument('--mixup-mode', default='batch', choices=['batch', 'pair', 'elem'])

    training.add_argument(
        '--finetune',
        default='',
        help='start from these weights, with their --model and '
        '--model-kwargs unless given (a new classifier if the class count differs)',
    )
    training.add_argument(
        '--start_epoch', default=0, type=NON_NEGATIVE_INT, metavar='N', help='first epoch when not resuming'
    )
    parser.add_argument('--dist-eval', action='store_true', help='split evaluation over the processes')
    parser.add_argument(
        '--data-set',
        default='IMNET',
        choices=DATA_SETS,
        help='IMNET: DATA/train/ and DATA/val/ class folders; CIFAR: DATA/cifar-100-python/',
    )
    training.add_argument(
        '--save-freq',
        default=10,
        type=NON_NEGATIVE_INT,
        metavar='N',
        help='keep backup{epoch}.pth every N epochs (0: never)',
    )
    return parser


def main(args):
    with Run(get_args_parser(), args, MODEL_FLAGS) as run:
        mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
        if not args.eval and mixup_active and args.batch_size % 2:
            raise UsageError(f'mixup/cutmix need an even --batch-size, got {args.batch_size} (or --mixup 0 --cutmix 0)')
        dataset_val, num_classes = build_dataset(is_train=False, args=args)
        if not args.eval:
            dataset_train, _ = build_dataset(is_train=True, args=args)
            if getattr(dataset_train, 'classes', None) != getattr(dataset_val, 'classes', None):
                train, val = set(dataset_train.classes), set(dataset_val.classes)
                raise UsageError(
                    'train/ and val/ must hold the same class folders: only in train/: '
                    f'{", ".join(sorted(train - val)[:5]) or "none"}; only in val/: '
                    f'{", ".join(sorted(val - train)[:5]) or "none"}'
                )

        own = RAVLT_CONFIGS.get(resolve_model_name(args.model), {}).get('drop_path_rate')
        if not (args.eval or args.finetune) and args.drop_path is not None and own not in (None, args.drop_path):
            print(
                f"note: --drop-path {args.drop_path} replaces {args.model}'s own {own} (the authors' run.sh passes "
                f'--drop-path 0.05, which their code ignores: their {args.model} trained at {own})'
            )
        create_kwargs = dict(
            drop_rate=args.drop, **({} if args.drop_path is None else {'drop_path_rate': args.drop_path})
        )
        if args.finetune and run.checkpoint is None:
            model = finetune_model(args, run, num_classes, create_kwargs)
        else:
            if args.finetune:
                print(f'--finetune {args.finetune} is not loaded: the run goes on from {run.resume_path}')
            print(f'Creating model: {args.model}')
            model = create_model(args.model, args.model_kwargs, num_classes=num_classes, **create_kwargs)

        meta = {'task': 'classification', 'classes': getattr(dataset_val, 'classes', None)}
        total_batch = args.batch_size * run.world_size
        ema = None
        if args.model_ema:  # the EMA horizon is kept in images: a step at batch B counts as B / 512 steps at 512
            decay = args.model_ema_decay ** (total_batch / 512.0)
            ema = dict(
                decay=decay, use_warmup=args.model_ema_warmup, device='cpu' if args.model_ema_force_cpu else None
            )
        probe = (model, torch.zeros(1, 3, args.input_size, args.input_size))
        model, model_ema = run.prepare(model, meta, ema=ema, probe=probe, train=not args.eval)
        evaluate = functools.partial(
            engine.evaluate, sharded=args.dist_eval and run.world_size > 1, print_freq=args.print_freq
        )
        loader_val = run.val_loader(dataset_val, args.batch_size, sharded=args.dist_eval)
        if args.eval:
            return run.evaluate(model, model_ema, loader_val, evaluate)

        if args.repeated_aug:  # x3, timm's sampler
            sampler_train = RepeatAugSampler(dataset_train, num_replicas=run.world_size, rank=args.rank, shuffle=True)
        else:
            sampler_train = torch.utils.data.DistributedSampler(
                dataset_train, num_replicas=run.world_size, rank=args.rank, shuffle=True, seed=args.seed, drop_last=True
            )
        loader_train = utils.data_loader(dataset_train, sampler_train, args.batch_size, args, drop_last=True)
        if len(loader_train) == 0:
            raise UsageError(
                f'the training set ({len(dataset_train)} images, {len(sampler_train)} per process) is '
                f'smaller than one batch of {args.batch_size}: lower --batch-size'
            )
        lr = args.lr * total_batch / 512.0
        print(f'Learning rate {lr:.3g}: --lr {args.lr:g} per 512 images x total batch {total_batch} / 512')
        try:
            optimizer = create_optimizer_v2(
                model,
                opt=args.opt,
                lr=lr,
                weight_decay=args.weight_decay,
                momentum=args.momentum,
                eps=args.opt_eps,
                **engine.optimizer_options(args.opt),
                **({'betas': tuple(args.opt_betas)} if args.opt_betas else {}),
            )
            lr_scheduler, _ = create_scheduler_v2(
                optimizer,
                sched=args.sched,
                num_epochs=args.epochs,
                decay_epochs=args.decay_epochs,
                decay_rate=args.decay_rate,
                min_lr=args.min_lr,
                warmup_lr=args.warmup_lr,
                warmup_epochs=args.warmup_epochs,
                step_on_epochs=not args.sched_on_updates,
                updates_per_epoch=len(loader_train),
            )
        except (ValueError, AssertionError) as e:  # an unknown --opt or --sched
            raise UsageError(f'--opt {args.opt} --sched {args.sched}: {e} (see timm.optim, timm.scheduler)') from None

        mixup_fn = None
        if mixup_active:  # mixup / cutmix smooth their soft targets themselves
            mixup_fn = Mixup(
                mixup_alpha=args.mixup,
                cutmix_alpha=args.cutmix,
                cutmix_minmax=args.cutmix_minmax,
                prob=args.mixup_prob,
                switch_prob=args.mixup_switch_prob,
                mode=args.mixup_mode,
                label_smoothing=args.smoothing,
                num_classes=num_classes,
            )
            criterion = SoftTargetCrossEntropy()
        elif args.smoothing > 0:
            criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
        else:
            criterion = torch.nn.CrossEntropyLoss()

        return run.train(
            model,
            model_ema,
            optimizer,
            lr_scheduler,
            loader_train,
            loader_val,
            evaluate,
            meta=meta,
            total_steps=args.epochs * len(loader_train),
            criterion=criterion,
            mixup_fn=mixup_fn,
            max_norm=args.clip_grad,
            best_metric='acc1',
            backup_every=args.save_freq,
            schedule_lag=int(args.sched_after_epoch),
        )


def finetune_model(args, run: Run, num_classes: int, create_kwargs: dict) -> torch.nn.Module:
    """The model --finetune starts from: the checkpoint's weights, built with its --model and --model-kwargs unless
    given (it says which it took; another --model takes none of its kwargs), with a new classifier when this data set
    has another class count."""
    source = f'--finetune {args.finetune}'
    checkpoint = checkpoints.load_checkpoint(args.finetune)
    flags = checkpoints.flags_of(checkpoint)
    name = args.model if 'model' in args.given else None
    if 'model_kwargs' in args.given:
        kwargs = args.model_kwargs or {}
    elif name is not None and resolve_model_name(name) != resolve_model_name(str(flags.get('model'))):
        kwargs = {}  # the checkpoint's kwargs belong to its own model
    else:
        kwargs = None
    model, name = model_from_checkpoint(checkpoint, source, name, kwargs, num_classes=num_classes, **create_kwargs)
    run.take_flags(source, {'model': name, 'model_kwargs': flags.get('model_kwargs') if kwargs is None else kwargs})
    theirs = checkpoint_classes(checkpoints.state_dict_of(checkpoint), model)
    if theirs is not None and theirs != num_classes:
        print(
            f"{source}: a new classifier for the {num_classes} classes of this data set (the checkpoint's has {theirs})"
        )
    print(f'Fine-tuning {name} from {args.finetune}')
    return model


if __name__ == '__main__':
    with cli.one_line_errors():
        main(get_args_parser().parse_args())
