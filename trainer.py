"""The epoch loop of a training run: train an epoch (engine.train_one_epoch), check the weights, evaluate,
keep the best, save the checkpoints (the resume point last) and log; stop cleanly on a cluster's signal.

Guarantees (tested with one and with two processes): `checkpoint.pth`, the resume point, is only ever
replaced by a whole file with finite weights (and a finite evaluation loss); `log.txt` and the TensorBoard
events hold each epoch exactly once after any kill; SIGTERM / SIGUSR1 stop every process after the same step
and write a resumable checkpoint."""
import os
import signal
from dataclasses import dataclass
from typing import Optional

import torch

import checkpoints
import distributed
import engine
import utils
from errors import Preempted, UsageError
from model_ema import ema_weights
from model_factory import for_inference

RESUME_FILE = 'checkpoint.pth'
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """SIGTERM and SIGUSR1 (what clusters send before they kill a job) ask the run to stop: noticed between
    steps, agreed by all processes where the host reads the steps' losses, every --print-freq steps (see
    engine.train_one_epoch)."""

    def __init__(self):
        self.received = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __call__(self) -> bool:
        return self.received is not None

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainingSetup:
    """What the run builds for training."""
    model: torch.nn.Module              # what the steps run (DistributedDataParallel with several processes)
    model_without_ddp: torch.nn.Module
    model_ema: Optional[torch.nn.Module]  # timm's ModelEmaV3, or None
    optimizer: torch.optim.Optimizer
    lr_scheduler: object                # a timm scheduler
    scaler: torch.amp.GradScaler
    loader_train: torch.utils.data.DataLoader
    loader_val: torch.utils.data.DataLoader
    total_steps: int


