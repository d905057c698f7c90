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

import allocator
import checkpoints
import distributed
import engine
import utils
from errors import UsageError
from model_ema import create_model_ema
from model_factory import channels_last_convs, check_compiler, compile_model, for_inference, match_gradient_layouts
from output_folder import OutputFolder
from trainer import RESUME_FILE, StopSignals, Trainer, TrainingSetup, print_evaluation

# Flags whose change does not change the training.
IGNORED_CHANGES = {
    'resume',
    'eval',
    'output_dir',
    'num_workers',
    'print_freq',
    'dist_timeout',
    'device',
    'data_path',
    'finetune',
    'pretrained',
    'start_epoch',
    'dist_backend',
    'deterministic',
}


@dataclass
class Task:
    """What a task gives the run."""

    model: torch.nn.Module
    dataset_val: torch.utils.data.Dataset
    evaluate: Callable  # (model, data loader) -> {metric: value}, the same on every process
    meta: dict  # kept in checkpoints and checked on resume (task, classes ...)
    val_batch_size: int
    shard_val: bool = True  # each process evaluates a disjoint share (else each the whole set)
    collate_fn: Optional[Callable] = None
    dataset_train: Optional[torch.utils.data.Dataset] = None
    train_sampler: Optional[Callable] = None  # (dataset, world size, rank) -> sampler; default: shuffled shards
    loss: Optional[Callable] = None  # (model, samples, targets) -> {name: loss}
    make_optimizer: Optional[Callable] = None  # (model) -> optimizer
    make_schedule: Optional[Callable] = None  # (optimizer, steps per epoch) -> (timm scheduler, total steps)
    schedule_in_epochs: bool = True  # False: the schedule counts steps whatever the process count (segmentation)
    evaluate_after: Callable = lambda steps_before, steps_after, total: True  # whether an epoch ends in evaluation
    ema: Optional[dict] = None  # ModelEmaV3 arguments, or None for no EMA
    fixed_input_size: bool = False  # every batch has the same size: cuDNN may benchmark its kernels once
    layout_probe: Optional[Callable] = None  # (model) -> (module, input) for match_gradient_layouts
    best_metric: Optional[str] = None  # keep best.pth (and best_ema.pth) by this metric
    max_norm: Optional[float] = None
    backup_every: int = 0  # keep backup{epoch}.pth every this many epochs
    log_extra: dict = field(default_factory=dict)
    length_flag: str = '--epochs'  # the flag that sets how long training runs
    warmup_flag: str = '--warmup-epochs'


def run_task(parser, args, model_flags, build_task: Callable, check_flags: Optional[Callable] = None) -> dict:
    """What an entry point's main does: a Run; `check_flags(args)` once the flags are final (the checkpoint's
    taken); the task built in it (data, model); then evaluate (--eval) or train. The output folder is made
    only after all of these succeeded."""
    with Run(parser, args, model_flags) as run:
        if check_flags is not None:
            try:
                check_flags(args)
            except UsageError as e:  # the same flags on every process: one line, from rank 0
                raise UsageError(str(e), everywhere=True) from None
        task = build_task(args, run)
        return run.evaluate(task) if args.eval else run.train(task)


