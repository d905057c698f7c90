"""The epoch loop of a training run: train an epoch (engine.train_one_epoch), check the weights, evaluate,
keep the best, save the checkpoints (the resume point last) and log; stop cleanly on a cluster's signal.

Guarantees (tested with one and with two processes): `checkpoint.pth`, the resume point, is only ever
replaced by a whole file with finite weights (and a finite evaluation loss); `log.txt` and the TensorBoard
events hold each epoch exactly once after any kill; SIGTERM / SIGUSR1 stop every process after the same step
and write a resumable checkpoint."""

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

import torch

import checkpoints
import distributed
import engine
import utils
from errors import Preempted, RunFailure, UsageError
from model_ema import ema_weights
from output_folder import LOG_FILE

RESUME_FILE = 'checkpoint.pth'
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# After a stop signal, how long (seconds) the run may wait for a batch before it stops where it is, unsaved: below
# the 30 s a SLURM job gets between SIGTERM and SIGKILL by default.
DATA_WAIT_AFTER_STOP = 20.0


class StuckOnData(BaseException):
    """A stop signal came, and the next batch did not come within DATA_WAIT_AFTER_STOP seconds. Not an Exception:
    raised wherever the wait is (a sample's own loading code included), no `except Exception` may take it for a
    data error."""


def print_evaluation(label: str, stats: dict, images: int):
    """One line per evaluated model, saying whose numbers they are ('Weights', 'EMA weights')."""
    print(f'* {label}: {utils.format_metrics(stats)} ({images} images)')


