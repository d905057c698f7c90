"""Train and evaluate RAVLT (or any timm model) on ImageNet, CIFAR-100, random images or DIGITS.

    python main.py --config configs/demo_digits.yaml --output_dir output/demo_digits
    torchrun --nproc_per_node=8 main.py --model RAVLT_S --data-path /path/to/imagenet --output_dir out
    python main.py --eval --resume RAVLT_S.pth --model RAVLT_S --data-path /path/to/imagenet

Flags follow DeiT and the authors' script; `--config FILE` reads a YAML file whose keys are flag names
(the command line overrides it); training writes the resolved config to the output folder.
"""
import argparse
import datetime
import difflib
import json
import os
import random
import sys
import time

import numpy as np
import timm
import torch
import yaml
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.tensorboard import SummaryWriter

import models
import utils
from datasets import DATA_SETS, build_dataset
from engine import evaluate, train_one_epoch
from utils import UsageError

AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def json_object(text: str) -> dict:
    """argparse type for --model-kwargs."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f'not valid JSON ({e})') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object such as \'{"depths": [1, 1, 2, 1]}\'')
    return value


def get_args_parser():
    parser = argparse.ArgumentParser('RAVLT training and evaluation', add_help=False)
    parser.add_argument('--config', default='', help='YAML file of flag values (keys are flag names, e.g. '
                        'batch-size); flags on the command line override it')
    parser.add_argument('--batch-size', default=64, type=int, help='images per process and step')
    parser.add_argument('--epochs', '--epoch', default=300, type=int)

    # Model
    parser.add_argument('--model', default='RAVLT_T', type=str, metavar='MODEL',
                        help='RAVLT_T, RAVLT_S, RAVLT_B, RAVLT_L (or ravlt_t ...), or any timm model name')
    parser.add_argument('--model-kwargs', default=None, type=json_object, metavar='JSON',
                        help='extra model arguments as a JSON object, e.g. \'{"embed_dims": [32, 64, 128, 256], '
                        '"depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8]}\' (a mapping in a config file)')
    parser.add_argument('--input-size', default=224, type=int, help='image size (pixels)')
    parser.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout before the classifier')
    parser.add_argument('--drop-path', type=float, default=None, metavar='PCT',
                        help='stochastic depth rate (default: the variant\'s, T 0.1, S 0.15, B 0.4, L 0.55)')
    parser.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights (default)')
    parser.add_argument('--no-model-ema', action='store_false', dest='model_ema')
    parser.set_defaults(model_ema=True)
    parser.add_argument('--model-ema-decay', type=float, default=0.99996,
                        help='EMA decay per step at a total batch of 512; used as decay ** (total batch / 512)')
    parser.add_argument('--model-ema-warmup', action='store_true',
                        help="ramp the EMA decay up as 1 - (1 + step) ** -2/3 (timm's warm-up; for short runs)")
    parser.add_argument('--model-ema-force-cpu', action='store_true', help='keep the EMA weights on the CPU')

    # Optimizer
    parser.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER', help='a timm optimizer name')
    parser.add_argument('--opt-eps', default=1e-8, type=float, metavar='EPSILON')
    parser.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    parser.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='clip the gradient norm')
    parser.add_argument('--momentum', type=float, default=0.9, metavar='M', help='SGD momentum')
    parser.add_argument('--weight-decay', type=float, default=0.05)

    # Learning-rate schedule (stepped once per epoch)
    parser.add_argument('--sched', default='cosine', type=str, metavar='SCHEDULER', help='a timm scheduler name')
    parser.add_argument('--lr', type=float, default=5e-4, metavar='LR',
                        help='learning rate at a total batch of 512; scaled linearly with the total batch')
    parser.add_argument('--warmup-lr', type=float, default=1e-6, metavar='LR')
    parser.add_argument('--min-lr', type=float, default=1e-5, metavar='LR')
    parser.add_argument('--warmup-epochs', type=int, default=5, metavar='N')
    parser.add_argument('--decay-epochs', type=float, default=30, metavar='N', help='for the step scheduler')
    parser.add_argument('--decay-rate', type=float, default=0.1, metavar='RATE', help='for the step scheduler')

    # Augmentation (ignored by DIGITS, which has its own light crop-and-upscale)
    parser.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT')
    parser.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                        help='RandAugment / AutoAugment policy ("none" for none)')
    parser.add_argument('--train-interpolation', type=str, default='bicubic',
                        help='random, bilinear or bicubic')
    parser.add_argument('--repeated-aug', action='store_true', help='repeated augmentation x3 (default)')
    parser.add_argument('--no-repeated-aug', action='store_false', dest='repeated_aug')
    parser.set_defaults(repeated_aug=True)
    parser.add_argument('--reprob', type=float, default=0.25, metavar='PCT', help='random erasing probability')
    parser.add_argument('--remode', type=str, default='pixel', help='random erasing mode')
    parser.add_argument('--recount', type=int, default=1, help='random erasing count')

    # Label smoothing, mixup and cutmix
    parser.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    parser.add_argument('--mixup', type=float, default=0.8, help='mixup alpha, on if > 0')
    parser.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha, on if > 0')
    parser.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                        help='cutmix min/max ratio; overrides alpha and turns cutmix on')
    parser.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixup or cutmix per batch')
    parser.add_argument('--mixup-switch-prob', type=float, default=0.5,
                        help='probability of cutmix rather than mixup when both are on')
    parser.add_argument('--mixup-mode', type=str, default='batch', choices=['batch', 'pair', 'elem'])

    # Weights
    parser.add_argument('--finetune', default='', help='start from these weights (a new classifier if the '
                        'class count differs)')
    parser.add_argument('--resume', default='', help='resume from this checkpoint (default: OUTPUT_DIR/'
                        'checkpoint.pth if it exists)')
    parser.add_argument('--start_epoch', default=0, type=int, metavar='N', help='first epoch when not resuming')
    parser.add_argument('--eval', action='store_true', help='evaluate only')
    parser.add_argument('--dist-eval', action='store_true', help='split evaluation over the processes')

    # Data
    parser.add_argument('--data-path', default='', type=str, help='data folder (IMNET: train/ and val/ class '
                        'folders; CIFAR: where cifar-100-python/ is)')
    parser.add_argument('--data-set', default='IMNET', choices=DATA_SETS, type=str)
    parser.add_argument('--num_workers', '--num-workers', default=10, type=int, help='data loading processes')
    parser.add_argument('--pin-mem', action='store_true', help='pin host memory on CUDA (default)')
    parser.add_argument('--no-pin-mem', action='store_false', dest='pin_mem')
    parser.set_defaults(pin_mem=True)

    # Run
    parser.add_argument('--output_dir', '--output-dir', default='', help='where to write checkpoints and logs '
                        '(empty: write nothing)')
    parser.add_argument('--device', default=None, choices=['cpu', 'cuda'], help='default: cuda if available')
    parser.add_argument('--amp', default=None, choices=list(AMP_DTYPES),
                        help='autocast precision (default: fp16 on CUDA, as the authors, none on the CPU)')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--save-freq', default=10, type=int, metavar='N',
                        help='keep backup{epoch}.pth every N epochs (0: never)')
    parser.add_argument('--print-freq', default=10, type=int, metavar='N', help='print every N steps')
    return parser


class ArgumentParser(argparse.ArgumentParser):
    """Flag errors become one-line UsageErrors (see utils.run_cli)."""

    def error(self, message):
        raise UsageError(f'{message} (see python {os.path.basename(sys.argv[0])} --help)')


def _long_options(parser) -> dict:
    """Every long flag name without dashes -> its action."""
    return {opt[2:]: action for action in parser._actions for opt in action.option_strings
            if opt.startswith('--') and action.dest not in ('help', 'config')}


def _config_value(action, key: str, value, path: str):
    """A YAML value converted and checked as argparse would the flag's."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UsageError(f'{key} in config {path} must be true or false, got {value!r}')
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if value is None or action.type is None or (action.type is json_object and isinstance(value, dict)):
        converted = value
    else:
        try:
            converted = ([action.type(v) for v in value] if isinstance(value, list) and action.nargs not in (None, '?')
                         else action.type(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise UsageError(f'{key}: {value!r} in config {path} is not valid ({e})') from None
    if action.choices is not None and converted is not None and converted not in action.choices:
        raise UsageError(f'{key}: {value!r} in config {path} is not one of {", ".join(map(str, action.choices))}')
    return converted


def read_config(path: str, parser) -> dict:
    """{dest: value} from a YAML file whose keys are flag names (without dashes)."""
    if not os.path.isfile(path):
        raise UsageError(f'config file {path} does not exist')
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UsageError(f'config {path} is not valid YAML ({str(e).splitlines()[0]})') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f'config {path} must map flag names to values, e.g. "batch-size: 128"')
    options = _long_options(parser)
    values = {}
    for key, value in data.items():
        action = options.get(str(key))
        if action is None:
            close = difflib.get_close_matches(str(key), list(options), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ''
            raise UsageError(f'unknown key {key!r} in config {path}: keys are flag names without dashes{hint}')
        values[action.dest] = _config_value(action, str(key), value, path)
    return values


def parse_args(argv=None) -> argparse.Namespace:
    """Flags, with the values of `--config FILE` as defaults under those given on the command line."""
    parser = ArgumentParser('RAVLT training and evaluation', parents=[get_args_parser()])
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**read_config(args.config, parser))
        args = parser.parse_args(argv)
    return args


def args_to_config(args) -> dict:
    """The flag values as {flag name: value}, readable again with --config."""
    values, seen = {}, set()
    for name, action in _long_options(get_args_parser()).items():
        if action.dest in seen or isinstance(action, argparse._StoreFalseAction):
            continue  # one name per value: the first spelling, the positive form of on/off flags
        seen.add(action.dest)
        value = getattr(args, action.dest)
        values[name] = value.type if isinstance(value, torch.device) else value
    return values


def check_args(args):
    """Reject values no run can use, before anything is built or written."""
    for flag, value, least in (('--batch-size', args.batch_size, 1), ('--input-size', args.input_size, 1),
                               ('--epochs', args.epochs, 0), ('--num_workers', args.num_workers, 0),
                               ('--save-freq', args.save_freq, 0), ('--print-freq', args.print_freq, 1)):
        if value < least:
            raise UsageError(f'{flag} must be at least {least}, got {value}')
    if args.output_dir and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f'--output_dir {args.output_dir} exists and is not a folder')
    if not args.eval and _mixup_active(args) and args.batch_size % 2:
        raise UsageError(f'mixup/cutmix need an even --batch-size, got {args.batch_size} '
                         '(or pass --mixup 0 --cutmix 0)')


