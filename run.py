"""One invocation of an entry point (main.py, main_det.py, main_seg.py): `Run` sets up the processes, device,
precision and output folder, decides what to resume, and then evaluates or trains a `Task`.

A task (classification, detection, segmentation) gives its model, data, loss, optimizer, schedule and
evaluation; the rest is shared. Every random draw is a function of (seed, epoch, rank, position), so a run
resumed at an epoch boundary or after a signal mid-epoch ends bit-identical to one never stopped (on the CPU;
see docs/training.md for CUDA), and resuming with another process count works. One run at a time per
output folder. Parts: distributed.py (processes), output_folder.py (the folder), checkpoints.py (what is
saved and resumed), trainer.py (the epoch loop), model_factory.py (models and their inference form)."""
import datetime
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import yaml

import checkpoints
import distributed
import engine
import utils
from errors import UsageError
from model_ema import create_model_ema
from model_factory import channels_last_convs, for_inference, match_gradient_layouts
from output_folder import OutputFolder
from trainer import RESUME_FILE, StopSignals, Trainer, TrainingSetup

# Flags whose change does not change the training.
IGNORED_CHANGES = {'resume', 'eval', 'output_dir', 'num_workers', 'print_freq', 'dist_timeout', 'device', 'data_path',
                   'finetune', 'pretrained', 'start_epoch', 'dist_backend', 'deterministic'}


@dataclass
class Task:
    """What a task gives the run."""
    model: torch.nn.Module
    dataset_val: torch.utils.data.Dataset
    evaluate: Callable              # (model, data loader) -> {metric: value}, the same on every process
    meta: dict                      # kept in checkpoints and checked on resume (task, classes ...)
    val_batch_size: int
    shard_val: bool = True          # each process evaluates a disjoint share (else each the whole set)
    collate_fn: Optional[Callable] = None
    dataset_train: Optional[torch.utils.data.Dataset] = None
    train_sampler: Optional[Callable] = None   # (dataset, world size, rank) -> sampler; default: shuffled shards
    loss: Optional[Callable] = None            # (model, samples, targets) -> {name: loss}
    make_optimizer: Optional[Callable] = None  # (model) -> optimizer
    make_schedule: Optional[Callable] = None   # (optimizer, steps per epoch) -> (timm scheduler, total steps)
    schedule_in_epochs: bool = True  # False: the schedule counts steps whatever the process count (segmentation)
    evaluate_after: Callable = lambda steps_before, steps_after, total: True  # whether an epoch ends in evaluation
    ema: Optional[dict] = None      # ModelEmaV3 arguments, or None for no EMA
    fixed_input_size: bool = False  # every batch has the same size: cuDNN may benchmark its kernels once
    layout_probe: Optional[Callable] = None  # (model) -> (module, input) for match_gradient_layouts
    best_metric: Optional[str] = None  # keep best.pth (and best_ema.pth) by this metric
    max_norm: Optional[float] = None
    backup_every: int = 0           # keep backup{epoch}.pth every this many epochs
    log_extra: dict = field(default_factory=dict)


def run_task(parser, args, model_flags, build_task: Callable) -> dict:
    """What an entry point's main does: a Run, the task built in it, then evaluate (--eval) or train."""
    with Run(parser, args, model_flags) as run:
        task = build_task(args, run)
        return run.evaluate(task) if args.eval else run.train(task)


