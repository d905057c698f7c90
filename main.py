"""Train and evaluate RAVLT (or any timm model) on ImageNet, CIFAR-100, random images or DIGITS.

    python main.py --config configs/demo_digits.yaml --output_dir output/demo_digits
    torchrun --nproc_per_node=8 main.py --model RAVLT_S --data-path /path/to/imagenet --output_dir out
    python main.py --eval --resume RAVLT_S.pth --data-path /path/to/imagenet

Flags follow DeiT and the authors' script, whose recipe the defaults are; `--config FILE` reads a YAML file
whose keys are flag names (the command line overrides it). This file holds what is particular to
classification (flags, data, model, loss); the run itself (processes, resuming, checkpoints, logs) is run.py's.
"""

import sys

if __name__ == '__main__':  # first, before the libraries load: freed memory stays in the process (allocator.py)
    from allocator import keep_freed_memory

    keep_freed_memory()

import torch
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import checkpoints
import engine
from cli import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    ArgumentParser,
    add_run_arguments,
    number_type,
    run_cli,
)
from datasets import DATA_SETS, build_dataset
from errors import UsageError
from model_factory import checkpoint_classes, create_model, model_from_checkpoint
from run import Run, Task, report_taken, run_task

# The flags that describe the model and its evaluation: --eval and --resume take them from the checkpoint
# unless given.
MODEL_FLAGS = ('model', 'model_kwargs', 'input_size', 'data_set')


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser('main.py', description='RAVLT training and evaluation')
    training = add_run_arguments(parser, model='RAVLT_T', batch_size=64, num_workers=10, print_freq=10)
    optimizer = parser.add_training_group('training: optimizer')
    schedule = parser.add_training_group('training: learning-rate schedule')
    augmentation = parser.add_training_group(
        'training: augmentation (ignored by DIGITS, which has its own light crop-and-upscale)'
    )
    mixing = parser.add_training_group('training: label smoothing, mixup and cutmix')
    training.add_argument('--epochs', '--epoch', default=300, type=COUNT)
    parser.add_argument('--input-size', default=224, type=COUNT, help='image size (pixels, square)')
    training.add_argument('--drop', type=FRACTION, default=0.0, metavar='PCT', help='dropout before the classifier')
    parser.add_argument(
        '--model-ema',
        action='store_true',
        help='keep an EMA of the weights; --eval reports it when the checkpoint has one (default)',
    )
    parser.add_argument('--no-model-ema', action='store_false', dest='model_ema', help='no EMA of the weights')
    parser.set_defaults(model_ema=True)
    training.add_argument(
        '--model-ema-decay',
        type=FRACTION,
        default=0.99996,
        help='EMA decay per step at a total batch of 512; used as decay ** (total batch / 512)',
    )
    training.add_argument(
        '--model-ema-warmup',
        action='store_true',
        help="ramp the EMA decay up as 1 - (1 + step) ** -2/3 (timm's warm-up; for short runs)",
    )
    parser.add_argument(
        '--model-ema-force-cpu', action='store_true', help='keep the EMA weights on the CPU (and evaluate them there)'
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
    optimizer.add_argument(
        '--clip-grad', type=POSITIVE, default=None, metavar='NORM', help='clip the gradient norm (default: no clipping)'
    )
    optimizer.add_argument('--momentum', type=FRACTION, default=0.9, metavar='M', help='SGD momentum')
    optimizer.add_argument('--weight-decay', type=NON_NEGATIVE, default=0.05)

    schedule.add_argument('--sched', default='cosine', metavar='SCHEDULER', help='a timm scheduler name')
    schedule.add_argument(
        '--lr',
        type=POSITIVE,
        default=5e-4,
        metavar='LR',
        help='learning rate per 512 images of total batch (--batch-size x processes): the '
        'optimizer runs at LR x total batch / 512',
    )
    schedule.add_argument(
        '--warmup-lr', type=NON_NEGATIVE, default=1e-6, metavar='LR', help='where the linear warm-up starts'
    )
    schedule.add_argument('--min-lr', type=NON_NEGATIVE, default=1e-5, metavar='LR', help='where the decay ends')
    schedule.add_argument('--warmup-epochs', type=NON_NEGATIVE_INT, default=5, metavar='N')
    schedule.add_argument(
        '--sched-on-updates',
        action='store_true',
        help='update the learning rate after every step (warm-up and decay), not once per epoch '
        'at its start; for short runs, whose first epoch would otherwise run at --warmup-lr',
    )
    schedule.add_argument('--decay-epochs', type=POSITIVE, default=30, metavar='N', help='for the step scheduler')
    schedule.add_argument('--decay-rate', type=POSITIVE, default=0.1, metavar='RATE', help='for the step scheduler')

    augmentation.add_argument(
        '--hflip',
        type=FRACTION,
        default=0.5,
        metavar='PROB',
        help='probability of a horizontal flip (0 for images a flip changes the meaning of: digits, text)',
    )
    augmentation.add_argument('--color-jitter', type=NON_NEGATIVE, default=0.4, metavar='PCT')
    augmentation.add_argument(
        '--aa',
        default='rand-m9-mstd0.5-inc1',
        metavar='NAME',
        help='RandAugment / AutoAugment policy ("none" for none)',
    )
    augmentation.add_argument('--train-interpolation', default='bicubic', choices=['random', 'bilinear', 'bicubic'])
    augmentation.add_argument('--repeated-aug', action='store_true', help='repeated augmentation x3 (default)')
    augmentation.add_argument(
        '--no-repeated-aug', action='store_false', dest='repeated_aug', help='no repeated augmentation'
    )
    parser.set_defaults(repeated_aug=True)
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
        '--mixup-switch-prob',
        type=FRACTION,
        default=0.5,
        help='probability of cutmix rather than mixup when both are on',
    )
    mixing.add_argument('--mixup-mode', default='batch', choices=['batch', 'pair', 'elem'])

    # Weights, data, outputs
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
    parser.add_argument('--pin-mem', action='store_true', help='pin host memory on CUDA (default)')
    parser.add_argument('--no-pin-mem', action='store_false', dest='pin_mem', help='do not pin host memory')
    parser.set_defaults(pin_mem=True)
    training.add_argument(
        '--save-freq',
        default=10,
        type=NON_NEGATIVE_INT,
        metavar='N',
        help='keep backup{epoch}.pth every N epochs (0: never)',
    )
    return parser


