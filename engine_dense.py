"""What main_det.py and main_seg.py share: their flags and recipes, the optimizer as the authors' mmcv configs build
it, and COCO and mIoU evaluation (the training epoch is engine.train_one_epoch, shared with classification)."""

import contextlib
import io
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np
import pycocotools.mask as mask_util
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from timm.optim import create_optimizer_v2

import distributed
import utils
from cli import FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE
from engine import optimizer_options, to_device
from errors import UsageError
from models.dense import dense_backbone

COCO_METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')


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


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, norm_no_decay: bool) -> torch.optim.Optimizer:
    """The dense recipes' AdamW over `param_groups`."""
    return create_optimizer_v2(
        param_groups(model, weight_decay, norm_no_decay),
        'adamw',
        lr=lr,
        weight_decay=weight_decay,
        **optimizer_options('adamw'),
    )


def add_dense_arguments(parser, training, recipes: dict):
    """--task, --pretrained and the flags each task's recipe sets; left at None they take the recipe's value, which
    --help shows per task. `training`: the parser's training group."""
    parser.add_argument('--task', default=next(iter(recipes)), choices=list(recipes))
    training.add_argument(
        '--pretrained',
        default='',
        help="backbone weights: an ImageNet checkpoint (ours or the authors') or the authors' mmdet / mmseg checkpoint",
    )
    training.add_argument('--lr', type=POSITIVE, default=None, help='learning rate (not scaled with the batch)')
    training.add_argument('--weight-decay', type=NON_NEGATIVE, default=None)
    training.add_argument('--warmup-iters', type=NON_NEGATIVE_INT, default=None, help='linear warm-up steps')
    training.add_argument('--warmup-ratio', type=FRACTION, default=None, help='warm-up starts at lr * this')


def show_recipe_defaults(parser, recipes: dict):
    """--help gives each recipe flag's default per --task (call once every flag is added)."""
    for action in parser._actions:
        values = {task: str(recipe[action.dest]) for task, recipe in recipes.items() if action.dest in recipe}
        if values and action.default is None:
            text = ', '.join(f'{v} for {task}' for task, v in values.items())
            action.help = f"{action.help or ''} (default: {text}, the --task recipe's)".lstrip()


def apply_recipe(args, recipes: dict):
    """Flags left at None take their task's recipe value."""
    for key, value in recipes[args.task].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def check_img_scale(img_scale):
    """(long, short) of --img-scale, LONG SHORT as mmdet / mmseg configs write it; the reverse order is refused."""
    long, short = img_scale
    if long < short:
        raise UsageError(
            f'--img-scale takes LONG SHORT (e.g. 1333 800 for COCO, 2048 512 for ADE20K), got {long} '
            f'{short}: did you mean {short} {long}?'
        )
    return long, short


