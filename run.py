"""A run of an entry point (main.py, main_det.py, main_seg.py): `Run` sets up the processes, device, precision and
output folder and finds what to resume; `prepare` puts the model on its device with its EMA and resumed weights;
then `evaluate`, or `train`: the epoch loop (train, check, evaluate, keep the best, save, log) and the stop signals.

Guarantees (tests/test_train*.py): every random draw is a function of (seed, epoch, rank, position), so a run
resumed at an epoch boundary or after a signal mid-epoch ends bit-identical to one never stopped; `checkpoint.pth`,
the resume point, is only replaced by a whole file with finite weights and a finite evaluation loss; log.txt and
the TensorBoard events hold each epoch exactly once after any kill; SIGTERM / SIGUSR1 to any process (loader
workers included) stop every process after the same step with a resumable checkpoint; one run per folder."""

import datetime
import json
import math
import os
import signal
import time
from typing import Callable, Optional

import torch
import yaml
from timm.utils import ModelEmaV3

import checkpoints
import distributed
import engine
import utils
from errors import Preempted, UsageError
from model_factory import channels_last_convs, check_compiler, compile_model, inference_form, match_gradient_layouts
from output_folder import OutputFolder

RESUME_FILE = 'checkpoint.pth'
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what clusters send before they kill a job
# Flags whose change does not change the training (the others are listed when a run resumes).
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
    'pin_mem',
}