def _mixup_active(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def build_model(args, num_classes: int) -> torch.nn.Module:
    name = models.resolve_model_name(args.model)
    if not timm.is_model(name):
        raise UsageError(f'unknown model {args.model!r}: choose RAVLT_T, RAVLT_S, RAVLT_B or RAVLT_L '
                         '(any timm model name also works, see timm.list_models())')
    kwargs = dict(args.model_kwargs or {}, num_classes=num_classes, drop_rate=args.drop)
    if args.drop_path is not None:  # the variant's own rate otherwise
        kwargs['drop_path_rate'] = args.drop_path
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError, AssertionError, IndexError, KeyError) as e:
        raise UsageError(f'cannot build {name} with --model-kwargs {json.dumps(args.model_kwargs)}: {e}') from None


def load_exact(model: torch.nn.Module, checkpoint: dict, source: str, prefer_ema: bool = False,
               allowed_missing=()):
    """Load weights that must fit the model key for key (but for `allowed_missing`)."""
    try:
        missing, unexpected = utils.load_model_weights(model, checkpoint, prefer_ema=prefer_ema)
    except UsageError as e:
        raise UsageError(f'{source}: {e}') from None
    missing = [k for k in missing if k not in allowed_missing]
    if missing or unexpected:
        entry = checkpoint['model_ema'] if prefer_ema and isinstance(checkpoint.get('model_ema'), dict) else checkpoint
        problem = f'{len(missing)} missing and {len(unexpected)} unexpected tensors, e.g. {(missing + unexpected)[0]}'
        raise UsageError(f'{source}: ' + utils.weights_mismatch_message(
            model, models.checkpoint_filter_fn(entry, model), problem))


