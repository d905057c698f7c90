"""One training epoch and one evaluation pass."""
import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from timm.utils import unwrap_model

import utils


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """torch.amp.autocast for `device`, disabled when `amp_dtype` is None (full precision)."""
    return torch.amp.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   where: str, max_norm: Optional[float] = None, parameters=None) -> float:
    """Backward and one optimizer step; returns the loss averaged over processes.

    A non-finite loss (on any process: all stop together) raises FloatingPointError naming `where`
    before anything is updated, so the weights and the checkpoints on disk stay the last good ones.
    """
    loss_value = utils.all_reduce_sum([loss.item()])[0] / utils.get_world_size()
    if not math.isfinite(loss_value):
        raise FloatingPointError(f'loss is {loss_value} at {where}; training stopped, the checkpoints on disk '
                                 'are from the last completed epoch')
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if max_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    scaler.step(optimizer)
    scaler.update()
    return loss_value


def train_one_epoch(model: torch.nn.Module, criterion, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, scaler: torch.amp.GradScaler,
                    amp_dtype: Optional[torch.dtype] = None, max_norm: Optional[float] = None,
                    model_ema=None, mixup_fn=None, print_freq: int = 10) -> dict:
    """Train for one epoch; returns the epoch's mean `loss` and the `lr`.

    A non-finite loss (on any process) raises FloatingPointError naming the epoch and step, before the
    optimizer step, so the weights and the checkpoints on disk stay those of the last good epoch.
    """
    model.train()
    metric_logger = utils.MetricLogger()
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    num_steps = len(data_loader)
    for step, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, f'Epoch: [{epoch}]')):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        with autocast(device, amp_dtype):
            loss = criterion(model(samples), targets)
        loss_value = optimizer_step(loss, optimizer, scaler, f'epoch {epoch}, step {step} of {num_steps}',
                                    max_norm, model.parameters())
        if model_ema is not None:
            model_ema.update(unwrap_model(model), step=epoch * num_steps + step)
        metric_logger.update(loss=loss_value, lr=optimizer.param_groups[0]['lr'])
    print(f'Averaged stats: {metric_logger}')
    return {name: meter.global_avg for name, meter in metric_logger.meters.items()}


@torch.no_grad()
def evaluate(data_loader: Iterable, model: torch.nn.Module, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None, distributed: bool = False, print_freq: int = 10) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the loader's images.

    With `distributed`, each process holds a disjoint shard and the exact counts are summed over
    processes (no sample counted twice)."""
    model.eval()
    metric_logger = utils.MetricLogger()
    count = correct1 = correct5 = loss_sum = 0.0
    for images, target in metric_logger.log_every(data_loader, print_freq, 'Test:'):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            output = model(images)
        output = output.float()
        hits = output.topk(min(5, output.shape[1]), dim=1).indices.eq(target[:, None])
        batch_correct1 = hits[:, 0].sum().item()
        count += len(target)
        correct1 += batch_correct1
        correct5 += hits.any(dim=1).sum().item()
        loss_sum += F.cross_entropy(output, target, reduction='sum').item()
        metric_logger.update(acc1=100.0 * batch_correct1 / len(target))
    if distributed:
        count, correct1, correct5, loss_sum = utils.all_reduce_sum([count, correct1, correct5, loss_sum])
    denominator = max(count, 1)
    stats = {'loss': loss_sum / denominator, 'acc1': 100.0 * correct1 / denominator,
             'acc5': 100.0 * correct5 / denominator}
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} "
          f'({int(count)} images)')
    return stats
