"""The loops: one training epoch of any task (the task gives its loss), and classification evaluation."""

import inspect
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
    process alone: the others end within seconds, see distributed.PeerWatch): a UsageError naming the file, or a
    MemoryError when memory ran out while loading it."""
    if isinstance(batch, utils.LoadError):
        raise MemoryError(f'while loading {batch.message}') if batch.out_of_memory else UsageError(batch.message)
    return batch


def evaluation_batches(batches: Iterable):
    """The batches of an evaluation; one holding a sample that could not be loaded ends it, and once every
    process is through its share, all raise together, naming the file (so that the run can save the trained
    epoch first)."""
    error = None
    for batch in batches:
        if isinstance(batch, utils.LoadError):
            if batch.out_of_memory:
                check_batch(batch)
            error = batch.message
            break
        yield batch
    error = distributed.first_error(error)
    if error is not None:
        raise UsageError(error, everywhere=True)


# A loss scale that never grows: float32 and bf16 need no scaling, and x 1 is exact (see grad_scaler).
NEVER = 2**62


def grad_scaler(device: torch.device, amp_dtype: Optional[torch.dtype]) -> torch.amp.GradScaler:
    """The loss scaler of a run: dynamic scaling for float16; in float32 and bf16 a scale of 1 that never grows.
    Either way a step whose gradients are not finite is skipped on the device (GradScaler's `found_inf`),
    without a host read with an optimizer that takes the scaler's tensors (fused AdamW, Adam, SGD)."""
    if amp_dtype == torch.float16:
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=NEVER)


def optimizer_options(opt: str) -> dict:
    """Keyword arguments for timm's create_optimizer_v2: the fused kernel where the optimizer class has one (torch's
    AdamW, Adam, SGD): one launch per step, and the scaler's skip of a non-finite step stays on the device."""
    from timm.optim import get_optimizer_info

    try:
        opt_class = get_optimizer_info(opt.lower().split('_')[-1]).opt_class
    except ValueError:
        return {}  # an unknown name: create_optimizer_v2 says so
    return {'fused': True} if 'fused' in inspect.signature(opt_class).parameters else {}


def optimizer_step(
    losses: Dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    max_norm: Optional[float] = None,
    parameters=None,
) -> torch.Tensor:
    """Backward of the summed `losses` and one optimizer step, without reading anything on the host.

    Returns the step's record, float64 [loss, part, ...] on the device. A non-finite loss never updates the
    weights: the loss is multiplied by NaN instead of 1, so every gradient is NaN (on every process: DDP averages
    it in) and the scaler skips the step on the device. train_one_epoch reads the records every --print-freq
    steps and stops the run naming the first such step."""
    loss = sum(losses.values())
    parts = [] if list(losses) == ['loss'] else list(losses)
    record = torch.stack([loss.detach(), *(losses[k].detach() for k in parts)]).double()
    poison = torch.where(loss.detach().isfinite(), 1.0, float('nan')).to(loss.dtype)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss * poison).backward()
    if max_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    scaler.step(optimizer)
    scaler.update()
    return record


@dataclass
class EpochResult:
    stats: dict  # the epoch's mean of each logged value
    totals: dict  # MetricLogger.totals(): what a mid-epoch resume continues from
    steps: int  # steps of this epoch done so far (those before a resume included)
    global_step: int  # steps of the whole run done so far
    stopped: bool  # a process was asked to stop (a signal): the epoch is unfinished