class Run:
    """One invocation of an entry point: set up on creation, then `train(task)` or `evaluate(task)`."""

    def __init__(self, parser, args, model_flags=()):
        """Processes, device, precision and the output folder (checked, and locked if it exists; made by
        `create_output`); rank 0 decides what to resume, every process loads it, and the model flags it was
        trained with (`model_flags`, destinations) fill in those not given."""
        self.parser, self.args = parser, args
        distributed.init_distributed(args)
        print(f'C allocator: {allocator.describe()}')
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
        if args.compile:
            check_compiler(self.device)
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

    def create_output(self):
        """Make (and lock) the output folder on rank 0: once the inputs are known good, before the first write."""
        error = None
        if self.output is not None:
            try:
                self.output.create()
            except UsageError as e:
                error = str(e)
        distributed.agree(error)

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
                error = (
                    str(e)
                    if self.world_size == 1
                    else f'{e} (every process reads it: on several nodes the output folder must be shared)'
                )
                if own and path == own and os.path.isfile(path):
                    error += _other_resume_points(args.output_dir)
            distributed.agree(error)
            self.resume_path = path
            self.take_flags(self.checkpoint, model_flags, 'the checkpoint')
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

    def take_flags(self, checkpoint: dict, dests, source: str):
        """The flags `dests` (destinations) that the user did not give take `checkpoint`'s values; says which."""
        saved = checkpoints.flags_of(
            checkpoint, self.resume_path, self.parser, check=[d for d in dests if d not in self.args.given]
        )
        report_taken(source, {dest: saved[dest] for dest in dests if dest in saved}, self.args)

    # ---------------------------------------------------------------- data

    def _loader(self, dataset, batch_size, sampler, collate_fn, drop_last):
        return torch.utils.data.DataLoader(
            utils.SeededDataset(dataset),
            sampler=utils.SeededSampler(sampler, self.args.seed, self.rank),
            batch_size=batch_size,
            num_workers=self.args.num_workers,
            drop_last=drop_last,
            persistent_workers=self.args.num_workers > 0,  # kept across epochs; each sample's seed travels with it
            pin_memory=getattr(self.args, 'pin_mem', True) and self.device.type == 'cuda',
            collate_fn=utils.collate_or_error(collate_fn or torch.utils.data.default_collate),
        )

    def val_loader(self, task: Task):
        dataset = task.dataset_val
        if task.shard_val and self.world_size > 1:
            # A strided share per process, without the padding a DistributedSampler adds: no image counted twice.
            dataset = torch.utils.data.Subset(dataset, range(self.rank, len(dataset), self.world_size))
        return self._loader(
            dataset, task.val_batch_size, torch.utils.data.SequentialSampler(dataset), task.collate_fn, drop_last=False
        )

    def train_loader(self, task: Task):
        if task.train_sampler is not None:
            sampler = task.train_sampler(task.dataset_train, self.world_size, self.rank)
        else:
            sampler = torch.utils.data.DistributedSampler(
                task.dataset_train,
                num_replicas=self.world_size,
                rank=self.rank,
                shuffle=True,
                seed=self.args.seed,
                drop_last=True,
            )
        loader = self._loader(task.dataset_train, self.args.batch_size, sampler, task.collate_fn, drop_last=True)
        if len(loader) == 0:
            raise UsageError(
                f'the training set ({len(task.dataset_train)} images, {len(sampler)} per process and '
                f'epoch) is smaller than one batch of {self.args.batch_size}: lower --batch-size'
            )
        return loader

    # ---------------------------------------------------------------- model

    def _check_meta(self, task: Task):
        saved = self.checkpoint.get('meta')
        saved = saved if isinstance(saved, dict) else {}
        if task.meta.get('task') != 'classification' and 'task' not in saved:
            raise UsageError(
                f'{self.resume_path} is not a main_det.py / main_seg.py checkpoint: backbone weights (an '
                "ImageNet checkpoint, ours or the authors', or the authors' mmdet / mmseg one) go to "
                '--pretrained'
            )
        for key, value in task.meta.items():
            theirs = saved.get(key)
            if key in saved and theirs != value:
                if key == 'classes':
                    raise UsageError(
                        f'{self.resume_path} was trained on {len(theirs)} classes, this data set has '
                        f'{len(value)}: their class lists must match'
                    )
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
            print(
                "SyncBatchNorm needs NCCL: with gloo each process keeps its own BatchNorm statistics (rank 0's "
                'are copied to all before each evaluation)'
            )
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
                model, device_ids=[self.device.index] if self.device.type == 'cuda' else None
            )
        if self.args.compile:  # DDP inside: torch.compile splits the graph at DDP's buckets (gradients overlap)
            ddp = compile_model(ddp, self.device)
        return ddp, model, model_ema

    def inference_form(self, model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
        """What an evaluation runs: model_factory.for_inference (a copy unless `inplace`), compiled with --compile.
        A copy of the same model reuses the compiled code: torch.compile guards on the module's structure, not on
        the object."""
        model = for_inference(model, inplace=inplace)
        return compile_model(model, self.device) if self.args.compile else model

    # ---------------------------------------------------------------- evaluation only

    def evaluate(self, task: Task) -> dict:
        """--eval: the metrics of the weights and, when the checkpoint has them, of the EMA weights; written to
        OUTPUT_DIR/eval_results.json. The settings line holds the flags evaluation reads."""
        print(json.dumps(self.parser.evaluation_config(self.args)))
        self._select_kernels(task)
        _, model, model_ema = self._prepare_model(task, train=False)
        self.checkpoint = None  # loaded: its memory is free again
        if self.resume_path is None:
            print('No checkpoint given (--resume): evaluating the weights the model was built with')
        broken = utils.non_finite_tensors(model)
        if broken:
            raise FloatingPointError(
                f'the weights hold NaN or infinite values ({len(broken)} tensors, e.g. '
                f'{broken[0]}): nothing to evaluate'
            )
        self.create_output()
        loader = self.val_loader(task)
        stats = task.evaluate(for_inference(model, inplace=True), loader)
        print_evaluation('Weights', stats, len(task.dataset_val))
        results = dict(stats)
        if task.ema is not None:  # the EMA's numbers: null when the checkpoint has no EMA
            ema_stats = (
                dict.fromkeys(stats)
                if model_ema is None
                else task.evaluate(self.inference_form(model_ema.module, inplace=True), loader)
            )
            if model_ema is not None:
                print_evaluation('EMA weights', ema_stats, len(task.dataset_val))
            results.update({f'ema_{k}': v for k, v in ema_stats.items()})
        if not all(v is None or v == v and abs(v) != float('inf') for v in results.values()):
            raise FloatingPointError(
                f'the evaluation gave non-finite values ({utils.format_metrics(results)}): the weights are not usable'
            )
        if self.output is not None:
            self.output.write_text('eval_results.json', json.dumps(results, indent=2) + '\n')
            print(f'Results written to {self.output.file("eval_results.json")}')
        else:
            print('No --output_dir: no eval_results.json written (the results are the lines above)')
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
        if state.start_epoch >= num_epochs:
            return self._complete(task, state)
        self.create_output()
        if self.output is not None:
            self.output.write_text('config.yaml', yaml.safe_dump(config, sort_keys=False))
            self.output.restore_log(state.start_epoch - 1, state.last_log if self.own_checkpoint else None)
        warmup = getattr(lr_scheduler, 'warmup_t', 0)
        if warmup and warmup >= (num_epochs if lr_scheduler.t_in_epochs else total_steps):
            print(
                f'warning: the warm-up ({warmup} {"epochs" if lr_scheduler.t_in_epochs else "steps"}) covers the '
                f'whole run: the learning rate never reaches its set value (lower {task.warmup_flag})'
            )
        trainer = Trainer(
            self,
            task,
            TrainingSetup(
                model,
                model_without_ddp,
                model_ema,
                optimizer,
                lr_scheduler,
                scaler,
                loader_train,
                loader_val,
                total_steps,
            ),
            state,
        )
        print(f'number of params: {trainer.n_parameters}')
        start_time, stop = time.time(), StopSignals()  # before the announcement: a signal after it is handled
        print(
            f'Start training for {num_epochs} epochs ({total_steps} steps of {steps_per_epoch} per epoch) from epoch '
            f'{state.start_epoch}: total batch {args.batch_size * self.world_size}, '
            f'lr {optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"]):.3g}'
        )
        try:
            stats = trainer.train(num_epochs, stop)
        finally:
            stop.restore()
        print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
        return stats

    def _complete(self, task: Task, state: checkpoints.TrainingState) -> dict:
        """A finished run started again: nothing to train; its last evaluation's metrics."""
        flag = task.length_flag
        value = getattr(self.args, flag.lstrip('-').replace('-', '_'))
        print(
            f'The run is complete: {self.resume_path} (epoch {state.start_epoch - 1}, step {state.global_step}) '
            f'ends {flag} {value}; give {flag} above {value} to continue it'
        )
        last = state.last_log or {}
        return {
            k[len('test_') :]: v for k, v in last.items() if k.startswith('test_') and not k.startswith('test_ema_')
        }

    def _resume(self, task: Task, optimizer, scaler, steps_per_epoch: int) -> checkpoints.TrainingState:
        saved_opt, opt = checkpoints.flags_of(self.checkpoint).get('opt'), getattr(self.args, 'opt', None)
        if (
            'epoch' in self.checkpoint
            and isinstance(saved_opt, str)
            and opt is not None
            and saved_opt.lower() != opt.lower()
        ):
            raise UsageError(
                f'{self.resume_path} was trained with --opt {saved_opt}, whose state --opt {opt} cannot '
                f'continue: resume with --opt {saved_opt}, or start from its weights with --finetune'
            )
        state = checkpoints.restore_training(
            self.checkpoint,
            self.resume_path,
            optimizer=optimizer,
            scaler=scaler,
            best_metric=task.best_metric,
            world_size=self.world_size,
            batch_size=self.args.batch_size,
            steps_per_epoch=steps_per_epoch,
            schedule_in_epochs=task.schedule_in_epochs,
            amp=self.args.amp,
            start_option='--finetune' if hasattr(self.args, 'finetune') else '--pretrained',
        )
        ours = isinstance(self.checkpoint.get('args'), dict)  # the authors' flags mean other things
        now = {k.replace('-', '_'): v for k, v in self.config.items()}
        changed = {
            k: (v, now[k])
            for k, v in (checkpoints.flags_of(self.checkpoint) if ours else {}).items()
            if k in now and k not in IGNORED_CHANGES and v != now[k]
        }
        if changed:
            print(
                'Changed since the checkpoint, applied: '
                + ', '.join(
                    f'--{k.replace("_", "-")} {json.dumps(a)} -> {json.dumps(b)}' for k, (a, b) in changed.items()
                )
            )
        epoch = self.checkpoint['epoch']
        print(
            f'Resumed from {self.resume_path} (epoch {epoch}'
            + (f', step {state.first_step} of epoch {state.start_epoch}' if state.first_step else '')
            + ')'
        )
        return state


def report_taken(source: str, values: dict, args):
    """Set the flags of `values` ({destination: value}) that the user did not give, and print those that
    changed."""
    taken = {}
    for dest, value in values.items():
        if dest not in args.given and value != getattr(args, dest):
            setattr(args, dest, value)
            taken[dest] = value
    if taken:
        print(
            f'From {source} (give a flag to override): '
            + ', '.join(f'--{k.replace("_", "-")} {json.dumps(v)}' for k, v in taken.items())
        )


def _other_resume_points(folder: str) -> str:
    """For the message about a damaged checkpoint.pth: the whole checkpoints beside it a run can resume from."""
    others = checkpoints.resumable_checkpoints(folder, exclude=RESUME_FILE)
    if not others:
        return ''
    first = others[0].split(' (')[0]
    return (
        f'; whole checkpoints in {folder} to resume from: {", ".join(others)} (e.g. --resume '
        f'{os.path.join(folder, first)})'
    )