class Run:
    """One invocation of an entry point; a context manager that releases the output folder at the end."""

    def __init__(self, parser, args, model_flags=()):
        """Processes, device, precision, the output folder (checked, and locked if it exists) and the checkpoint to
        resume (--resume, else the output folder's own), whose model flags (`model_flags`) fill in those not given."""
        self.parser, self.args = parser, args
        distributed.init_distributed(args)
        utils.keep_freed_memory()
        self.device, self.world_size = args.device, args.world_size
        args.amp = args.amp or ('fp16' if self.device.type == 'cuda' else 'none')
        self.amp_dtype = utils.AMP_DTYPES[args.amp]
        if args.num_workers is None:
            cores = len(os.sched_getaffinity(0)) // int(os.environ.get('LOCAL_WORLD_SIZE', 1))
            args.num_workers = min(args.default_num_workers, max(cores, 1))
        if args.deterministic:
            os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # before cuBLAS starts
            torch.use_deterministic_algorithms(True)
        if self.device.type == 'cuda':  # cuDNN benchmarks each new input size: only for fixed sizes
            torch.backends.cudnn.benchmark = not args.deterministic and getattr(args, 'input_size', None) is not None
        if args.compile:
            check_compiler(self.device)
        utils.seed_everything(args.seed)  # the initial weights (DDP gives every process rank 0's)
        self.output, error = None, None
        if args.output_dir and distributed.is_main_process():
            try:
                self.output = OutputFolder(args.output_dir)
            except UsageError as e:
                error = str(e)
        distributed.agree(error)
        self.checkpoint, self.resume_path = None, None
        own = os.path.join(args.output_dir, RESUME_FILE) if args.output_dir else None
        path = args.resume or (own if own and os.path.isfile(own) else '')
        if args.resume and not args.eval and own and os.path.isfile(own) and not _same_folder(args.resume, own):
            raise UsageError(
                f'--output_dir {args.output_dir} holds a run of its own ({RESUME_FILE}): continue it without '
                f'--resume, or give a new --output_dir to continue {args.resume}',
                everywhere=True,
            )
        if path:
            error = None
            try:
                self.checkpoint = checkpoints.load_checkpoint(path)
            except UsageError as e:
                error = str(e) + (
                    '' if self.world_size == 1 else ' (on several nodes the output folder must be shared)'
                )
            distributed.agree(error)
            self.resume_path = path
            flags = checkpoints.flags_of(self.checkpoint)
            values = {dest: flags[dest] for dest in model_flags if dest in flags}
            for action in parser._actions:  # a checkpoint of the other dense entry point: its --task
                taken = action.dest in values and action.dest not in args.given
                if taken and action.choices and values[action.dest] not in action.choices:
                    raise UsageError(
                        f'{path} was trained with {action.option_strings[0]} {values[action.dest]}, which '
                        f'{parser.prog} does not take (it takes {", ".join(map(str, action.choices))})',
                        everywhere=True,
                    )
            self.take_flags('the checkpoint', values)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.output is not None:
            self.output.close()

    def take_flags(self, source: str, values: dict):
        """The flags of `values` ({destination: value}) that the user did not give take those values; says which."""
        taken = {k: v for k, v in values.items() if k not in self.args.given and v != getattr(self.args, k)}
        for dest, value in taken.items():
            setattr(self.args, dest, value)
        if taken:
            listed = ', '.join(f'--{k.replace("_", "-")} {json.dumps(v)}' for k, v in taken.items())
            print(f'From {source} (give a flag to override): {listed}')

    def create_output(self):
        """Make and lock the output folder (rank 0): once the inputs are known good, before the first write."""
        error = None
        if self.output is not None:
            try:
                self.output.create()
            except UsageError as e:
                error = str(e)
        distributed.agree(error)

    def val_loader(self, dataset, batch_size: int, sharded: bool, collate_fn=None):
        """Sharded: a strided share per process, without a DistributedSampler's padding (no image counted twice)."""
        if sharded and self.world_size > 1:
            dataset = torch.utils.data.Subset(dataset, range(self.args.rank, len(dataset), self.world_size))
        sampler = torch.utils.data.SequentialSampler(dataset)
        return utils.data_loader(dataset, sampler, batch_size, self.args, collate_fn)

    # ---------------------------------------------------------------- the model

    def prepare(self, model, meta: dict, ema: Optional[dict] = None, probe=None, train: bool = True):
        """The model on its device (channels-last convs; for training SyncBatchNorm with NCCL and, from one backward
        of `probe` = (module, example input), parameters in their gradients' layout), its EMA (`ema`: ModelEmaV3's
        arguments; for --eval only when the checkpoint has one) and the resumed weights. Returns (model, EMA)."""
        if self.checkpoint is not None:
            self._check_meta(meta)
        if train and self.world_size > 1 and self.args.dist_backend == 'nccl':
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        channels_last_convs(model)
        if train and probe is not None:
            match_gradient_layouts(*probe, self.amp_dtype)
        has_ema = isinstance((self.checkpoint or {}).get('model_ema'), dict)
        model_ema = ModelEmaV3(model, **ema) if ema is not None and (train or has_ema) else None
        if self.checkpoint is not None:
            checkpoints.load_weights(model, self.checkpoint, self.resume_path, self.args.model)
            if model_ema is not None and has_ema:
                checkpoints.load_weights(model_ema.module, self.checkpoint, self.resume_path, self.args.model, ema=True)
            elif model_ema is not None:
                model_ema.set(model)
        return model, model_ema

    def _check_meta(self, meta: dict):
        saved = self.checkpoint.get('meta') if isinstance(self.checkpoint.get('meta'), dict) else {}
        if meta.get('task') != 'classification' and 'task' not in saved:
            raise UsageError(
                f'{self.resume_path} is not a main_det.py / main_seg.py checkpoint: backbone weights (an ImageNet '
                "checkpoint, ours or the authors', or the authors' mmdet / mmseg one) go to --pretrained"
            )
        for key, value in meta.items():
            if key in saved and value is not None and saved[key] is not None and saved[key] != value:
                if key == 'classes':
                    raise UsageError(
                        f'{self.resume_path} was trained on other classes ({len(saved[key])}: '
                        f'{", ".join(map(str, saved[key][:3]))} ...) than this data set has ({len(value)}: '
                        f'{", ".join(map(str, value[:3]))} ...): use the data it was trained on'
                    )
                raise UsageError(f'{self.resume_path} has {key} {saved[key]!r}, this run {value!r}')

    def _inference_copy(self, model):
        """What an evaluation runs: the inference form of a copy, on the run's device (an EMA kept on the CPU is
        evaluated there too), compiled with --compile (a copy of the same model reuses the compiled code)."""
        model = inference_form(model).to(self.device)
        return compile_model(model, self.device) if self.args.compile else model

    # ---------------------------------------------------------------- --eval

    def evaluate(self, model, model_ema, loader_val, evaluate: Callable) -> dict:
        """The metrics of the weights and, when the checkpoint has them, of the EMA weights (`evaluate(model, loader,
        amp_dtype)`); written to OUTPUT_DIR/eval_results.json."""
        if self.resume_path is None:
            print('No checkpoint given (--resume): evaluating the weights the model was built with')
        broken = utils.non_finite_tensors(model)
        if broken:
            raise FloatingPointError(f'the weights hold NaN or infinite values (e.g. {broken[0]}): nothing to evaluate')
        self.checkpoint = None  # loaded: its memory is free again
        self.create_output()
        model = inference_form(model, inplace=True)
        stats = evaluate(compile_model(model, self.device) if self.args.compile else model, loader_val, self.amp_dtype)
        print(f'* Weights: {utils.format_metrics(stats)} ({len(loader_val.dataset)} images)')
        results = dict(stats)
        if model_ema is not None:
            ema_stats = evaluate(self._inference_copy(model_ema.module), loader_val, self.amp_dtype)
            print(f'* EMA weights: {utils.format_metrics(ema_stats)} ({len(loader_val.dataset)} images)')
            results.update({f'ema_{k}': v for k, v in ema_stats.items()})
        if self.output is not None:
            self.output.write_text('eval_results.json', json.dumps(results, indent=2) + '\n')
            print(f'Results written to {self.output.file("eval_results.json")}')
        return results

    # ---------------------------------------------------------------- training

    def train(
        self,
        model,
        model_ema,
        optimizer,
        lr_scheduler,
        loader_train,
        loader_val,
        evaluate: Callable,
        *,
        meta: dict,
        total_steps: int,
        criterion: Optional[Callable] = None,
        mixup_fn: Optional[Callable] = None,
        max_norm: Optional[float] = None,
        steps_fixed: bool = False,
        eval_interval: Optional[int] = None,
        best_metric: Optional[str] = None,
        backup_every: int = 0,
        length_flag: str = '--epochs',
        schedule_lag: int = 0,
    ) -> dict:
        """Train for `total_steps` with evaluation (after every epoch, or after the epoch that passes each multiple
        of `eval_interval` steps, and the last), checkpoints and logs; returns the last evaluation's metrics.
        `steps_fixed`: the schedule counts steps whatever the process count and batch (segmentation);
        `schedule_lag` 1: epoch e trains at the schedule's lr(e - 1), as the authors' loop steps it."""
        args, config = self.args, self.parser.to_config(self.args)
        print(json.dumps(config))
        steps_per_epoch, scaler = len(loader_train), engine.grad_scaler(self.device, self.amp_dtype)
        state = checkpoints.TrainingState(start_epoch=getattr(args, 'start_epoch', 0))
        if self.checkpoint is not None:
            state = self._resume(optimizer, scaler, steps_per_epoch, steps_fixed)
        self.checkpoint = None  # loaded: its memory (weights, EMA, optimizer state) is free again
        if steps_fixed:  # the steps already done, whatever the process count and batch they were taken with
            left = max(total_steps - state.global_step, 0) + state.first_step
            num_epochs = state.start_epoch + math.ceil(left / steps_per_epoch)
        else:
            num_epochs = math.ceil(total_steps / steps_per_epoch)
        if state.start_epoch >= num_epochs:
            value = getattr(args, length_flag.lstrip('-').replace('-', '_'))
            print(
                f'The run is complete: {self.resume_path} (epoch {state.start_epoch - 1}, step {state.global_step}) '
                f'ends {length_flag} {value}; give {length_flag} above {value} to continue it'
            )
            return {k[5:]: v for k, v in (state.last_log or {}).items() if k.startswith('test_') and 'ema' not in k}
        self.create_output()
        if self.output is not None:
            self.output.write_text('config.yaml', yaml.safe_dump(config, sort_keys=False))
            own = self.resume_path and _same_folder(self.resume_path, self.output.file(RESUME_FILE))
            self.output.restore_log(state.start_epoch - 1, state.last_log if own else None)
        self._say_what_is_left_out(lr_scheduler, num_epochs, total_steps, loader_train)
        ddp = model
        if self.world_size > 1:
            # --deterministic: no bucket rebuild after the first step, which would give the steps after a resume
            # another gradient buffer layout, and a ring all-reduce another summation order, than the run never
            # stopped (4 processes: tests/test_preemption.py).
            device_ids = [self.device.index] if self.device.type == 'cuda' else None
            ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=device_ids, find_unused_parameters=args.deterministic
            )
        if args.compile:  # DDP inside: the graph splits at DDP's buckets, gradients overlap
            ddp = compile_model(ddp, self.device)
        n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f'number of params: {n_parameters}')
        parts = dict(
            model=model,
            model_ema=model_ema,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            scaler=scaler,
            state=state,
            args=config,
            meta=meta,
            world_size=self.world_size,
        )  # what checkpoints hold
        stats, start_time = {}, time.time()
        with StopSignals() as stop:  # before the announcement: a signal after it is handled
            lr = optimizer.param_groups[0].get('initial_lr', optimizer.param_groups[0]['lr'])
            try:  # from the announcement on: Ctrl-C after it names the resume point
                print(
                    f'Start training for {num_epochs} epochs ({total_steps} steps of {steps_per_epoch} per epoch) '
                    f'from epoch {state.start_epoch}: total batch {args.batch_size * self.world_size}, lr {lr:.3g}'
                )
                for epoch in range(state.start_epoch, num_epochs):
                    loader_train.sampler.set_epoch(epoch)
                    loader_train.sampler.skip(state.first_step * args.batch_size)
                    lr_scheduler.step(max(epoch - schedule_lag, 0))
                    steps_before = state.global_step - state.first_step
                    result = engine.train_one_epoch(
                        ddp,
                        criterion,
                        loader_train,
                        optimizer,
                        scaler,
                        self.device,
                        epoch,
                        amp_dtype=self.amp_dtype,
                        mixup_fn=mixup_fn,
                        lr_scheduler=lr_scheduler,
                        model_ema=model_ema,
                        max_norm=max_norm,
                        seed=args.seed,
                        first_step=state.first_step,
                        global_step=state.global_step,
                        last_step=total_steps,
                        totals=state.totals,
                        stop_requested=stop,
                        print_freq=args.print_freq,
                    )
                    state.global_step, state.first_step, state.totals = result.global_step, 0, None
                    if result.stopped and result.steps < steps_per_epoch and result.global_step < total_steps:
                        progress = {'steps': result.steps, 'global_step': result.global_step, 'totals': result.totals}
                        self._save(checkpoints.training_checkpoint(epoch=epoch - 1, progress=progress, **parts))
                        raise Preempted(
                            f'{stop.received or "a stop signal (to another process)"} received during '
                            f'epoch {epoch}; stopped after {result.steps} of its {steps_per_epoch} steps'
                            f'{self._resumes()}'
                        )
                    evaluation, names = {}, [RESUME_FILE]  # the resume point written last
                    if (
                        eval_interval is None
                        or state.global_step // eval_interval > steps_before // eval_interval
                        or (state.global_step >= total_steps)
                    ):
                        evaluation, improved = self._evaluate(
                            epoch, model, model_ema, loader_val, evaluate, state, best_metric
                        )
                        stats, names = {k: v for k, v in evaluation.items() if 'ema_' not in k}, improved + names
                    if backup_every and epoch % backup_every == 0:
                        names.insert(0, f'backup{epoch}.pth')
                    state.last_log = {
                        'epoch': epoch,
                        'step': state.global_step,
                        'n_parameters': n_parameters,
                        **{f'train_{k}': v for k, v in result.stats.items()},
                        **{f'test_{k}': v for k, v in evaluation.items()},
                    }
                    self._save(checkpoints.training_checkpoint(epoch=epoch, **parts), *names)
                    if self.output is not None:
                        self.output.append_log(state.last_log)
                    if epoch + 1 < num_epochs and distributed.all_reduce_sum([float(stop())])[0]:
                        raise Preempted(
                            f'{stop.received or "a stop signal (to another process)"} received during '
                            f'epoch {epoch}; stopped after it{self._resumes()}'
                        )
            except KeyboardInterrupt:  # Ctrl-C: say where the run can resume
                raise KeyboardInterrupt(self._resume_point(state)) from None
        print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
        return stats

    def _say_what_is_left_out(self, lr_scheduler, num_epochs: int, total_steps: int, loader_train):
        args = self.args
        warmup = getattr(lr_scheduler, 'warmup_t', 0)
        if warmup and warmup >= (num_epochs if lr_scheduler.t_in_epochs else total_steps):
            print('warning: the warm-up covers the whole run: the learning rate never reaches its set value')
        used, images = len(loader_train) * args.batch_size * self.world_size, len(loader_train.dataset)
        if used < images:
            print(
                f'note: {images - used} of the {images} training images are left out of each epoch (incomplete '
                'batches); a --batch-size that divides the images of each process uses them all'
            )
        if not args.output_dir:
            print('warning: no --output_dir: nothing is saved (no checkpoint, no log)')

    def _evaluate(self, epoch, model, model_ema, loader_val, evaluate, state, best_metric):
        """Evaluate the weights and the EMA weights of an epoch (finite weights and loss, or the run stops unsaved);
        returns the metrics (`ema_` for the EMA's) and the best*.pth files they earn."""
        weights = [model] + ([model_ema.module] if model_ema is not None else [])
        broken = utils.non_finite_tensors(*weights)
        if broken:
            raise FloatingPointError(
                f'epoch {epoch} ended with NaN or infinite weights (e.g. {broken[0]}): not saved; '
                f'{self._resume_point(state)}'
            )
        if self.world_size > 1 and self.args.dist_backend != 'nccl':  # no SyncBatchNorm: rank 0's statistics
            distributed.broadcast_buffers(*weights)
        stats, improved = {}, []
        for prefix, label, module in zip(('', 'ema_'), ('Weights', 'EMA weights'), weights):
            result = evaluate(self._inference_copy(module), loader_val, self.amp_dtype)
            print(f'* {label}: {utils.format_metrics(result)} ({len(loader_val.dataset)} images)')
            if not prefix and not math.isfinite(result.get('loss', 0.0)):
                raise FloatingPointError(
                    f'epoch {epoch} gives an evaluation loss of {result["loss"]}: not saved; '
                    f'{self._resume_point(state)}'
                )
            key = f'{best_metric}{"_ema" if prefix else ""}'
            if (
                best_metric
                and result.get(best_metric) is not None
                and result[best_metric] > state.best.get(key, -math.inf)
            ):
                state.best[key] = result[best_metric]
                improved.append(f'best{"_ema" if prefix else ""}.pth')
            stats.update({prefix + k: v for k, v in result.items()})
        if state.best:
            print('Best: ' + ', '.join(f'{k} {v:.2f}' for k, v in state.best.items()))
        return stats, improved

    def _save(self, checkpoint: dict, *names: str):
        """One serialisation under every name, in order (the resume point last); the other processes wait."""
        if self.output is not None:
            checkpoints.save_checkpoint(checkpoint, *map(self.output.file, names or [RESUME_FILE]))
        distributed.barrier()

    def _resumes(self) -> str:
        if not self.args.output_dir:
            return ' (no --output_dir: nothing saved)'
        return f': {os.path.join(self.args.output_dir, RESUME_FILE)} resumes there (run the same command again)'

    def _resume_point(self, state) -> str:
        if not self.args.output_dir:
            return 'nothing is saved without --output_dir'
        if state.last_log is None:
            return 'no checkpoint was written yet'
        path = os.path.join(self.args.output_dir, RESUME_FILE)
        return f'the resume point stays {path} of epoch {state.last_log["epoch"]}'

    def _resume(self, optimizer, scaler, steps_per_epoch: int, steps_fixed: bool) -> checkpoints.TrainingState:
        flags, args = checkpoints.flags_of(self.checkpoint), self.args
        if (
            'epoch' in self.checkpoint
            and isinstance(flags.get('opt'), str)
            and flags['opt'].lower() != getattr(args, 'opt', flags['opt']).lower()
        ):
            raise UsageError(
                f'{self.resume_path} was trained with --opt {flags["opt"]}, whose state --opt {args.opt} '
                'cannot continue: resume with its --opt, or start from its weights with --finetune'
            )
        state = checkpoints.restore_training(
            self.checkpoint,
            self.resume_path,
            optimizer=optimizer,
            scaler=scaler,
            world_size=self.world_size,
            batch_size=args.batch_size,
            steps_per_epoch=steps_per_epoch,
            steps_fixed=steps_fixed,
            amp=args.amp,
        )
        if isinstance(self.checkpoint.get('args'), dict):  # ours (the authors' flags mean other things)
            now = {k.replace('-', '_'): v for k, v in self.parser.to_config(args).items()}
            changed = {
                k: (v, now[k]) for k, v in flags.items() if k in now and k not in IGNORED_CHANGES and v != now[k]
            }
            if changed:
                print(
                    'Changed since the checkpoint, applied: '
                    + ', '.join(
                        f'--{k.replace("_", "-")} {json.dumps(a)} -> {json.dumps(b)}' for k, (a, b) in changed.items()
                    )
                )
        progress = f', step {state.first_step} of epoch {state.start_epoch}' if state.first_step else ''
        print(f'Resumed from {self.resume_path} (epoch {self.checkpoint["epoch"]}{progress})')
        return state


def _same_folder(a: str, b: str) -> bool:
    return os.path.dirname(os.path.realpath(a)) == os.path.dirname(os.path.realpath(b))


class StopSignals:
    """SIGTERM and SIGUSR1 ask the run to stop (a repeated signal, from the cluster and from torchrun, counts once):
    noticed between steps, agreed by all processes where the host next reads the losses (every --print-freq steps,
    engine.train_one_epoch). Computing, evaluating and saving are never cut short."""

    def __enter__(self):
        self.received = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name

    def __call__(self) -> bool:
        return self.received is not None

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