class Trainer:
    """Runs the epochs of `run` (a run.Run: device, precision, flags, output folder) on `task` (a run.Task)."""

    def __init__(self, run, task, setup: TrainingSetup, state: checkpoints.TrainingState):
        self.run, self.task, self.setup, self.state = run, task, setup, state
        self.args = run.args
        self.n_parameters = sum(p.numel() for p in setup.model_without_ddp.parameters() if p.requires_grad)
        self.steps_per_epoch = len(setup.loader_train)
        self.stats = {}

    def train(self, num_epochs: int, stop: StopSignals) -> dict:
        """Train from the state's epoch to `num_epochs`; returns the last evaluation's metrics."""
        state, setup, sampler = self.state, self.setup, self.setup.loader_train.sampler
        for epoch in range(state.start_epoch, num_epochs):
            steps_before = state.global_step
            if state.pending_eval is not None:  # trained, not evaluated: the evaluation failed last time
                result = engine.EpochResult(state.pending_eval['stats'], {}, 0, state.global_step, False)
                steps_before, state.pending_eval = state.pending_eval['steps_before'], None
            else:
                sampler.set_epoch(epoch)
                sampler.skip(state.first_step * self.args.batch_size)
                setup.lr_scheduler.step(epoch)
                steps_before -= state.first_step
                result = engine.train_one_epoch(
                    setup.model, self.task.loss, setup.loader_train, setup.optimizer, setup.scaler, self.run.device,
                    epoch, amp_dtype=self.run.amp_dtype, lr_scheduler=setup.lr_scheduler, seed=self.args.seed,
                    first_step=state.first_step, global_step=state.global_step, last_step=setup.total_steps,
                    max_norm=self.task.max_norm, model_ema=setup.model_ema, totals=state.totals,
                    stop_requested=stop, print_freq=self.args.print_freq)
                state.global_step, state.first_step, state.totals = result.global_step, 0, None
                if result.stopped and result.steps < self.steps_per_epoch and result.global_step < setup.total_steps:
                    self._save_progress(epoch, result)
                    raise Preempted(f'{self._signal(stop)} received during epoch {epoch}; stopped after '
                                    f'{result.steps} of its {self.steps_per_epoch} steps{self._resumes_there()}')
            self._end_epoch(epoch, result, steps_before)
            if epoch + 1 < num_epochs and distributed.all_reduce_sum([float(stop())])[0]:  # signal during evaluation
                raise Preempted(f'{self._signal(stop)} received during epoch {epoch}; stopped after it'
                                f'{self._resumes_there()}')
        return self.stats

    @staticmethod
    def _signal(stop: StopSignals) -> str:
        return stop.received or 'a stop signal (by another process)'

    def _resumes_there(self) -> str:
        if not self.args.output_dir:
            return ' (no --output_dir: nothing saved)'
        return f': {os.path.join(self.args.output_dir, RESUME_FILE)} resumes there (run the same command again)'

    def _checkpoint(self, epoch: int, **extra) -> dict:
        setup = self.setup
        return checkpoints.training_checkpoint(
            model=setup.model_without_ddp, model_ema=setup.model_ema, optimizer=setup.optimizer,
            lr_scheduler=setup.lr_scheduler, scaler=setup.scaler, epoch=epoch, state=self.state,
            flags=self.run.config, meta=self.task.meta, world_size=self.run.world_size,
            best_metric=self.task.best_metric, **extra)

    def _save(self, checkpoint: dict, *names: str):
        """One serialisation, under every name (the last written last: the resume point)."""
        if self.run.output is not None:
            checkpoints.save_checkpoint(checkpoint, *map(self.run.output.file, names))
        distributed.wait_for_main_process()

    def _save_progress(self, epoch: int, result: engine.EpochResult):
        """The mid-epoch resume point (a signal): the last completed epoch's number with this epoch's progress."""
        progress = {'epoch': epoch, 'steps': result.steps, 'global_step': result.global_step, 'totals': result.totals}
        if self.setup.model_ema is not None:
            ema_weights(self.setup.model_ema)  # the updates in flight, in
        checkpoint = self._checkpoint(epoch - 1, progress=progress)
        checkpoint['step'] = result.global_step - result.steps
        self._save(checkpoint, RESUME_FILE)

    def _end_epoch(self, epoch: int, result: engine.EpochResult, steps_before: int):
        setup, task = self.setup, self.task
        weights = [setup.model_without_ddp, *([ema_weights(setup.model_ema)] if setup.model_ema else [])]
        broken = utils.non_finite_tensors(*weights)
        if broken:
            raise FloatingPointError(f'epoch {epoch} ended with NaN or infinite weights ({len(broken)} tensors, e.g. '
                                     f'{broken[0]}): not saved; {self._resume_point()}')
        if self.run.world_size > 1 and not self.run.sync_batchnorm:  # rank 0's statistics
            distributed.broadcast_buffers(*weights)
        entry = {'epoch': epoch, 'step': self.state.global_step, 'n_parameters': self.n_parameters,
                 **{f'train_{k}': v for k, v in result.stats.items()}}
        improved = []
        if task.evaluate_after(steps_before, self.state.global_step, setup.total_steps):
            try:
                # What --eval measures: the inference form of a copy (training goes on with the model).
                evaluations = {'test': task.evaluate(for_inference(setup.model_without_ddp), setup.loader_val)}
                if setup.model_ema is not None:
                    evaluations['test_ema'] = task.evaluate(for_inference(ema_weights(setup.model_ema)),
                                                            setup.loader_val)
            except UsageError as e:  # unreadable validation data: keep the trained epoch, evaluate it next time
                pending = {'stats': result.stats, 'steps_before': steps_before}
                self._save(self._checkpoint(epoch, pending_eval=pending), RESUME_FILE)
                raise UsageError(f'{e} (the trained epoch {epoch} is saved; the next start evaluates it first)',
                                 everywhere=e.everywhere) from None
            loss = evaluations['test'].get('loss')
            if loss is not None and not (loss == loss and abs(loss) != float('inf')):
                raise FloatingPointError(f'epoch {epoch} gives an evaluation loss of {loss}: not saved; '
                                         f'{self._resume_point()}')
            self.stats = evaluations['test']
            for prefix, stats in evaluations.items():
                entry.update({f'{prefix}_{k}': v for k, v in stats.items()})
                key = task.best_metric and task.best_metric + prefix[len('test'):]
                if key and stats.get(task.best_metric) is not None and \
                        stats[task.best_metric] > self.state.best.get(key, float('-inf')):
                    self.state.best[key] = stats[task.best_metric]
                    improved.append('best' + prefix[len('test'):] + '.pth')
            best = ', '.join(f'{k} {v:.2f}' for k, v in self.state.best.items())
            if best:
                print(f'Best: {best}')
        self.state.last_log = entry
        names = improved + ([f'backup{epoch}.pth'] if task.backup_every and epoch % task.backup_every == 0 else [])
        self._save(self._checkpoint(epoch), *names, RESUME_FILE)  # the resume point last
        if self.run.output is not None:
            self.run.output.append_log(entry)

    def _resume_point(self) -> str:
        if not self.args.output_dir:
            return 'nothing is saved without --output_dir'
        if self.state.last_log is None:
            return 'no checkpoint was written yet'
        return f'the resume point stays {os.path.join(self.args.output_dir, RESUME_FILE)} of epoch ' \
            f'{self.state.last_log["epoch"]}'
