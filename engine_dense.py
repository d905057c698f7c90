"""Dense prediction: the training step loop, COCO and mIoU evaluation, and the run that main_det.py and
main_seg.py share (weights, optimizer, schedule, resume, checkpoints, logs)."""
import datetime
import json
import math
import os
import time
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np
import pycocotools.mask as mask_util
import segmentation_models_pytorch as smp
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pycocotools.cocoeval import COCOeval
from timm.optim import create_optimizer_v2

import utils
from engine import autocast, optimizer_step
from main import AMP_DTYPES, ArgumentParser, epoch_seed, json_object, read_config
from models.dense import build_dense_model, dense_backbone, load_backbone_weights
from utils import UsageError


# ----------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------

def get_common_args_parser(prog: str, description: str, tasks) -> ArgumentParser:
    """The flags main_det.py and main_seg.py share. Flags left at None take the task's recipe value."""
    parser = ArgumentParser(prog, description=description)
    parser.add_argument('--config', default='', help='YAML file of flag values (keys are flag names); flags on '
                        'the command line override it')
    parser.add_argument('--task', default=tasks[0], choices=tasks)
    parser.add_argument('--model', default='RAVLT_S', help='RAVLT_T, RAVLT_S, RAVLT_B or RAVLT_L')
    parser.add_argument('--model-kwargs', default=None, type=json_object, metavar='JSON',
                        help='extra backbone arguments as a JSON object, e.g. \'{"depths": [1, 1, 2, 1]}\'')
    parser.add_argument('--drop-path', type=float, default=None,
                        help='stochastic depth rate (default: the variant\'s, T 0.1, S 0.15, B 0.4, L 0.55)')
    parser.add_argument('--pretrained', default='', help='backbone weights: an ImageNet checkpoint (ours or the '
                        'authors\') or the authors\' mmdet/mmseg checkpoint (its backbone part)')
    parser.add_argument('--batch-size', default=2, type=int, help='images per process (the authors: 2 on 8 GPUs)')
    parser.add_argument('--lr', type=float, default=None, help='learning rate (not scaled with the batch)')
    parser.add_argument('--weight-decay', type=float, default=None)
    parser.add_argument('--warmup-iters', type=int, default=None, help='linear warm-up steps')
    parser.add_argument('--warmup-ratio', type=float, default=None, help='warm-up starts at lr * this')
    parser.add_argument('--data-path', default='', help='data folder')
    parser.add_argument('--resume', default='', help='resume from this checkpoint of main_det.py / main_seg.py '
                        '(default: OUTPUT_DIR/checkpoint.pth if it exists); with --eval, evaluate it')
    parser.add_argument('--eval', action='store_true', help='evaluate only')
    parser.add_argument('--output_dir', '--output-dir', default='', help='where to write checkpoints and logs')
    parser.add_argument('--device', default=None, choices=['cpu', 'cuda'], help='default: cuda if available')
    parser.add_argument('--amp', default=None, choices=list(AMP_DTYPES),
                        help='autocast precision (default: fp16 on CUDA, as the authors, none on the CPU)')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--num_workers', '--num-workers', default=4, type=int, help='data loading processes')
    parser.add_argument('--print-freq', default=50, type=int, metavar='N', help='print every N steps')
    return parser


def parse_args(parser: ArgumentParser, recipes: Dict[str, dict], argv=None):
    """Flags, under them `--config FILE`, under that the task's recipe (`recipes[task]`)."""
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**read_config(args.config, parser))
        args = parser.parse_args(argv)
    for key, value in recipes[args.task].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for flag, value, least in (('--batch-size', args.batch_size, 1), ('--num_workers', args.num_workers, 0),
                               ('--print-freq', args.print_freq, 1), ('--lr', args.lr, 0),
                               ('--warmup-iters', args.warmup_iters, 0)):
        if value < least:
            raise UsageError(f'{flag} must be at least {least}, got {value}')
    return args


def setup(args):
    """Distributed mode, device, autocast dtype and seeds; returns the autocast dtype (None: off)."""
    utils.init_distributed_mode(args)
    args.amp = args.amp or ('fp16' if args.device.type == 'cuda' else 'none')
    seed = args.seed + utils.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    return AMP_DTYPES[args.amp]