class StepRecords:
    """The records of the steps since the last read (optimizer_step's, on the device), their learning rates and
    whether this process was asked to stop; `read` takes them to the host, summed over processes, in one
    synchronisation."""

    def __init__(self, names, where: Callable[[int], str]):
        self.names, self.where = names, where
        self.records, self.lrs, self.first, self.stop = [], [], 0, False

    def add(self, step: int, record: torch.Tensor, lr: float, stop: bool):
        if not self.records:
            self.first = step
        self.records.append(record)
        self.lrs.append(lr)
        self.stop = self.stop or stop

    def read(self, metric_logger: utils.MetricLogger) -> bool:
        """Log each step's values (averaged over processes) and return whether any process was asked to stop;
        a non-finite loss raises FloatingPointError naming its step."""
        records = torch.stack(self.records)
        stop = torch.full((1,), float(self.stop), dtype=records.dtype, device=records.device)
        totals = distributed.all_reduce_sum(torch.cat([records.flatten(), stop]))
        world, width = distributed.get_world_size(), records.shape[1]
        for i, lr in enumerate(self.lrs):
            values = [v / world for v in totals[i * width : (i + 1) * width]]
            if not math.isfinite(values[0]):
                raise FloatingPointError(
                    f'loss is {values[0]} at {self.where(self.first + i)}; training stopped, the '
                    'checkpoints on disk are from the last completed epoch'
                )
            metric_logger.update(**dict(zip(self.names, values)), lr=lr)
        self.records, self.lrs, self.stop = [], [], False
        return totals[-1] > 0


def train_one_epoch(
    model: torch.nn.Module,
    loss_fn: Callable,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    epoch: int,
    *,
    amp_dtype: Optional[torch.dtype] = None,
    lr_scheduler=None,
    seed: int = 0,
    first_step: int = 0,
    global_step: int = 0,
    last_step: Optional[int] = None,
    max_norm: Optional[float] = None,
    model_ema=None,
    totals: Optional[dict] = None,
    stop_requested: Callable[[], bool] = lambda: False,
    print_freq: int = 10,
) -> EpochResult:
    """Train on the epoch's batches from step `first_step` (after a mid-epoch resume, the loader skips the
    batches before it) and before the run's step `last_step`.

    `loss_fn(model, samples, targets)` gives a dict of losses, whose sum is minimised. Before each step the
    global generators are seeded from (seed, epoch, rank, step): mixup / cutmix, drop path and multi-scale
    sizes draw the same numbers whether or not the run was resumed. `lr_scheduler.step_update` runs per
    step (timm schedulers stepped per epoch ignore it), the EMA is updated after each optimizer step.

    The host reads the steps' losses every `print_freq` steps and at the epoch's end (StepRecords), and only
    then: the processes agree there on a stop request and stop after the same step."""
    model.train()
    metric_logger = utils.MetricLogger()
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value:.3g}'))
    metric_logger.restore(totals or {})
    steps_per_epoch = first_step + len(data_loader)
    rank, step, stopped, pending = distributed.get_rank(), first_step, False, None
    for batch in metric_logger.log_every(
        data_loader, print_freq, f'Epoch: [{epoch}]', start=first_step, total=steps_per_epoch
    ):
        if last_step is not None and global_step >= last_step:
            break
        samples, targets = check_batch(batch)
        utils.seed_everything(utils.derive_seed(seed, epoch, rank, step))
        if lr_scheduler is not None:
            lr_scheduler.step_update(global_step)
        samples, targets = to_device(samples, device), to_device(targets, device)
        with autocast(device, amp_dtype):
            losses = loss_fn(model, samples, targets)
        if pending is None:
            pending = StepRecords(
                ['loss'] + ([] if list(losses) == ['loss'] else list(losses)),
                lambda i: f'epoch {epoch}, step {i} of {steps_per_epoch}',
            )
        record = optimizer_step(losses, optimizer, scaler, max_norm, model.parameters())
        if model_ema is not None:
            model_ema.update(unwrap_model(model), step=global_step)
        pending.add(step, record, optimizer.param_groups[0]['lr'], stop_requested())
        step += 1
        global_step += 1
        if step % print_freq == 0 or step == steps_per_epoch or global_step == last_step:
            stopped = pending.read(metric_logger)
            if stopped:
                break
    if pending is not None and pending.records:
        stopped = pending.read(metric_logger)
    print(f'Averaged stats: {metric_logger}')
    return EpochResult(metric_logger.averages(), metric_logger.totals(), step, global_step, stopped)


@torch.no_grad()
def evaluate(
    data_loader: Iterable,
    model: torch.nn.Module,
    amp_dtype: Optional[torch.dtype] = None,
    sharded: bool = False,
    print_freq: int = 10,
) -> dict:
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
    return {
        'acc1': 100.0 * correct1 / denominator,
        'acc5': 100.0 * correct5 / denominator,
        'loss': loss_sum / denominator,
    }