class Run:
    """One invocation of an entry point: set up on creation, then `train(task)` or `evaluate(task)`."""

    def __init__(self, parser, args, model_flags=()):
        """Processes, device, precision and the output folder; rank 0 decides what to resume, every process
        loads it, and the model flags it was trained with (`model_flags`, destinations) fill in those not given."""
        self.parser, self.args = parser, args
        distributed.init_distributed(args)
        self.device, self.rank, self.world_size = args.device, args.rank, args.world_size
        args.amp = args.amp or ('fp16' if self.device.type == 'cuda' else 'none')
        self.amp_dtype = utils.AMP_DTYPES[args.amp]
        cores = len(os.sched_getaffinity(0)) // max(int(os.environ.get('LOCAL_WORLD_SIZE', 1)), 1)
        if args.num_workers is None:
            args.num_workers = min(args.default_num_workers, max(cores, 1))
        if args.deterministic:
            os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # before cuBLAS starts: fixed reductions
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic = True
        utils.seed_everything(args.seed)  # the model's initial weights (DDP gives every process rank 0's)
        self.output = self._open_output()
        try:
            self._find_checkpoint(model_flags)
        except BaseException:
            self.close()
            raise

    def _open_output(self) -> Optional[OutputFolder]:
        output, error = None, None
        if self.args.output_dir and distributed.is_main_process():
            try:
                output = OutputFolder(self.args.output_dir)
            except UsageError as e:
                error = str(e)
        distributed.agree(error)
        return output

    def _find_checkpoint(self, model_flags):
        """Rank 0 decides what to resume (--resume, else the output folder's checkpoint.pth); every process reads it."""
        args = self.args
        self.checkpoint, self.resume_path = None, None
        own = os.path.join(args.output_dir, RESUME_FILE) if args.output_dir else None
        path = distributed.broadcast_object(args.resume or (own if own and os.path.isfile(own) else ''))
        if path:
            error = None
            try:
                self.checkpoint = checkpoints.load_checkpoint(path)
            except UsageError as e:
                error = str(e) if self.world_size == 1 else f'{e} (every process reads it: on several nodes the ' \
                    'output folder must be shared)'
            distributed.agree(error)
            self.resume_path = path
            self._take_model_flags(model_flags)
        self.own_checkpoint = bool(path) and own is not None and os.path.abspath(path) == os.path.abspath(own)

    def _select_kernels(self, task: Task):
        """cuDNN benchmarks its convolutions for each new input size: only where every batch has the same size
        (classification), and not with --deterministic."""
        if self.device.type == 'cuda':
            torch.backends.cudnn.benchmark = task.fixed_input_size and not self.args.deterministic

    def precision(self, model: torch.nn.Module) -> Optional[torch.dtype]:
        """The autocast dtype to evaluate `model` in: the run's (--amp) on the run's device; float32 (None) for a
        model kept elsewhere (an EMA on the CPU beside a CUDA run)."""
        return self.amp_dtype if utils.module_device(model).type == self.device.type else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Release the output folder (its lock, the TensorBoard writer)."""
        if self.output is not None:
            self.output.close()
            self.output = None

    @property
    def config(self) -> dict:
        """The resolved flags (after the checkpoint's and the task's recipe), as written to config.yaml and
        into checkpoints."""
        return self.parser.to_config(self.args)

    def _take_model_flags(self, model_flags):
        saved = checkpoints.flags_of(self.checkpoint)
        taken = {}
        for dest in model_flags:
            if dest not in self.args.given and dest in saved and saved[dest] != getattr(self.args, dest):
                setattr(self.args, dest, saved[dest])
                taken[dest] = saved[dest]
        if taken:
            print('From the checkpoint (give a flag to override): ' +
                  ', '.join(f'--{k.replace("_", "-")} {json.dumps(v)}' for k, v in taken.items()))

    # ---------------------------------------------------------------- data

    def _loader(self, dataset, batch_size, sampler, collate_fn, drop_last):
        return torch.utils.data.DataLoader(
            utils.SeededDataset(dataset), sampler=utils.SeededSampler(sampler, self.args.seed, self.rank),
            batch_size=batch_size, num_workers=self.args.num_workers, drop_last=drop_last,
            persistent_workers=self.args.num_workers > 0,  # kept across epochs; each sample's seed travels with it
            pin_memory=getattr(self.args, 'pin_mem', True) and self.device.type == 'cuda',
            collate_fn=utils.collate_or_error(collate_fn or torch.utils.data.default_collate))

    def val_loader(self, task: Task):
        dataset = task.dataset_val
        if task.shard_val and self.world_size > 1:
            # A strided share per process, without the padding a DistributedSampler adds: no image counted twice.
            dataset = torch.utils.data.Subset(dataset, range(self.rank, len(dataset), self.world_size))
        return self._loader(dataset, task.val_batch_size, torch.utils.data.SequentialSampler(dataset),
                            task.collate_fn, drop_last=False)

    def train_loader(self, task: Task):
        if task.train_sampler is not None:
            sampler = task.train_sampler(task.dataset_train, self.world_size, self.rank)
        else:
            sampler = torch.utils.data.DistributedSampler(task.dataset_train, num_replicas=self.world_size,
                                                          rank=self.rank, shuffle=True, seed=self.args.seed,
                                                          drop_last=True)
        loader = self._loader(task.dataset_train, self.args.batch_size, sampler, task.collate_fn, drop_last=True)
        if len(loader) == 0:
            raise UsageError(f'the training set ({len(task.dataset_train)} images, {len(sampler)} per process and '
                             f'epoch) is smaller than one batch of {self.args.batch_size}: lower --batch-size')
        return loader

    # ---------------------------------------------------------------- model

    def _check_meta(self, task: Task):
        saved = self.checkpoint.get('meta')
        saved = saved if isinstance(saved, dict) else {}
        if task.meta.get('task') != 'classification' and 'task' not in saved:
            raise UsageError(f'{self.resume_path} is not a main_det.py / main_seg.py checkpoint: backbone weights (an '
                             "ImageNet checkpoint, ours or the authors', or the authors' mmdet / mmseg one) go to "
                             '--pretrained')
        for key, value in task.meta.items():
            theirs = saved.get(key)
            if key in saved and theirs != value:
                if key == 'classes':
                    raise UsageError(f'{self.resume_path} was trained on {len(theirs)} classes, this data set has '
                                     f'{len(value)}: their class lists must match')
                raise UsageError(f'{self.resume_path} has {key} {theirs!r}, this run {value!r}')

    def _load_weights(self, task: Task, model, model_ema):
        self._check_meta(task)
        checkpoints.load_weights(model, self.checkpoint, self.resume_path, self.args.model)
        if model_ema is None:
            return
        if isinstance(self.checkpoint.get('model_ema'), dict):
            checkpoints.load_weights(model_ema.module, self.checkpoint, self.resume_path, self.args.model, ema=True)
        else:
            model_ema.set(model)

    @property
    def sync_batchnorm(self) -> bool:
        """BatchNorm statistics over all processes (SyncBatchNorm: NCCL only)."""
        return self.world_size > 1 and distributed.backend() == 'nccl'

    def _prepare_model(self, task: Task, train: bool):
        """The model on its device, its EMA, the resumed weights, then SyncBatchNorm and DDP for training.
        Returns (model for the steps, the bare model, its EMA or None)."""
        model = task.model
        if train and self.sync_batchnorm:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif train and self.world_size > 1:
            print('SyncBatchNorm needs NCCL: with gloo each process keeps its own BatchNorm statistics (rank 0\'s '
                  'are copied to all before each evaluation)')
        model.to(self.device)
        channels_last_convs(model)
        if train and task.layout_probe is not None:
            match_gradient_layouts(*task.layout_probe(model), self.amp_dtype)
        model_ema = None
        if task.ema is not None and (train or isinstance((self.checkpoint or {}).get('model_ema'), dict)):
            model_ema = create_model_ema(model, **task.ema)
        if self.checkpoint is not None:
            self._load_weights(task, model, model_ema)
        if not train:
            return model, model, model_ema
        ddp = model
        if self.world_size > 1:
            ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == 'cuda' else None)
        return ddp, model, model_ema

    # ---------------------------------------------------------------- evaluation only

    def evaluate(self, task: Task) -> dict:
        """--eval: the metrics of the weights and, when the checkpoint has them, of the EMA weights; written to
        OUTPUT_DIR/eval_results.json."""
        print(json.dumps(self.config))
        self._select_kernels(task)
        _, model, model_ema = self._prepare_model(task, train=False)
        self.checkpoint = None  # loaded: its memory is free again
        if self.resume_path is None:
            print('No checkpoint given (--resume): evaluating the weights the model was built with')
        broken = utils.non_finite_tensors(model)
        if broken:
            raise FloatingPointError(f'the weights hold NaN or infinite values ({len(broken)} tensors, e.g. '
                                     f'{broken[0]}): nothing to evaluate')
        loader = self.val_loader(task)
        stats = task.evaluate(for_inference(model, inplace=True), loader)
        print(f'Weights: {_format(stats)}')
        results = dict(stats)
        if task.ema is not None:  # the EMA's numbers: null when the checkpoint has no EMA
            ema_stats = dict.fromkeys(stats) if model_ema is None else \
                task.evaluate(for_inference(model_ema.module, inplace=True), loader)
            if model_ema is not None:
                print(f'EMA weights: {_format(ema_stats)}')
            results.update({f'ema_{k}': v for k, v in ema_stats.items()})
        if not all(v is None or v == v and abs(v) != float('inf') for v in results.values()):
            raise FloatingPointError(f'the evaluation gave non-finite values ({_format(results)}): the weights '
                                     'are not usable')
        if self.output is not None:
            self.output.write_text('eval_results.json', json.dumps(results, indent=2) + '\n')
        return results

    # ---------------------------------------------------------------- training

    def train(self, task: Task) -> dict:
        """Train with evaluation, checkpoints and logs; returns the last evaluation's metrics."""
        args, config = self.args, self.config
        print(json.dumps(config))
        self._select_kernels(task)
        model, model_without_ddp, model_ema = self._prepare_model(task, train=True)
        loader_val, loader_train = self.val_loader(task), self.train_loader(task)
        steps_per_epoch = len(loader_train)
        optimizer = task.make_optimizer(model_without_ddp)
        lr_scheduler, total_steps = task.make_schedule(optimizer, steps_per_epoch)
        scaler = engine.grad_scaler(self.device, self.amp_dtype)
        state = checkpoints.TrainingState(start_epoch=getattr(args, 'start_epoch', 0))
        if self.checkpoint is not None:
            state = self._resume(task, optimizer, scaler, steps_per_epoch)
            self.checkpoint = None  # loaded: its memory (weights, EMA, optimizer state) is free again
        if task.schedule_in_epochs:
            num_epochs = -(-total_steps // steps_per_epoch)
        else:  # by the step: the steps already done, whatever the process count and batch they were taken with
            left = max(total_steps - state.global_step, 0) + state.first_step
            num_epochs = state.start_epoch + (state.pending_eval is not None) + -(-left // steps_per_epoch)
        if self.output is not None:
            self.output.write_text('config.yaml', yaml.safe_dump(config, sort_keys=False))
            self.output.restore_log(state.start_epoch - 1, state.last_log if self.own_checkpoint else None)
        warmup = getattr(lr_scheduler, 'warmup_t', 0)
        if warmup and warmup >= (num_epochs if lr_scheduler.t_in_epochs else total_steps):
            print(f'warning: the warm-up ({warmup} {"epochs" if lr_scheduler.t_in_epochs else "steps"}) covers the '
                  'whole run: the learning rate never reaches its set value (lower --warmup-epochs / --warmup-iters)')
        trainer = Trainer(self, task, TrainingSetup(model, model_without_ddp, model_ema, optimizer, lr_scheduler,
                                                    scaler, loader_train, loader_val, total_steps), state)
        print(f'number of params: {trainer.n_parameters}')
        print(f'Start training for {num_epochs} epochs ({total_steps} steps of {steps_per_epoch} per epoch) from epoch '
              f'{state.start_epoch}: total batch {args.batch_size * self.world_size}, '
              f'lr {optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"]):.3g}')
        start_time, stop = time.time(), StopSignals()
        try:
            stats = trainer.train(num_epochs, stop)
        finally:
            stop.restore()
        print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
        return stats

    def _resume(self, task: Task, optimizer, scaler, steps_per_epoch: int) -> checkpoints.TrainingState:
        state = checkpoints.restore_training(
            self.checkpoint, self.resume_path, optimizer=optimizer, scaler=scaler, best_metric=task.best_metric,
            world_size=self.world_size, batch_size=self.args.batch_size, steps_per_epoch=steps_per_epoch,
            schedule_in_epochs=task.schedule_in_epochs, amp=self.args.amp,
            start_option='--finetune' if hasattr(self.args, 'finetune') else '--pretrained')
        ours = isinstance(self.checkpoint.get('args'), dict)  # the authors' flags mean other things
        now = {k.replace('-', '_'): v for k, v in self.config.items()}
        changed = {k: (v, now[k]) for k, v in (checkpoints.flags_of(self.checkpoint) if ours else {}).items()
                   if k in now and k not in IGNORED_CHANGES and v != now[k]}
        if changed:
            print('Changed since the checkpoint, applied: ' +
                  ', '.join(f'--{k.replace("_", "-")} {json.dumps(a)} -> {json.dumps(b)}'
                            for k, (a, b) in changed.items()))
        epoch = self.checkpoint['epoch']
        print(f'Resumed from {self.resume_path} (epoch {epoch}' +
              (f', step {state.first_step} of epoch {state.start_epoch}' if state.first_step else '') + ')')
        return state


def _format(stats: dict) -> str:
    return ', '.join(f'{k} {v:.3f}' if isinstance(v, float) else f'{k} {v}' for k, v in stats.items())