def load_finetune_weights(model: torch.nn.Module, path: str):
    """Weights from `path`; a classifier of another class count is dropped (the model keeps its new one)."""
    state_dict = models.checkpoint_filter_fn(utils.load_checkpoint(path), model)
    own = model.state_dict()
    head = [k for k in utils.classifier_keys(model)
            if k in state_dict and k in own and state_dict[k].shape != own[k].shape]
    if head:
        print(f'--finetune: the checkpoint classifier has {state_dict[head[0]].shape[0]} classes, this data set '
              f'{own[head[0]].shape[0]}: dropping it ({", ".join(sorted(head))}) for a new one')
        state_dict = {k: v for k, v in state_dict.items() if k not in head}
    load_exact(model, state_dict, path, allowed_missing=head)
    print(f'Loaded weights for fine-tuning from {path}')


def build_train_loader(args, dataset_train, world_size: int, rank: int, pin_memory: bool):
    """Repeated augmentation (x3, timm's sampler) or a plain shuffle; each process its own share."""
    if args.repeated_aug:
        sampler = RepeatAugSampler(dataset_train, num_replicas=world_size, rank=rank, shuffle=True)
    else:
        sampler = torch.utils.data.DistributedSampler(dataset_train, num_replicas=world_size, rank=rank,
                                                      shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        dataset_train, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
        pin_memory=pin_memory, drop_last=True, generator=torch.Generator())
    if len(loader) == 0:
        raise UsageError(f'the training set ({len(dataset_train)} images, {len(sampler)} per process and '
                         f'epoch) is smaller than one batch of {args.batch_size}: lower --batch-size')
    return loader