def build_model(args, num_classes: int, **detector_kwargs) -> torch.nn.Module:
    backbone_kwargs = dict(args.model_kwargs or {})
    if args.drop_path is not None:
        backbone_kwargs['drop_path_rate'] = args.drop_path
    try:
        return build_dense_model(args.task, args.model, num_classes, backbone_kwargs, **detector_kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise UsageError(f'cannot build {args.task} with --model {args.model} and --model-kwargs '
                         f'{json.dumps(args.model_kwargs)}: {e}') from None


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

def param_groups(model: torch.nn.Module, weight_decay: float, norm_no_decay: bool) -> List[dict]:
    """AdamW groups as the authors' mmcv configs: every trainable parameter decays, except, where
    `norm_no_decay`, those named '*norm*' (their paramwise_cfg custom_keys). In their models only backbone
    names contain 'norm' (their necks and heads call norms 'bn'); the backbone's names are the same here."""
    exempt = {id(p) for n, p in dense_backbone(model).named_parameters() if 'norm' in n} if norm_no_decay else set()
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if id(param) in exempt else decay).append(param)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def to_device(data, device: torch.device):
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=True)
    if isinstance(data, dict):
        return {k: to_device(v, device) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [to_device(v, device) for v in data]
    return data


def train_one_epoch(model: torch.nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer, lr_scheduler,
                    device: torch.device, epoch: int, step: int, last_step: int, scaler: torch.amp.GradScaler,
                    amp_dtype: Optional[torch.dtype] = None, print_freq: int = 50):
    """Train on `data_loader` from global step `step`, stopping before `last_step`. The model maps
    (images, targets) to a dict of losses (torchvision's detectors, SemanticSegmenter); their sum is
    minimised. The learning rate is set per step. Returns (mean stats, next step)."""
    model.train()
    metric_logger = utils.MetricLogger()
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    for images, targets in metric_logger.log_every(data_loader, print_freq, f'Epoch: [{epoch}]'):
        if step >= last_step:
            break
        lr_scheduler.step_update(step)
        images, targets = to_device(images, device), to_device(targets, device)
        with autocast(device, amp_dtype):
            losses = model(images, targets)
        loss = sum(losses.values())
        loss_value = optimizer_step(loss, optimizer, scaler, f'epoch {epoch}, step {step}')
        metric_logger.update(loss=loss_value, lr=optimizer.param_groups[0]['lr'],
                             **{k: v.item() for k, v in losses.items()})
        step += 1
    print(f'Averaged stats: {metric_logger}')
    return {name: meter.global_avg for name, meter in metric_logger.meters.items()}, step


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------

def coco_results(output: dict, image_id: int, category_of: Callable[[int], int]) -> List[dict]:
    """One image's detections as COCO result entries (box XYWH; mask as RLE when the output has masks)."""
    boxes = output['boxes'].float().cpu()
    boxes[:, 2:] -= boxes[:, :2]
    results = [{'image_id': image_id, 'category_id': category_of(int(label)), 'bbox': box,
                'score': float(score)}
               for box, label, score in zip(boxes.tolist(), output['labels'].tolist(), output['scores'].tolist())]
    if 'masks' in output:
        masks = (output['masks'][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        for result, mask in zip(results, masks):
            rle = mask_util.encode(np.asfortranarray(mask))
            rle['counts'] = rle['counts'].decode('ascii')
            result['segmentation'] = rle
    return results


def coco_metrics(coco_gt, results: List[dict], iou_types) -> Dict[str, float]:
    """pycocotools' COCOeval: AP, AP50, AP75, APs, APm, APl (%) for each IoU type ('bbox', 'segm')."""
    names = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')
    stats = {}
    for iou_type in iou_types:
        if not results:
            print(f'No detections: {iou_type} AP is 0')
            stats.update({f'{iou_type}_{n}': 0.0 for n in names})
            continue
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        print(f'{iou_type}:')
        coco_eval.summarize()
        stats.update({f'{iou_type}_{n}': 100.0 * float(v) for n, v in zip(names, coco_eval.stats[:6])})
    return stats


@torch.no_grad()
def evaluate_coco(model: torch.nn.Module, data_loader: Iterable, dataset, iou_types, device: torch.device,
                  amp_dtype: Optional[torch.dtype] = None, print_freq: int = 50) -> Dict[str, float]:
    """COCO AP of a torchvision detector on `data_loader` (a shard per process when distributed; the
    results are gathered and scored once) against `dataset.coco`."""
    model.eval()
    results = []
    for images, targets in utils.MetricLogger().log_every(data_loader, print_freq, 'Test:'):
        with autocast(device, amp_dtype):
            outputs = model(to_device(images, device))
        for output, target in zip(outputs, targets):
            results += coco_results(output, target['image_id'], dataset.category_of)
    if utils.get_world_size() > 1:
        gathered = [None] * utils.get_world_size()
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    stats = [coco_metrics(dataset.coco, results, iou_types) if utils.is_main_process() else None]
    if utils.get_world_size() > 1:
        dist.broadcast_object_list(stats)
    return stats[0]


def miou_metrics(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> Dict[str, float]:
    """mmseg's metrics (%) from per-class pixel counts: mIoU and mAcc over the classes present in the
    labels or predictions, and the overall pixel accuracy aAcc."""
    nan = float('nan')
    tn = torch.zeros_like(tp)
    iou = smp.metrics.iou_score(tp, fp, fn, tn, reduction=None, zero_division=nan)
    recall = smp.metrics.recall(tp, fp, fn, tn, reduction=None, zero_division=nan)
    return {'mIoU': 100.0 * float(iou.nanmean()), 'mAcc': 100.0 * float(recall.nanmean()),
            'aAcc': 100.0 * float(tp.sum() / (tp + fn).sum().clamp(min=1))}


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, data_loader: Iterable, num_classes: int, ignore_index: int,
                          device: torch.device, amp_dtype: Optional[torch.dtype] = None,
                          print_freq: int = 50) -> Dict[str, float]:
    """mIoU of whole-image inference: logits resized to each label map's own size; pixel counts from
    segmentation_models_pytorch's get_stats, summed over images and processes."""
    model.eval()
    counts = torch.zeros(3, num_classes, dtype=torch.float64)
    for images, masks in utils.MetricLogger().log_every(data_loader, print_freq, 'Test:'):
        with autocast(device, amp_dtype):
            logits = model(images.to(device, non_blocking=True))
        masks = masks.to(device, non_blocking=True)
        logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode='bilinear', align_corners=False)
        tp, fp, fn, _ = smp.metrics.get_stats(logits.argmax(1), masks.long(), mode='multiclass',
                                              ignore_index=ignore_index, num_classes=num_classes)
        counts += torch.stack([tp.sum(0), fp.sum(0), fn.sum(0)]).double().cpu()
    counts = torch.tensor(utils.all_reduce_sum(counts.flatten().tolist()), dtype=torch.float64).view(3, -1)
    stats = miou_metrics(*counts)
    print(f"* mIoU {stats['mIoU']:.2f} mAcc {stats['mAcc']:.2f} aAcc {stats['aAcc']:.2f}")
    return stats


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------

def load_dense_checkpoint(path: str, model: torch.nn.Module, meta: dict) -> dict:
    """A checkpoint of main_det.py / main_seg.py whose task and classes match `meta`, loaded into `model`."""
    checkpoint = utils.load_checkpoint(path)
    if 'meta' not in checkpoint or 'model' not in checkpoint:
        raise UsageError(f'{path} is not a main_det.py / main_seg.py checkpoint; backbone weights (ImageNet or the '
                         'authors\' mmdet/mmseg checkpoints) go to --pretrained')
    for key, value in meta.items():
        if checkpoint['meta'].get(key) != value:
            theirs = checkpoint['meta'].get(key)
            if key == 'classes':
                raise UsageError(f'{path} was trained on {len(theirs)} classes, this data set has {len(value)}: '
                                 'their class lists must match')
            raise UsageError(f'{path} has {key} {theirs!r}, this run {value!r}')
    try:
        model.load_state_dict(checkpoint['model'])
    except RuntimeError as e:
        raise UsageError(f'{path} does not fit --model {meta.get("model")} and --model-kwargs: '
                         f'{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}') from None
    return checkpoint


def run(args, model: torch.nn.Module, meta: dict, dataset_train, dataset_val, collate_fn, val_batch_size: int,
        evaluate_fn: Callable, total_steps_fn: Callable[[int], int], make_scheduler: Callable,
        norm_no_decay: bool, eval_interval: Optional[int] = None) -> dict:
    """Load weights, then evaluate (`--eval`) or train with checkpoints, evaluation and logs; returns the
    last evaluation's stats.

    evaluate_fn(model, data_loader) -> stats; total_steps_fn(steps per epoch) -> training steps;
    make_scheduler(optimizer, steps per epoch, total steps) -> a timm scheduler stepped per step;
    eval_interval: evaluate after the epoch in which a multiple of this many steps was reached
    (default: every epoch) and after the last.
    """
    device, amp_dtype = args.device, AMP_DTYPES[args.amp]
    world_size, rank = utils.get_world_size(), utils.get_rank()
    if args.pretrained:
        try:
            missing, unexpected = load_backbone_weights(model, utils.load_checkpoint(args.pretrained))
        except ValueError as e:
            raise UsageError(f'--pretrained {args.pretrained}: {e}') from None
        print(f'Backbone weights from {args.pretrained}: {len(missing)} missing {missing}, '
              f'{len(unexpected)} unexpected {unexpected}')
    if args.distributed and device.type == 'cuda':
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the authors' SyncBN
    elif args.distributed:
        print('SyncBatchNorm needs CUDA: on the CPU each process keeps its own BatchNorm statistics')
    model.to(device)
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    print(f'number of params: {sum(p.numel() for p in model_without_ddp.parameters())}')

    if world_size > 1:  # a strided shard per process: no image evaluated twice
        dataset_val = torch.utils.data.Subset(dataset_val, range(rank, len(dataset_val), world_size))
    pin_memory = device.type == 'cuda'
    loader_val = torch.utils.data.DataLoader(dataset_val, batch_size=val_batch_size, num_workers=args.num_workers,
                                             collate_fn=collate_fn, pin_memory=pin_memory)
    resume = args.resume or utils.find_resume_checkpoint(args.output_dir)
    if args.eval:
        if resume:
            load_dense_checkpoint(resume, model_without_ddp, meta)
        else:
            print('No --resume checkpoint: evaluating ' + ('a model with ImageNet backbone weights only'
                                                           if args.pretrained else 'freshly initialised weights'))
        stats = evaluate_fn(model_without_ddp, loader_val)
        if args.output_dir and utils.is_main_process():
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, 'eval_results.json'), 'w') as f:
                json.dump(stats, f, indent=2)
        return stats

    sampler = torch.utils.data.DistributedSampler(dataset_train, num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    loader_generator = torch.Generator()
    loader_train = torch.utils.data.DataLoader(dataset_train, sampler=sampler, batch_size=args.batch_size,
                                               num_workers=args.num_workers, collate_fn=collate_fn,
                                               pin_memory=pin_memory, drop_last=True, generator=loader_generator)
    steps_per_epoch = len(loader_train)
    if steps_per_epoch == 0:
        raise UsageError(f'the training set ({len(dataset_train)} images, {len(sampler)} per process) is smaller '
                         f'than one batch of {args.batch_size}: lower --batch-size')
    total_steps = total_steps_fn(steps_per_epoch)
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    eval_interval = eval_interval or steps_per_epoch
    optimizer = create_optimizer_v2(param_groups(model_without_ddp, args.weight_decay, norm_no_decay), 'adamw',
                                    lr=args.lr, weight_decay=args.weight_decay)
    lr_scheduler = make_scheduler(optimizer, steps_per_epoch, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')

    start_epoch, step, rng_state = 0, 0, None
    if resume:
        checkpoint = load_dense_checkpoint(resume, model_without_ddp, meta)
        optimizer.load_state_dict(checkpoint['optimizer'])
        lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
        if checkpoint.get('scaler') and scaler.is_enabled():
            scaler.load_state_dict(checkpoint['scaler'])
        start_epoch, step, rng_state = checkpoint['epoch'] + 1, checkpoint['step'], checkpoint.get('rng')
        print(f'Resumed from {resume} (epoch {checkpoint["epoch"]}, step {step})')
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    if rng_state is not None:
        utils.restore_rng_state(rng_state)

    config = {k: (v.type if isinstance(v, torch.device) else v) for k, v in vars(args).items()}
    print(f'Training {args.task} for {total_steps} steps ({num_epochs} epochs of {steps_per_epoch}) from step {step}: '
          f'total batch {args.batch_size * world_size}, lr {args.lr:.3g}')
    stats, start_time = {}, time.time()
    for epoch in range(start_epoch, num_epochs):
        sampler.set_epoch(epoch)
        loader_generator.manual_seed(epoch_seed(args.seed, epoch, rank))
        first_step = step
        train_stats, step = train_one_epoch(model, loader_train, optimizer, lr_scheduler, device, epoch, step,
                                            total_steps, scaler, amp_dtype, args.print_freq)
        log_stats = {'epoch': epoch, 'step': step, **{f'train_{k}': v for k, v in train_stats.items()}}
        if step // eval_interval > first_step // eval_interval or step == total_steps:
            stats = evaluate_fn(model_without_ddp, loader_val)
            log_stats.update({f'test_{k}': v for k, v in stats.items()})
        if args.output_dir:
            utils.save_checkpoint({
                'model': model_without_ddp.state_dict(), 'optimizer': optimizer.state_dict(),
                'lr_scheduler': lr_scheduler.state_dict(), 'scaler': scaler.state_dict(), 'epoch': epoch,
                'step': step, 'meta': meta, 'args': config, 'rng': utils.capture_rng_state(),
            }, os.path.join(args.output_dir, 'checkpoint.pth'))
        utils.append_log(args.output_dir, log_stats)
    print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    return stats