class StopSignals:
    """SIGTERM and SIGUSR1 (what clusters send before they kill a job) ask the run to stop: noticed between
    steps, agreed by all processes where the host reads the steps' losses, every --print-freq steps (see
    engine.train_one_epoch).

    A run stuck waiting for its data (a file that blocks, a hung file system) never reaches the next step: when
    the main process has waited for a batch `wait` seconds after the signal, a SIGALRM raises StuckOnData there.
    Computing, evaluating and saving are never cut short; a repeated signal counts as one (a cluster and
    torchrun may both deliver it)."""

    def __init__(self, wait: Optional[float] = None):
        self.received, self.signalled_at = None, None
        self.wait = DATA_WAIT_AFTER_STOP if wait is None else wait
        self.pid = os.getpid()  # data-loading workers inherit the handlers: there they do nothing
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        self.previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._check_data_wait)

    def _handle(self, signum, frame):
        if self.received is None and os.getpid() == self.pid:
            self.received, self.signalled_at = signal.Signals(signum).name, time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, self.wait)

    def _check_data_wait(self, signum, frame):
        if self.signalled_at is None or os.getpid() != self.pid:
            return
        waiting_since = utils.DataWait.since
        now = time.monotonic()
        if waiting_since is not None and now - max(waiting_since, self.signalled_at) >= self.wait:
            self.acknowledge()
            raise StuckOnData()
        # Not waiting for data (or not for long): look again when a wait begun now would have lasted too long.
        started = max(waiting_since or now, self.signalled_at)
        signal.setitimer(signal.ITIMER_REAL, max(started + self.wait - now, 0.1))

    def acknowledge(self):
        """The run acts on the stop (it saves and ends): no more checks of its data waits."""
        self.signalled_at = None
        signal.setitimer(signal.ITIMER_REAL, 0)

    def __call__(self) -> bool:
        return self.received is not None

    def restore(self):
        self.acknowledge()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainingSetup:
    """What the run builds for training."""

    model: torch.nn.Module  # what the steps run (DistributedDataParallel with several processes)
    model_without_ddp: torch.nn.Module
    model_ema: Optional[torch.nn.Module]  # timm's ModelEmaV3, or None
    optimizer: torch.optim.Optimizer
    lr_scheduler: object  # a timm scheduler
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
        self.epoch = state.start_epoch

    def train(self, num_epochs: int, stop: StopSignals) -> dict:
        """Train from the state's epoch to `num_epochs`; returns the last evaluation's metrics."""
        try:
            return self._train(num_epochs, stop)
        except StuckOnData:
            raise Preempted(
                f'{stop.received} received during epoch {self.epoch}, but no batch came for '
                f'{stop.wait:.0f} s after it (a data file that blocks? a hung file system?): stopped where '
                f'it was, this epoch unsaved; {self._resume_point()}',
                everywhere=False,
            ) from None

    def _train(self, num_epochs: int, stop: StopSignals) -> dict:
        state, setup, sampler = self.state, self.setup, self.setup.loader_train.sampler
        for epoch in range(state.start_epoch, num_epochs):
            self.epoch = epoch
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
                    setup.model,
                    self.task.loss,
                    setup.loader_train,
                    setup.optimizer,
                    setup.scaler,
                    self.run.device,
                    epoch,
                    amp_dtype=self.run.amp_dtype,
                    lr_scheduler=setup.lr_scheduler,
                    seed=self.args.seed,
                    first_step=state.first_step,
                    global_step=state.global_step,
                    last_step=setup.total_steps,
                    max_norm=self.task.max_norm,
                    model_ema=setup.model_ema,
                    totals=state.totals,
                    stop_requested=stop,
                    print_freq=self.args.print_freq,
                )
                state.global_step, state.first_step, state.totals = result.global_step, 0, None
                if result.stopped:
                    stop.acknowledge()
                if result.stopped and result.steps < self.steps_per_epoch and result.global_step < setup.total_steps:
                    self._save_progress(epoch, result)
                    raise Preempted(
                        f'{self._signal(stop)} received during epoch {epoch}; stopped after '
                        f'{result.steps} of its {self.steps_per_epoch} steps{self._resumes_there()}'
                    )
            self._end_epoch(epoch, result, steps_before)
            if epoch + 1 < num_epochs and distributed.all_reduce_sum([float(stop())])[0]:  # signal during evaluation
                raise Preempted(
                    f'{self._signal(stop)} received during epoch {epoch}; stopped after it{self._resumes_there()}'
                )
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
            model=setup.model_without_ddp,
            model_ema=setup.model_ema,
            optimizer=setup.optimizer,
            lr_scheduler=setup.lr_scheduler,
            scaler=setup.scaler,
            epoch=epoch,
            state=self.state,
            flags=self.run.config,
            meta=self.task.meta,
            world_size=self.run.world_size,
            best_metric=self.task.best_metric,
            **extra,
        )

    def _save(self, checkpoint: dict, *names: str):
        """One serialisation, under every name (the last written last: the resume point)."""
        if self.run.output is not None:
            with self._writing(names[0]):
                checkpoints.save_checkpoint(checkpoint, *map(self.run.output.file, names))
        distributed.wait_for_main_process()

    @contextlib.contextmanager
    def _writing(self, name: str):
        """A file of the output folder that cannot be written (the folder removed, the file not ours or
        immutable, the disk full) ends the run in one line naming the resume point left on disk."""
        try:
            yield
        except OSError as e:
            # A rename names its target second; a file of ours is named, never the temporary one beside it.
            named = [f for f in (e.filename2, e.filename) if f and not os.path.basename(str(f)).startswith('.')]
            path = named[0] if named else self.run.output.file(name)
            raise RunFailure(
                f'cannot write {path} ({(e.strerror or str(e)).lower()}); {self._resume_point_on_disk()}'
            ) from None

    def _resume_point_on_disk(self) -> str:
        folder = self.args.output_dir
        path = os.path.join(folder, RESUME_FILE)
        if not os.path.isdir(folder):
            return f'the output folder {folder} was removed during the run, and with it its checkpoints'
        if not os.path.isfile(path):
            return 'no checkpoint was written yet'
        try:
            epoch = checkpoints.load_checkpoint(path, mmap=True).get('epoch')
        except UsageError as e:
            return f'the resume point is damaged ({e})'
        return f'the resume point is {path} (epoch {epoch}; run the same command again once it can be written)'

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
            raise FloatingPointError(
                f'epoch {epoch} ended with NaN or infinite weights ({len(broken)} tensors, e.g. '
                f'{broken[0]}): not saved; {self._resume_point()}'
            )
        if self.run.world_size > 1 and not self.run.sync_batchnorm:  # rank 0's statistics
            distributed.broadcast_buffers(*weights)
        entry = {
            'epoch': epoch,
            'step': self.state.global_step,
            'n_parameters': self.n_parameters,
            **{f'train_{k}': v for k, v in result.stats.items()},
        }
        improved = []
        if task.evaluate_after(steps_before, self.state.global_step, setup.total_steps):
            try:
                # What --eval measures: the inference form of a copy (training goes on with the model).
                inference_form = self.run.inference_form
                evaluations = {'test': task.evaluate(inference_form(setup.model_without_ddp), setup.loader_val)}
                print_evaluation('Weights', evaluations['test'], len(task.dataset_val))
                if setup.model_ema is not None:
                    evaluations['test_ema'] = task.evaluate(
                        inference_form(ema_weights(setup.model_ema)), setup.loader_val
                    )
                    print_evaluation('EMA weights', evaluations['test_ema'], len(task.dataset_val))
            except UsageError as e:  # unreadable validation data: keep the trained epoch, evaluate it next time
                pending = {'stats': result.stats, 'steps_before': steps_before}
                self._save(self._checkpoint(epoch, pending_eval=pending), RESUME_FILE)
                raise UsageError(
                    f'{e} (the trained epoch {epoch} is saved; the next start evaluates it first)',
                    everywhere=e.everywhere,
                ) from None
            loss = evaluations['test'].get('loss')
            if loss is not None and not (loss == loss and abs(loss) != float('inf')):
                raise FloatingPointError(
                    f'epoch {epoch} gives an evaluation loss of {loss}: not saved; {self._resume_point()}'
                )
            self.stats = evaluations['test']
            for prefix, stats in evaluations.items():
                entry.update({f'{prefix}_{k}': v for k, v in stats.items()})
                key = task.best_metric and task.best_metric + prefix[len('test') :]
                if (
                    key
                    and stats.get(task.best_metric) is not None
                    and stats[task.best_metric] > self.state.best.get(key, float('-inf'))
                ):
                    self.state.best[key] = stats[task.best_metric]
                    improved.append('best' + prefix[len('test') :] + '.pth')
            best = ', '.join(f'{k} {v:.2f}' for k, v in self.state.best.items())
            if best:
                print(f'Best: {best}')
        self.state.last_log = entry
        names = improved + ([f'backup{epoch}.pth'] if task.backup_every and epoch % task.backup_every == 0 else [])
        self._save(self._checkpoint(epoch), *names, RESUME_FILE)  # the resume point last
        if self.run.output is not None:
            with self._writing(LOG_FILE):
                self.run.output.append_log(entry)

    def _resume_point(self) -> str:
        if not self.args.output_dir:
            return 'nothing is saved without --output_dir'
        if self.state.last_log is None:
            return 'no checkpoint was written yet'
        return (
            f'the resume point stays {os.path.join(self.args.output_dir, RESUME_FILE)} of epoch '
            f'{self.state.last_log["epoch"]}'
        )