def mixup_active(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def check_args(args):
    """What no single flag's check sees."""
    if not args.eval and mixup_active(args) and args.batch_size % 2:
        raise UsageError(
            f'mixup/cutmix need an even --batch-size, got {args.batch_size} (or pass --mixup 0 --cutmix 0)'
        )


def finetune_model(args, checkpoint: dict, num_classes: int, parser=None, **create_kwargs) -> torch.nn.Module:
    """The model --finetune starts from: the checkpoint's weights, built with its --model and --model-kwargs
    unless given (it says which it took), with a new classifier when this data set has another class count."""
    source = f'--finetune {args.finetune}'
    given_kwargs = 'model_kwargs' in args.given
    model, name = model_from_checkpoint(
        checkpoint,
        source,
        model_name=args.model if 'model' in args.given else None,
        model_kwargs=args.model_kwargs if given_kwargs else None,
        default_name=args.model,
        num_classes=num_classes,
        parser=parser,
        **create_kwargs,
    )
    kwargs = args.model_kwargs if given_kwargs else checkpoints.flags_of(checkpoint).get('model_kwargs')
    report_taken(source, {'model': name, 'model_kwargs': kwargs}, args)
    theirs = checkpoint_classes(checkpoints.state_dict_of(checkpoint), model)
    if theirs is not None and theirs != num_classes:
        print(
            f"{source}: a new classifier for the {num_classes} classes of this data set (the checkpoint's has {theirs})"
        )
    print(f'Fine-tuning {name} from {args.finetune}')
    return model


def check_model_fits(model: torch.nn.Module, args):
    """What the model's own checks would find only at the first step: training BatchNorm layers that would see
    one value per channel (--batch-size 1 with a 1x1 map at the model's deepest stage, the stride of timm's
    feature_info)."""
    info = getattr(model, 'feature_info', None)
    reduction = info[-1].get('reduction') if isinstance(info, list) and info and isinstance(info[-1], dict) else None
    has_batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not args.eval and reduction and has_batch_norm and args.batch_size == 1 and args.input_size <= reduction:
        raise UsageError(
            f'--batch-size 1 at --input-size {args.input_size}: the BatchNorm layers of the last stage '
            f'(stride {reduction}) would see one value per channel, which training cannot normalize; use '
            f'--batch-size 2 or more, or --input-size {reduction + 1} or more'
        )


def build_loss(args, num_classes: int):
    """loss(model, images, targets) -> {'loss': ...}: mixup / cutmix (which smooth their soft targets) or
    label smoothing, then cross-entropy."""
    mixup_fn = None
    if mixup_active(args):
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

    def loss(model, images, targets):
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        return {'loss': criterion(model(images), targets)}

    return loss


def build_task(args, run: Run) -> Task:
    finetune = None
    if args.finetune and run.checkpoint is None:
        finetune = checkpoints.load_checkpoint(args.finetune)
    elif args.finetune:
        print(f'--finetune {args.finetune} is not loaded: the run goes on from {run.resume_path}')
    dataset_val, num_classes = build_dataset(is_train=False, args=args)
    dataset_train = None
    if not args.eval:
        dataset_train, num_train_classes = build_dataset(is_train=True, args=args)
        if getattr(dataset_train, 'classes', None) != getattr(dataset_val, 'classes', None):
            raise UsageError(
                f'train/ and val/ must hold the same class folders: train has {num_train_classes} '
                f'({", ".join(dataset_train.classes[:3])} ...), val {num_classes} '
                f'({", ".join(dataset_val.classes[:3])} ...)'
            )
    if isinstance(args.model_kwargs, dict) and args.model_kwargs.get('global_pool') == '':
        raise UsageError(
            '--model-kwargs: global_pool "" gives a prediction per position, not per image; main.py '
            'trains and evaluates pooled classifiers (leave global_pool out, or give e.g. "avg")'
        )
    create_kwargs = dict(drop_rate=args.drop, **({} if args.drop_path is None else {'drop_path_rate': args.drop_path}))
    if finetune is not None:
        model = finetune_model(args, finetune, num_classes, run.parser, **create_kwargs)
    else:
        print(f'Creating model: {args.model}')
        model = create_model(args.model, args.model_kwargs, num_classes=num_classes, **create_kwargs)
    check_model_fits(model, args)

    total_batch = args.batch_size * run.world_size
    # The EMA horizon is kept constant in images: one step at batch B counts as B / 512 steps at 512.
    ema_decay = args.model_ema_decay ** (total_batch / 512.0)
    if args.model_ema and not args.eval:
        print(f'EMA decay per step: {ema_decay:.8f}')
    lr = args.lr * total_batch / 512.0
    if not args.eval:
        print(f'Learning rate {lr:.3g}: --lr {args.lr:g} per 512 images x total batch {total_batch} / 512')

    def make_optimizer(model):
        try:
            return create_optimizer_v2(
                model,
                opt=args.opt,
                lr=lr,
                weight_decay=args.weight_decay,
                momentum=args.momentum,
                eps=args.opt_eps,
                **engine.optimizer_options(args.opt),
                **({'betas': tuple(args.opt_betas)} if args.opt_betas else {}),
            )
        except ValueError as e:  # an unknown --opt
            raise UsageError(f'{e} (--opt {args.opt}: see timm.optim.list_optimizers())') from None

    def make_schedule(optimizer, steps_per_epoch):
        try:
            scheduler, _ = create_scheduler_v2(
                optimizer,
                sched=args.sched,
                num_epochs=args.epochs,
                decay_epochs=args.decay_epochs,
                decay_rate=args.decay_rate,
                min_lr=args.min_lr,
                warmup_lr=args.warmup_lr,
                warmup_epochs=args.warmup_epochs,
                step_on_epochs=not args.sched_on_updates,
                updates_per_epoch=steps_per_epoch,
            )
        except (ValueError, AssertionError) as e:
            raise UsageError(f'--sched {args.sched}: {e} (see timm.scheduler)') from None
        return scheduler, args.epochs * steps_per_epoch

    def train_sampler(dataset, world_size, rank):
        if args.repeated_aug:  # x3, timm's sampler
            return RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True)
        return torch.utils.data.DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed, drop_last=True
        )

    def evaluate(model, loader):
        return engine.evaluate(
            loader,
            model,
            run.precision(model),
            sharded=args.dist_eval and run.world_size > 1,
            print_freq=args.print_freq,
        )

    return Task(
        model=model,
        dataset_val=dataset_val,
        evaluate=evaluate,
        meta={'task': 'classification'},
        val_batch_size=args.batch_size,
        shard_val=args.dist_eval,
        dataset_train=dataset_train,
        train_sampler=train_sampler,
        loss=build_loss(args, num_classes),
        make_optimizer=make_optimizer,
        make_schedule=make_schedule,
        best_metric='acc1',
        max_norm=args.clip_grad,
        backup_every=args.save_freq,
        fixed_input_size=True,
        layout_probe=lambda model: (model, torch.zeros(1, 3, args.input_size, args.input_size)),
        ema=dict(
            decay=ema_decay,
            use_warmup=args.model_ema_warmup,
            device=torch.device('cpu') if args.model_ema_force_cpu else None,
        )
        if args.model_ema
        else None,
    )


def main(args):
    return run_task(get_args_parser(), args, MODEL_FLAGS, build_task, check_args)


def cli(argv=None):
    return main(get_args_parser().parse(argv))


if __name__ == '__main__':
    run_cli(cli, sys.argv[1:])
