"""The loops: one training epoch of any task (the task gives its loss), and classification evaluation."""
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from timm.utils import unwrap_model

import distributed
import utils
from errors import UsageError
from utils import autocast


def to_device(data, device: torch.device):
    """Tensors, and the tensors inside dicts, lists and tuples, moved to `device`."""
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=True)
    if isinstance(data, dict):
        return {k: to_device(v, device) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [to_device(v, device) for v in data]
    return data


def check_batch(batch):
    """A training batch, or the one-line error of the sample in it that could not be loaded (raised by this
    process alone: the others stop when they lose contact with it)."""
    if isinstance(batch, utils.LoadError):
        raise UsageError(batch.message)
    return batch


def evaluation_batches(batches: Iterable):
    """The batches of an evaluation; one holding a sample that could not be loaded ends it, and once every
    process is through its share, all raise together, naming the file (so that the run can save the trained
    epoch first)."""
    error = None
    for batch in batches:
        if isinstance(batch, utils.LoadError):
            error = batch.message
            break
        yield batch
    error = distributed.first_error(error)
    if error is not None:
        raise UsageError(error, everywhere=True)


def optimizer_step(losses: Dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   where: str, max_norm: Optional[float] = None, parameters=None, stop: bool = False):
    """Backward of the summed `losses` and one optimizer step.

    One collective makes the processes agree on the loss and its parts (averaged over processes) and on
    whether any of them was asked to stop. A non-finite loss (on any process: all stop together) raises
    FloatingPointError naming `where` before anything is updated, so the weights and the checkpoints on
    disk stay the last good ones. Returns ({'loss': ..., part: ...}, stop)."""
    loss = sum(losses.values())
    parts = [] if list(losses) == ['loss'] else list(losses)
    world = distributed.get_world_size()
    totals = distributed.all_reduce_sum([loss.item()] + [losses[k].item() for k in parts] + [float(stop)])
    values = {'loss': totals[0] / world, **{k: v / world for k, v in zip(parts, totals[1:-1])}}
    if not math.isfinite(values['loss']):
        raise FloatingPointError(f'loss is {values["loss"]} at {where}; training stopped, the checkpoints on disk '
                                 'are from the last completed epoch')
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if max_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    scaler.step(optimizer)
    scaler.update()
    return values, totals[-1] > 0


@dataclass
class EpochResult:
    stats: dict          # the epoch's mean of each logged value
    totals: dict         # MetricLogger.totals(): what a mid-epoch resume continues from
    steps: int           # steps of this epoch done so far (those before a resume included)
    global_step: int     # steps of the whole run done so far
    stopped: bool        # a process was asked to stop (a signal): the epoch is unfinished


def train_one_epoch(model: torch.nn.Module, loss_fn: Callable, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device,
                    epoch: int, *, amp_dtype: Optional[torch.dtype] = None, lr_scheduler=None, seed: int = 0,
                    first_step: int = 0, global_step: int = 0, last_step: Optional[int] = None,
                    max_norm: Optional[float] = None, model_ema=None, totals: Optional[dict] = None,
                    stop_requested: Callable[[], bool] = lambda: False, print_freq: int = 10) -> EpochResult:
    """Train on the epoch's batches from step `first_step` (after a mid-epoch resume, the loader skips the
    batches before it) and before the run's step `last_step`.

    `loss_fn(model, samples, targets)` gives a dict of losses, whose sum is minimised. Before each step the
    global generators are seeded from (seed, epoch, rank, step): mixup / cutmix, drop path and multi-scale
    sizes draw the same numbers whether or not the run was resumed. `lr_scheduler.step_update` runs per
    step (timm schedulers stepped per epoch ignore it), the EMA is updated after each optimizer step."""
    model.train()
    metric_logger = utils.MetricLogger()
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value:.3g}'))
    metric_logger.restore(totals or {})
    steps_per_epoch = first_step + len(data_loader)
    rank, step, stopped = distributed.get_rank(), first_step, False
    for batch in metric_logger.log_every(data_loader, print_freq, f'Epoch: [{epoch}]', start=first_step,
                                         total=steps_per_epoch):
        if last_step is not None and global_step >= last_step:
            break
        samples, targets = check_batch(batch)
        utils.seed_everything(utils.derive_seed(seed, epoch, rank, step))
        if lr_scheduler is not None:
            lr_scheduler.step_update(global_step)
        samples, targets = to_device(samples, device), to_device(targets, device)
        with autocast(device, amp_dtype):
            losses = loss_fn(model, samples, targets)
        values, stopped = optimizer_step(losses, optimizer, scaler, f'epoch {epoch}, step {step} of {steps_per_epoch}',
                                         max_norm, model.parameters(), stop_requested())
        if model_ema is not None:
            model_ema.update(unwrap_model(model), step=global_step)
        metric_logger.update(**values, lr=optimizer.param_groups[0]['lr'])
        step += 1
        global_step += 1
        if stopped:
            break
    print(f'Averaged stats: {metric_logger}')
    return EpochResult(metric_logger.averages(), metric_logger.totals(), step, global_step, stopped)


@torch.no_grad()
def evaluate(data_loader: Iterable, model: torch.nn.Module, amp_dtype: Optional[torch.dtype] = None,
             sharded: bool = False, print_freq: int = 10) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the loader's images, computed where the model
    is (an EMA kept on the CPU is evaluated there).

    With `sharded`, each process holds a disjoint shard and the exact counts are summed over processes
    (no sample counted twice)."""
    model.eval()
    device = utils.module_device(model)
    metric_logger = utils.MetricLogger()
    count = correct1 = correct5 = loss_sum = 0.0
    for batch in evaluation_batches(metric_logger.log_every(data_loader, print_freq, 'Test:')):
        images, target = to_device(batch, device)
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
    if sharded:
        count, correct1, correct5, loss_sum = distributed.all_reduce_sum([count, correct1, correct5, loss_sum])
    denominator = max(count, 1)
    stats = {'acc1': 100.0 * correct1 / denominator, 'acc5': 100.0 * correct5 / denominator,
             'loss': loss_sum / denominator}
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} "
          f'({int(count)} images)')
    return stats