def coco_results(output: dict, image_id: int, category_of: Callable[[int], int]) -> List[dict]:
    """One image's detections as COCO result entries (box XYWH; mask as RLE when the output has masks)."""
    boxes = output['boxes'].float().cpu()
    boxes[:, 2:] -= boxes[:, :2]
    results = [
        {'image_id': image_id, 'category_id': category_of(int(label)), 'bbox': box, 'score': float(score)}
        for box, label, score in zip(boxes.tolist(), output['labels'].tolist(), output['scores'].tolist())
    ]
    if 'masks' in output:
        masks = (output['masks'][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        for result, mask in zip(results, masks):
            rle = mask_util.encode(np.asfortranarray(mask))
            rle['counts'] = rle['counts'].decode('ascii')
            result['segmentation'] = rle
    return results


def _no_detections(coco_gt: COCO) -> COCO:
    """An empty result set (pycocotools' loadRes refuses an empty list): every image scored with nothing."""
    empty = COCO()
    empty.dataset = {
        'images': coco_gt.dataset['images'],
        'categories': coco_gt.dataset['categories'],
        'annotations': [],
    }
    empty.createIndex()
    return empty


def coco_metrics(coco_gt: COCO, results: List[dict], iou_types) -> Dict[str, Optional[float]]:
    """pycocotools' COCOeval: AP, AP50, AP75, APs, APm, APl (%) for each IoU type ('bbox', 'segm'). A metric
    COCO cannot apply (no ground-truth object in that size range: -1) is None. pycocotools' own prints (its
    progress and its table, with -1.000 for those) are kept out of the output: the run prints the metrics."""
    stats = {}
    if not results:
        print('No detections: AP is 0 where there are objects to find')
    for iou_type in iou_types:
        with contextlib.redirect_stdout(io.StringIO()):
            detections = coco_gt.loadRes(results) if results else _no_detections(coco_gt)
            coco_eval = COCOeval(coco_gt, detections, iou_type)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        stats.update(
            {f'{iou_type}_{n}': None if v < 0 else 100.0 * float(v) for n, v in zip(COCO_METRICS, coco_eval.stats[:6])}
        )
    return stats


@torch.no_grad()
def evaluate_coco(
    model: torch.nn.Module,
    data_loader: Iterable,
    amp_dtype: Optional[torch.dtype] = None,
    *,
    dataset,
    iou_types,
    print_freq: int = 50,
) -> Dict[str, Optional[float]]:
    """COCO AP of a torchvision detector on `data_loader` (a share per process when distributed), where the
    model is. The results are gathered to rank 0, which scores them while the others wait for its numbers."""
    model.eval()
    device = utils.module_device(model)
    results = []
    for batch in utils.MetricLogger().log_every(data_loader, print_freq, 'Test:'):
        images, targets = utils.checked(batch)
        with utils.autocast(device, amp_dtype):
            outputs = model(to_device(images, device))
        for output, target in zip(outputs, targets):
            results += coco_results(output, target['image_id'], dataset.category_of)
    gathered = distributed.gather_objects(results)
    stats = (
        coco_metrics(dataset.coco, [r for part in gathered for r in part], iou_types)
        if distributed.is_main_process()
        else None
    )
    return distributed.broadcast_object(stats)


def miou_metrics(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> Dict[str, float]:
    """mmseg's metrics (%) from per-class pixel counts: mIoU and mAcc over the classes present in the
    labels or predictions, and the overall pixel accuracy aAcc."""
    nan = float('nan')
    tn = torch.zeros_like(tp)
    iou = smp.metrics.iou_score(tp, fp, fn, tn, reduction=None, zero_division=nan)
    recall = smp.metrics.recall(tp, fp, fn, tn, reduction=None, zero_division=nan)
    return {
        'mIoU': 100.0 * float(iou.nanmean()),
        'mAcc': 100.0 * float(recall.nanmean()),
        'aAcc': 100.0 * float(tp.sum() / (tp + fn).sum().clamp(min=1)),
    }


@torch.no_grad()
def evaluate_segmentation(
    model: torch.nn.Module,
    data_loader: Iterable,
    amp_dtype: Optional[torch.dtype] = None,
    *,
    num_classes: int,
    ignore_index: int,
    print_freq: int = 50,
) -> Dict[str, float]:
    """mIoU of whole-image inference, where the model is: logits resized to each label map's own size; pixel
    counts from segmentation_models_pytorch's get_stats, summed over images and processes."""
    model.eval()
    device = utils.module_device(model)
    counts = torch.zeros(3, num_classes, dtype=torch.float64)
    for batch in utils.MetricLogger().log_every(data_loader, print_freq, 'Test:'):
        images, masks = to_device(utils.checked(batch), device)
        with utils.autocast(device, amp_dtype):
            logits = model(images)
        logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode='bilinear', align_corners=False)
        tp, fp, fn, _ = smp.metrics.get_stats(
            logits.argmax(1), masks.long(), mode='multiclass', ignore_index=ignore_index, num_classes=num_classes
        )
        counts += torch.stack([tp.sum(0), fp.sum(0), fn.sum(0)]).double().cpu()
    counts = torch.tensor(distributed.all_reduce_sum(counts.flatten().tolist()), dtype=torch.float64).view(3, -1)
    return miou_metrics(*counts)