def build_criterion(args, num_classes: int):
    """(mixup_fn or None, loss function)."""
    if _mixup_active(args):
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
        return mixup_fn, SoftTargetCrossEntropy()  # mixup applies the label smoothing to its soft targets
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, torch.nn.CrossEntropyLoss()


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the data loader's generator (worker seeds) for one epoch and process: a function of
    (seed, epoch, rank) alone, so a resumed run draws the same numbers."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def main(args):
    check_args(args)
    utils.init_distributed_mode(args)
    device = args.device
    args.amp = args.amp or ('fp16' if device.type == 'cuda' else 'none')
    amp_dtype = AMP_DTYPES[args.amp]
    config = args_to_config(args)
    print(json.dumps(config))

    seed = args.seed + utils.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True

    dataset_val, num_classes = build_dataset(is_train=False, args=args)
    if not args.eval:
        dataset_train, num_train_classes = build_dataset(is_train=True, args=args)
        if num_train_classes != num_classes:
            raise UsageError(f'train/ has {num_train_classes} classes but val/ has {num_classes}: they must hold '
                             'the same class folders')

    world_size, rank = utils.get_world_size(), utils.get_rank()
    if args.dist_eval and args.distributed:
        # A strided shard per process, without the padding a DistributedSampler adds: no image counted twice.
        dataset_val = torch.utils.data.Subset(dataset_val, range(rank, len(dataset_val), world_size))
    pin_memory = args.pin_mem and device.type == 'cuda'
    data_loader_val = torch.utils.data.DataLoader(
        dataset_val, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
        pin_memory=pin_memory, drop_last=False, generator=torch.Generator())

    print(f'Creating model: {args.model}')
    model = build_model(args, num_classes)
    if args.finetune:
        load_finetune_weights(model, args.finetune)
    if args.distributed and device.type == 'cuda':
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif args.distributed:
        print('SyncBatchNorm needs CUDA: on the CPU each process keeps its own BatchNorm statistics')
    model.to(device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f'number of params: {n_parameters}')

    total_batch = args.batch_size * world_size
    model_ema = None
    if args.model_ema:
        # The EMA horizon is kept constant in images: one step at batch B counts as B / 512 steps at 512.
        ema_decay = args.model_ema_decay ** (total_batch / 512.0)
        model_ema = ModelEmaV3(model, decay=ema_decay, use_warmup=args.model_ema_warmup,
                               device=torch.device('cpu') if args.model_ema_force_cpu else None)
        print(f'EMA decay per step: {ema_decay:.8f}')

    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)

    lr = args.lr * total_batch / 512.0
    try:
        optimizer = create_optimizer_v2(model_without_ddp, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                        momentum=args.momentum, eps=args.opt_eps,
                                        **({'betas': tuple(args.opt_betas)} if args.opt_betas else {}))
        lr_scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                              decay_epochs=args.decay_epochs, decay_rate=args.decay_rate,
                                              min_lr=args.min_lr, warmup_lr=args.warmup_lr,
                                              warmup_epochs=args.warmup_epochs)
    except ValueError as e:  # an unknown --opt or --sched
        raise UsageError(f'{e} (--opt {args.opt}, --sched {args.sched}: see timm.optim and timm.scheduler)') from None
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')

    start_epoch, max_accuracy, max_accuracy_ema, rng_state = args.start_epoch, 0.0, 0.0, None
    ema_loaded = False
    resume = args.resume or utils.find_resume_checkpoint(args.output_dir)
    if resume:
        checkpoint = utils.load_checkpoint(resume)
        load_exact(model_without_ddp, checkpoint, resume)
        if model_ema is not None and isinstance(checkpoint.get('model_ema'), dict):
            load_exact(model_ema.module, checkpoint, resume, prefer_ema=True)
            ema_loaded = True
        elif model_ema is not None:
            model_ema.set(model_without_ddp)
        if not args.eval and all(k in checkpoint for k in ('optimizer', 'lr_scheduler', 'epoch')):
            try:
                optimizer.load_state_dict(checkpoint['optimizer'])
            except (ValueError, KeyError) as e:
                raise UsageError(f'{resume}: its optimizer state does not fit --opt {args.opt} ({e})') from None
            lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
            if checkpoint.get('scaler') and scaler.is_enabled():
                scaler.load_state_dict(checkpoint['scaler'])
            start_epoch = checkpoint['epoch'] + 1
            rng_state = checkpoint.get('rng')
        max_accuracy = checkpoint.get('max_accuracy', 0.0)
        max_accuracy_ema = checkpoint.get('max_accuracy_ema', 0.0)
        print(f'Resumed from {resume} (epoch {checkpoint.get("epoch", "?")})')

    if args.eval:
        return evaluate_only(args, data_loader_val, model_without_ddp, model_ema if ema_loaded else None, amp_dtype,
                             weights_given=bool(resume or args.finetune))

    data_loader_train = build_train_loader(args, dataset_train, world_size, rank, pin_memory)
    mixup_fn, criterion = build_criterion(args, num_classes)

    writer = None
    if args.output_dir and utils.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, 'config.yaml'), 'w') as f:
            yaml.safe_dump(config, f, sort_keys=False)
        writer = SummaryWriter(args.output_dir)

    if rng_state is not None:
        utils.restore_rng_state(rng_state)
    print(f'Start training for {args.epochs} epochs from epoch {start_epoch}: total batch {total_batch}, '
          f'lr {lr:.3g}, {len(data_loader_train)} steps per epoch')
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        data_loader_train.sampler.set_epoch(epoch)
        data_loader_train.generator.manual_seed(epoch_seed(args.seed, epoch, rank))
        lr_scheduler.step(epoch)
        train_stats = train_one_epoch(
            model=model, criterion=criterion, data_loader=data_loader_train, optimizer=optimizer, device=device,
            epoch=epoch, scaler=scaler, amp_dtype=amp_dtype, max_norm=args.clip_grad, model_ema=model_ema,
            mixup_fn=mixup_fn, print_freq=args.print_freq)
        if args.distributed and device.type == 'cpu':  # no SyncBatchNorm: evaluate rank 0's statistics everywhere
            utils.broadcast_buffers(model_without_ddp, *([model_ema.module] if model_ema is not None else []))
        dist_eval = args.dist_eval and args.distributed
        test_stats = evaluate(data_loader_val, model_without_ddp, device, amp_dtype, dist_eval, args.print_freq)
        log_stats = {'epoch': epoch, 'n_parameters': n_parameters, **{f'train_{k}': v for k, v in train_stats.items()},
                     **{f'test_{k}': v for k, v in test_stats.items()}}
        improved = test_stats['acc1'] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats['acc1'])
        improved_ema = False
        if model_ema is not None:
            ema_stats = evaluate(data_loader_val, model_ema.module, device, amp_dtype, dist_eval, args.print_freq)
            log_stats.update({f'test_ema_{k}': v for k, v in ema_stats.items()})
            improved_ema = ema_stats['acc1'] > max_accuracy_ema
            max_accuracy_ema = max(max_accuracy_ema, ema_stats['acc1'])
        print(f'Max accuracy: {max_accuracy:.2f}%' + (f', EMA {max_accuracy_ema:.2f}%' if model_ema else ''))

        if args.output_dir:
            state = {
                'model': model_without_ddp.state_dict(),
                'optimizer': optimizer.state_dict(),
                'lr_scheduler': lr_scheduler.state_dict(),
                'scaler': scaler.state_dict(),
                'epoch': epoch,
                'max_accuracy': max_accuracy,
                'max_accuracy_ema': max_accuracy_ema,
                'args': config,
                'rng': utils.capture_rng_state(),
            }
            if model_ema is not None:
                state['model_ema'] = model_ema.module.state_dict()
            if improved:
                utils.save_checkpoint(state, os.path.join(args.output_dir, 'best.pth'))
            if improved_ema:
                utils.save_checkpoint(state, os.path.join(args.output_dir, 'best_ema.pth'))
            if args.save_freq and epoch % args.save_freq == 0:
                utils.save_checkpoint(state, os.path.join(args.output_dir, f'backup{epoch}.pth'))
            # Written last: the resume point.
            utils.save_checkpoint(state, os.path.join(args.output_dir, 'checkpoint.pth'))
        utils.append_log(args.output_dir, log_stats)
        if writer is not None:
            for key, value in log_stats.items():
                if key not in ('epoch', 'n_parameters'):
                    writer.add_scalar(key.replace('_', '/', 1), value, epoch)
            writer.flush()

    if writer is not None:
        writer.close()
    print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')


