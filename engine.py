"""The loops: one training epoch of any task, and classification evaluation."""

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from timm.utils import unwrap_model

import distributed
import utils


def to_device(data, device: torch.device):
    """Tensors, and the tensors inside dicts, lists and tuples, moved to `device`."""
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=True)
    if isinstance(data, dict):
        return {k: to_device(v, device) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [to_device(v, device) for v in data]
    return data


def grad_scaler(device: torch.device, amp_dtype: Optional[torch.dtype]) -> torch.amp.GradScaler:
    """Dynamic loss scaling for float16; in float32 and bf16 a scale of 1 that never grows (x 1 is exact). Either
    way a step whose gradients are not finite is skipped on the device, without a host read."""
    if amp_dtype == torch.float16:
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**62)


def optimizer_options(opt: str) -> dict:
    """For timm's create_optimizer_v2: the fused kernel where the optimizer has one (torch's AdamW, Adam, SGD):
    one launch per step, and the scaler's skip of a non-finite step stays on the device."""
    from timm.optim import get_optimizer_info

    try:
        opt_class = get_optimizer_info(opt.lower().split('_')[-1]).opt_class
    except ValueError:
        return {}  # an unknown name: create_optimizer_v2 says so
    return {'fused': True} if 'fused' in inspect.signature(opt_class).parameters else {}


@dataclass
class EpochResult:
    stats: dict  # the epoch's mean of each logged value
    totals: dict  # MetricLogger.totals(): what a mid-epoch resume continues from
    steps: int  # steps of this epoch done so far (those before a resume included)
    global_step: int  # steps of the whole run done so far
    stopped: bool  # the processes agreed to stop (a signal): the epoch is unfinished


def train_one_epoch(
    model: torch.nn.Module,
    criterion: Optional[Callable],
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    epoch: int,
    *,
    amp_dtype: Optional[torch.dtype] = None,
    mixup_fn: Optional[Callable] = None,
    lr_scheduler=None,
    model_ema=None,
    max_norm: Optional[float] = None,
    seed: int = 0,
    first_step: int = 0,
    global_step: int = 0,
    last_step: Optional[int] = None,
    totals: Optional[dict] = None,
    stop_requested: Callable[[], bool] = lambda: False,
    print_freq: int = 10,
) -> EpochResult:
    """Train on the epoch's batches from step `first_step` (after a mid-epoch resume the loader skips the ones
    before) and before the run's step `last_step`. With a `criterion` the loss is criterion(model(samples),
    targets); without one the model returns its losses (torchvision's detectors, our segmenters).

    Before each step the global generators are seeded from (seed, epoch, rank, step), so mixup / cutmix, drop
    path and multi-scale sizes draw the same numbers whether or not the run was resumed. The host reads the
    steps' losses every `print_freq` steps and at the epoch's end, and only then: there the processes also
    agree whether any of them was asked to stop, and stop after the same step."""
    model.train()
    metric_logger = utils.MetricLogger()
    metric_logger.meters['lr'] = utils.SmoothedValue(window_size=1, fmt='{value:.3g}')
    metric_logger.restore(totals or {})
    total = first_step + len(data_loader)
    rank, step, stopped = distributed.get_rank(), first_step, False
    records, names = [], None  # each step's losses on the device, and its lr; read every print_freq steps
    for batch in metric_logger.log_every(data_loader, print_freq, f'Epoch: [{epoch}]', start=first_step, total=total):
        if last_step is not None and global_step >= last_step:
            break
        samples, targets = to_device(utils.checked(batch), device)
        utils.seed_everything(utils.derive_seed(seed, epoch, rank, step))
        if lr_scheduler is not None:
            lr_scheduler.step_update(global_step)  # timm: schedules stepped per epoch ignore it
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        with utils.autocast(device, amp_dtype):
            losses = model(samples, targets) if criterion is None else {'loss': criterion(model(samples), targets)}
        loss = sum(losses.values())
        names = names or ['loss'] + [k for k in losses if len(losses) > 1]
        # A non-finite loss never updates the weights: its NaN gradients (every process's, through DDP) make
        # the scaler skip the step on the device; the read below stops the run naming the step.
        poison = torch.where(loss.detach().isfinite(), 1.0, float('nan')).to(loss.dtype)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss * poison).backward()
        if max_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        scaler.step(optimizer)
        scaler.update()
        if model_ema is not None:
            model_ema.update(unwrap_model(model), step=global_step)
        values = [loss] + [losses[k] for k in names[1:]]
        records.append((torch.stack([v.detach() for v in values]).double(), optimizer.param_groups[0]['lr']))
        stopped = stopped or stop_requested()
        step, global_step = step + 1, global_step + 1
        if step % print_freq == 0 or step == total or global_step == last_step:
            stopped = _read_steps(records, names, stopped, metric_logger, f'epoch {epoch}, step {{}} of {total}', step)
            records = []
            if stopped:
                break
    if records:
        stopped = _read_steps(records, names, stopped, metric_logger, f'epoch {epoch}, step {{}} of {total}', step)
    print(f'Averaged stats: {metric_logger}')
    return EpochResult(metric_logger.averages(), metric_logger.totals(), step, global_step, stopped)


def _read_steps(records, names, stop: bool, metric_logger, where: str, step: int) -> bool:
    """Log the steps' values averaged over the processes, in one host read that also sums the stop requests;
    returns whether any process was asked to stop. A non-finite loss raises FloatingPointError naming its step."""
    values = torch.stack([r for r, _ in records])
    summed = distributed.all_reduce_sum(torch.cat([values.flatten(), values.new_tensor([float(stop)])]))
    world, width = distributed.get_world_size(), values.shape[1]
    for i, (_, lr) in enumerate(records):
        row = [v / world for v in summed[i * width : (i + 1) * width]]
        if not math.isfinite(row[0]):
            raise FloatingPointError(
                f'loss is {row[0]} at {where.format(step - len(records) + i)}; training stopped, the checkpoints '
                'on disk are from the last completed epoch'
            )
        metric_logger.update(**dict(zip(names, row)), lr=lr)
    return summed[-1] > 0


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data_loader: Iterable,
    amp_dtype: Optional[torch.dtype] = None,
    *,
    sharded: bool = False,
    print_freq: int = 10,
) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the loader's images, where the model is. With
    `sharded`, each process holds a disjoint share and the exact counts are summed over processes."""
    model.eval()
    device = utils.module_device(model)
    metric_logger = utils.MetricLogger()
    count = correct1 = correct5 = loss_sum = 0.0
    for batch in metric_logger.log_every(data_loader, print_freq, 'Test:'):
        images, target = to_device(utils.checked(batch), device)
        with utils.autocast(device, amp_dtype):
            output = model(images)
        output = output.float()
        hits = output.topk(min(5, output.shape[1]), dim=1).indices.eq(target[:, None])
        batch_correct1 = hits[:, 0].sum().item()
        count += len(target)
        correct1 += batch_correct1
        correct5 += hits.any(dim=1).sum().item()
        loss_sum += F.cross_entropy(output, target, reduction='sum').item()
        metric_logger.update(n=len(target), acc1=100.0 * batch_correct1 / len(target))
    if sharded:
        count, correct1, correct5, loss_sum = distributed.all_reduce_sum([count, correct1, correct5, loss_sum])
    count = max(count, 1)
    return {'acc1': 100.0 * correct1 / count, 'acc5': 100.0 * correct5 / count, 'loss': loss_sum / count}