def evaluate_only(args, data_loader, model, model_ema, amp_dtype, weights_given: bool):
    """--eval: accuracy of the weights and of the EMA weights (when the checkpoint has them); written
    to OUTPUT_DIR/eval_results.json."""
    if not weights_given:
        print('No --resume or --finetune weights: evaluating freshly initialised weights')
    dist_eval = args.dist_eval and args.distributed
    stats = evaluate(data_loader, model, args.device, amp_dtype, dist_eval, args.print_freq)
    results = {'acc1': stats['acc1'], 'acc5': stats['acc5'], 'ema_acc1': None, 'ema_acc5': None}
    print(f"Weights: Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f}")
    if model_ema is not None:
        ema_stats = evaluate(data_loader, model_ema.module, args.device, amp_dtype, dist_eval, args.print_freq)
        results.update(ema_acc1=ema_stats['acc1'], ema_acc5=ema_stats['acc5'])
        print(f"EMA weights: Acc@1 {ema_stats['acc1']:.3f} Acc@5 {ema_stats['acc5']:.3f}")
    if args.output_dir and utils.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, 'eval_results.json'), 'w') as f:
            json.dump(results, f, indent=2)
    return results


def cli(argv=None):
    main(parse_args(argv))


if __name__ == '__main__':
    utils.run_cli(cli, sys.argv[1:])
