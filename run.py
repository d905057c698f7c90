"""The run that main.py, main_det.py and main_seg.py share: processes (torchrun, srun), device and
precision, the output folder (a lock, config.yaml, log.txt, TensorBoard), resuming, the model's wrapping
(SyncBatchNorm, EMA, DistributedDataParallel), the epoch loop with evaluation, checkpoints and signals.

A task (classification, detection, segmentation) gives a `Task`: its model, data, loss, optimizer,
schedule and evaluation. Guarantees, all tested with one and with two processes:
- every random draw is a function of (seed, epoch, rank, position), so a run resumed at an epoch boundary or
  after a signal mid-epoch ends bit-identical to one never stopped, and resuming with another process
  count works;
- `checkpoint.pth`, the resume point, is only ever replaced by a whole file with finite weights (and a finite
  evaluation loss); `log.txt` and the TensorBoard events hold each epoch exactly once after any kill;
- SIGTERM / SIGUSR1 stop every process after the same step, write a resumable checkpoint and exit with 3;
- one run at a time per output folder.
"""
import copy
import datetime
import fcntl
import functools
import json
import os
import re
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import timm
import timm.utils
import torch
import torch.distributed as dist
import yaml
from timm.utils import ModelEmaV3

import checkpoints
import engine
import models
import utils
from cli import COUNT, FRACTION, NON_NEGATIVE_INT, POSITIVE, Preempted, UsageError, json_object

AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
RESUME_FILE = 'checkpoint.pth'
LOG_FILE = 'log.txt'
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def add_run_arguments(parser, *, model: str, batch_size: int, num_workers: int, print_freq: int):
    """The flags every entry point shares."""
    parser.add_argument('--model', default=model, metavar='MODEL',
                        help='RAVLT_T, RAVLT_S, RAVLT_B, RAVLT_L (or ravlt_t ...)')
    parser.add_argument('--model-kwargs', default=None, type=json_object, metavar='JSON',
                        help='extra model arguments as a JSON object, e.g. \'{"embed_dims": [32, 64, 128, 256], '
                        '"depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8]}\' (a mapping in a config file)')
    parser.add_argument('--drop-path', type=FRACTION, default=None, metavar='RATE',
                        help="stochastic depth rate (default: the variant's own, models.RAVLT_CONFIGS)")
    parser.add_argument('--batch-size', default=batch_size, type=COUNT, help='images per process and step')
    parser.add_argument('--data-path', default='', help='data folder')
    parser.add_argument('--resume', default='', help='resume from this checkpoint (default: OUTPUT_DIR/'
                        'checkpoint.pth if it exists); with --eval, evaluate it. The model flags it was trained '
                        'with apply unless given again')
    parser.add_argument('--eval', action='store_true', help='evaluate only')
    parser.add_argument('--output_dir', '--output-dir', default='', help='where to write checkpoints and logs '
                        '(empty: write nothing)')
    parser.add_argument('--device', default=None, choices=['cpu', 'cuda'], help='default: cuda if available')
    parser.add_argument('--amp', default=None, choices=list(AMP_DTYPES),
                        help='autocast precision (default: fp16 on CUDA, as the authors, none on the CPU)')
    parser.add_argument('--seed', default=0, type=NON_NEGATIVE_INT)
    parser.add_argument('--num_workers', '--num-workers', default=None, type=NON_NEGATIVE_INT,
                        help=f'data loading processes per training process (default: {num_workers}, or the CPU '
                        'cores per process if fewer)')
    parser.add_argument('--print-freq', default=print_freq, type=COUNT, metavar='N', help='print every N steps')
    parser.add_argument('--dist-timeout', default=60, type=POSITIVE, metavar='MINUTES',
                        help='how long a process waits for the others in a collective (rank 0 alone scores COCO '
                        'and writes checkpoints meanwhile) before the run fails')
    parser.set_defaults(default_num_workers=num_workers)


# ----------------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------------

def first_slurm_host(nodelist: str) -> Optional[str]:
    """The first host of a SLURM node list ('gpu[03-05,9],cpu1' -> 'gpu03')."""
    found = re.match(r'([^\[,]+)(?:\[([^\],]+))?', nodelist.strip())
    if not found:
        return None
    prefix, ranges = found.groups()
    return prefix + (ranges.split('-')[0] if ranges else '')


def launch_environment(env=None) -> dict:
    """RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR / MASTER_PORT) of this process: from torchrun, or from
    srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), as DeiT reads them."""
    env = os.environ if env is None else env
    if 'RANK' in env and 'WORLD_SIZE' in env:
        return {k: env[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT') if k in env}
    tasks = int(env.get('SLURM_STEP_NUM_TASKS', env.get('SLURM_NTASKS', 1)))
    if 'SLURM_PROCID' not in env or tasks <= 1:
        return {'RANK': '0', 'WORLD_SIZE': '1', 'LOCAL_RANK': '0'}
    address = env.get('MASTER_ADDR') or first_slurm_host(env.get('SLURM_STEP_NODELIST', env.get('SLURM_NODELIST', '')))
    if not address:
        raise UsageError('under srun, set MASTER_ADDR to the first node of the job (e.g. export MASTER_ADDR=$(scontrol '
                         'show hostnames "$SLURM_JOB_NODELIST" | head -n 1)), or launch with torchrun')
    return {'RANK': env['SLURM_PROCID'], 'WORLD_SIZE': str(tasks), 'LOCAL_RANK': env.get('SLURM_LOCALID', '0'),
            'MASTER_ADDR': address, 'MASTER_PORT': env.get('MASTER_PORT', '29500')}


def init_distributed(args):
    """Sets args.rank, world_size, local_rank, distributed and device (a torch.device), and under torchrun or
    srun the process group (NCCL on CUDA, gloo on the CPU) with the --dist-timeout. Then only rank 0 prints."""
    launch = launch_environment()
    os.environ.update(launch)  # torch's env:// initialisation and our error lines read them
    args.rank, args.world_size = int(launch['RANK']), int(launch['WORLD_SIZE'])
    args.local_rank = int(launch.get('LOCAL_RANK', 0))
    args.distributed = args.world_size > 1
    requested = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if requested == 'cuda':
        if not torch.cuda.is_available():
            raise UsageError('--device cuda was asked for but CUDA is not available; use --device cpu')
        if args.local_rank >= torch.cuda.device_count():
            raise UsageError(f'local rank {args.local_rank} but this node has {torch.cuda.device_count()} GPUs: start '
                             'one process per GPU (torchrun --nproc_per_node, srun --ntasks-per-node)')
        torch.cuda.set_device(args.local_rank)
        args.device = torch.device('cuda', args.local_rank)
    else:
        args.device = torch.device('cpu')
    if args.distributed:
        nccl = args.device.type == 'cuda'
        dist.init_process_group(backend='nccl' if nccl else 'gloo', init_method='env://',
                                world_size=args.world_size, rank=args.rank,
                                timeout=datetime.timedelta(minutes=args.dist_timeout),
                                device_id=args.device if nccl else None)
        utils.silence_unless_main()
        if int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', 0)) and \
                os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
            print('warning: with torchrun --max-restarts, also set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: restarted '
                  "workers can otherwise read the killed workers' addresses from torchrun's store and hang "
                  '(pytorch/pytorch#135712)')


def agree(error: Optional[str]):
    """Every process stops together, with the same one line (rank 0 prints it), when any of them failed."""
    message = utils.first_error(error)
    if message is not None:
        raise UsageError(message, everywhere=True)


class StopSignals:
    """SIGTERM and SIGUSR1 (what clusters send before they kill a job) ask the run to stop: noticed between
    steps, agreed by all processes at the next step (see engine.optimizer_step)."""

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


# ----------------------------------------------------------------------------------------------------
# The output folder
# ----------------------------------------------------------------------------------------------------

class OutputFolder:
    """Rank 0's hold on --output_dir: an exclusive lock for the run's lifetime (the kernel drops it when the
    process dies, killed or not), and the files: config.yaml, log.txt, TensorBoard events, checkpoints."""

    def __init__(self, path: str):
        self.path, self.writer = path, None
        try:
            os.makedirs(path, exist_ok=True)
            tempfile.TemporaryFile(dir=path).close()
        except FileExistsError:
            raise UsageError(f'--output_dir {path} exists and is not a folder') from None
        except NotADirectoryError:
            raise UsageError(f'--output_dir {path} lies under a file, not a folder') from None
        except OSError as e:
            raise UsageError(f'cannot write to --output_dir {path} ({e.strerror.lower()}): choose a writable '
                             'folder') from None
        self._lock = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise UsageError(f'another run is using --output_dir {path} right now: wait for it to end or choose '
                             'another folder') from None
        removed = checkpoints.remove_stale_temporaries(path)
        if removed:
            print(f'Removed {len(removed)} temporary file(s) left by an interrupted save: {", ".join(removed)}')

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_text(self, name: str, text: str):
        """Replace a small file atomically."""
        with checkpoints.atomic_file(self.file(name), 'w') as f:
            f.write(text)

    def read_log(self) -> list:
        """The complete JSON lines of log.txt (a line cut off by a kill is left out)."""
        entries = []
        if os.path.isfile(self.file(LOG_FILE)):
            with open(self.file(LOG_FILE)) as f:
                for line in f:
                    try:
                        entries.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get('epoch'), int)]

    def restore_log(self, last_epoch: int, last_entry: Optional[dict]):
        """At a (re)start: log.txt holds each epoch up to `last_epoch` (the resumed checkpoint's) exactly once,
        that epoch's line from the checkpoint when it has it (a kill may have come before the line was written),
        and the TensorBoard events are rewritten from it."""
        entries = self.read_log()
        last = [last_entry] if last_entry is not None else [e for e in entries if e['epoch'] == last_epoch][-1:]
        entries = [e for e in entries if e['epoch'] < last_epoch] + last
        self.write_text(LOG_FILE, ''.join(json.dumps(e) + '\n' for e in entries))
        for name in os.listdir(self.path):
            if name.startswith('events.out.tfevents.'):
                os.remove(self.file(name))
        for entry in entries:
            self._add_scalars(entry)

    def append_log(self, entry: dict):
        with open(self.file(LOG_FILE), 'a') as f:
            f.write(json.dumps(entry) + '\n')
        self._add_scalars(entry)

    def _add_scalars(self, entry: dict):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(self.path)
        for key, value in entry.items():
            if key not in ('epoch', 'step', 'n_parameters') and isinstance(value, (int, float)):
                self.writer.add_scalar(key.replace('_', '/', 1), value, entry['epoch'])
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
        os.close(self._lock)


# ----------------------------------------------------------------------------------------------------
# The task and the run
# ----------------------------------------------------------------------------------------------------

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
    best_metric: Optional[str] = None  # keep best.pth (and best_ema.pth) by this metric
    max_norm: Optional[float] = None
    backup_every: int = 0           # keep backup{epoch}.pth every this many epochs
    log_extra: dict = field(default_factory=dict)


class Run:
    """One invocation of an entry point: set up on creation, then `train(task)` or `evaluate(task)`."""

    def __init__(self, parser, args, model_flags=()):
        """Processes, device, precision and the output folder; rank 0 decides what to resume, every process
        loads it, and the model flags it was trained with (`model_flags`, destinations) fill in those not given."""
        self.parser, self.args = parser, args
        init_distributed(args)
        self.device, self.rank, self.world_size = args.device, args.rank, args.world_size
        args.amp = args.amp or ('fp16' if self.device.type == 'cuda' else 'none')
        self.amp_dtype = AMP_DTYPES[args.amp]
        cores = len(os.sched_getaffinity(0)) // max(int(os.environ.get('LOCAL_WORLD_SIZE', 1)), 1)
        if args.num_workers is None:
            args.num_workers = min(args.default_num_workers, max(cores, 1))
        if self.device.type == 'cuda':
            torch.backends.cudnn.benchmark = True
        utils.seed_everything(args.seed)  # the model's initial weights (DDP gives every process rank 0's)
        self.output = self._open_output()
        try:
            self._find_checkpoint(model_flags)
        except BaseException:
            self.close()
            raise

    def _open_output(self) -> Optional['OutputFolder']:
        output, error = None, None
        if self.args.output_dir and utils.is_main_process():
            try:
                output = OutputFolder(self.args.output_dir)
            except UsageError as e:
                error = str(e)
        agree(error)
        return output

    def _find_checkpoint(self, model_flags):
        """Rank 0 decides what to resume (--resume, else the output folder's checkpoint.pth); every process reads it."""
        args = self.args
        self.checkpoint, self.resume_path = None, None
        own = os.path.join(args.output_dir, RESUME_FILE) if args.output_dir else None
        path = utils.broadcast_object(args.resume or (own if own and os.path.isfile(own) else ''))
        if path:
            error = None
            try:
                self.checkpoint = checkpoints.load_checkpoint(path)
            except UsageError as e:
                error = str(e) if self.world_size == 1 else f'{e} (every process reads it: on several nodes the ' \
                    'output folder must be shared)'
            agree(error)
            self.resume_path = path
            self._take_model_flags(model_flags)
        self.own_checkpoint = bool(path) and own is not None and os.path.abspath(path) == os.path.abspath(own)

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
        if isinstance(self.checkpoint.get('args'), dict):
            saved = self.parser.from_config(saved)
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

    def _prepare_model(self, task: Task, train: bool):
        """The model on its device, its EMA, the resumed weights, then SyncBatchNorm and DDP for training.
        Returns (model for the steps, the bare model, its EMA or None)."""
        model = task.model
        if train and self.world_size > 1 and self.device.type == 'cuda':
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif train and self.world_size > 1:
            print('SyncBatchNorm needs CUDA: on the CPU each process keeps its own BatchNorm statistics')
        model.to(self.device)
        channels_last_convs(model)
        if train:
            match_gradient_layouts(model)
        model_ema = None
        if task.ema is not None and (train or isinstance((self.checkpoint or {}).get('model_ema'), dict)):
            model_ema = ModelEmaV3(model, **task.ema)
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
        _, model, model_ema = self._prepare_model(task, train=False)
        if self.checkpoint is None:
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
        model, model_without_ddp, model_ema = self._prepare_model(task, train=True)
        n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
        print(f'number of params: {n_parameters}')
        loader_val, loader_train = self.val_loader(task), self.train_loader(task)
        steps_per_epoch = len(loader_train)
        optimizer = task.make_optimizer(model_without_ddp)
        lr_scheduler, total_steps = task.make_schedule(optimizer, steps_per_epoch)
        num_epochs = -(-total_steps // steps_per_epoch)
        scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == 'fp16')
        state = TrainingState(start_epoch=getattr(args, 'start_epoch', 0))
        if self.checkpoint is not None:
            state = self._resume(task, optimizer, scaler, steps_per_epoch)
        if self.output is not None:
            self.output.write_text('config.yaml', yaml.safe_dump(config, sort_keys=False))
            self.output.restore_log(state.start_epoch - 1, state.last_log if self.own_checkpoint else None)
        warmup = getattr(lr_scheduler, 'warmup_t', 0)
        if warmup and warmup >= (num_epochs if lr_scheduler.t_in_epochs else total_steps):
            print(f'warning: the warm-up ({warmup} {"epochs" if lr_scheduler.t_in_epochs else "steps"}) covers the '
                  'whole run: the learning rate never reaches its set value (lower --warmup-epochs / --warmup-iters)')
        print(f'Start training for {num_epochs} epochs ({total_steps} steps of {steps_per_epoch} per epoch) from epoch '
              f'{state.start_epoch}: total batch {args.batch_size * self.world_size}, '
              f'lr {optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"]):.3g}')
        loop = EpochLoop(self, task, model, model_without_ddp, model_ema, optimizer, lr_scheduler, scaler,
                         loader_train, loader_val, n_parameters, total_steps, state)
        start_time, stop = time.time(), StopSignals()
        try:
            stats = loop.train(num_epochs, stop)
        finally:
            stop.restore()
        print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
        return stats

    def _resume(self, task, optimizer, scaler, steps_per_epoch) -> 'TrainingState':
        ckpt, args = self.checkpoint, self.args
        if not all(k in ckpt for k in ('optimizer', 'epoch')):
            start = '--finetune' if hasattr(args, 'finetune') else '--pretrained'
            raise UsageError(f'{self.resume_path} holds weights only (no optimizer state or epoch): use it with '
                             f'--eval, or start training from it with {start}')
        hyperparameters = [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(ckpt['optimizer'])
        except (ValueError, KeyError) as e:
            raise UsageError(f'{self.resume_path}: its optimizer state does not fit this optimizer ({e})') from None
        for group, values in zip(optimizer.param_groups, hyperparameters):
            group.update(values)  # flags changed since the checkpoint apply (the schedule is rebuilt from them too)
        if ckpt.get('scaler') and scaler.is_enabled():
            scaler.load_state_dict(ckpt['scaler'])
        state = TrainingState(start_epoch=ckpt['epoch'] + 1, best=dict(ckpt.get('best', {})),
                              last_log=ckpt.get('log'))
        for legacy in ('max_accuracy', 'max_accuracy_ema'):  # the authors' files and DeiT's
            if legacy in ckpt and task.best_metric:
                state.best.setdefault(task.best_metric + ('_ema' if legacy.endswith('ema') else ''), ckpt[legacy])
        same_shape = ckpt.get('world_size', self.world_size) == self.world_size and \
            flags_value(ckpt, 'batch-size', args.batch_size) == args.batch_size
        state.global_step = ckpt['step'] if 'step' in ckpt and (same_shape or not task.schedule_in_epochs) \
            else state.start_epoch * steps_per_epoch
        progress = ckpt.get('progress')
        if progress is not None and same_shape:
            state.first_step, state.global_step, state.totals = progress['steps'], progress['global_step'], \
                progress['totals']
        elif progress is not None:
            print(f'The checkpoint was taken during epoch {state.start_epoch} with {ckpt.get("world_size")} processes '
                  f'of batch {flags_value(ckpt, "batch-size", "?")}: with {self.world_size} of {args.batch_size} that '
                  'epoch restarts from its beginning')
        state.pending_eval = ckpt.get('pending_eval')
        if state.pending_eval is not None:
            state.start_epoch -= 1
        changed = {k: (v, self.config[k]) for k, v in flags_of_ours(ckpt).items()
                   if k in self.config and k not in IGNORED_CHANGES and v != self.config[k]}
        if changed:
            print('Changed since the checkpoint, applied: ' +
                  ', '.join(f'--{k} {json.dumps(a)} -> {json.dumps(b)}' for k, (a, b) in changed.items()))
        print(f'Resumed from {self.resume_path} (epoch {ckpt["epoch"]}' +
              (f', step {state.first_step} of epoch {state.start_epoch}' if state.first_step else '') + ')')
        return state


# Flags whose change does not change the training.
IGNORED_CHANGES = {'resume', 'eval', 'output_dir', 'num_workers', 'print-freq', 'dist-timeout', 'device', 'data-path',
                   'finetune', 'pretrained', 'start_epoch'}


def flags_of_ours(checkpoint: dict) -> dict:
    args = checkpoint.get('args')
    return args if isinstance(args, dict) else {}


def flags_value(checkpoint: dict, flag: str, default):
    return flags_of_ours(checkpoint).get(flag, default)


def _format(stats: dict) -> str:
    return ', '.join(f'{k} {v:.3f}' if isinstance(v, float) else f'{k} {v}' for k, v in stats.items())


@dataclass
class TrainingState:
    start_epoch: int = 0
    first_step: int = 0              # steps of start_epoch already done (a mid-epoch resume)
    global_step: int = 0
    totals: Optional[dict] = None    # the metric totals of start_epoch's first steps
    best: dict = field(default_factory=dict)
    last_log: Optional[dict] = None  # the log line of the last completed epoch
    pending_eval: Optional[dict] = None  # the train stats of an epoch whose evaluation failed


class EpochLoop:
    """The epoch loop of `Run.train`: train, check, evaluate, save, log."""

    def __init__(self, run: Run, task: Task, model, model_without_ddp, model_ema, optimizer, lr_scheduler, scaler,
                 loader_train, loader_val, n_parameters, total_steps, state: TrainingState):
        self.run, self.task, self.args = run, task, run.args
        self.model, self.model_without_ddp, self.model_ema = model, model_without_ddp, model_ema
        self.optimizer, self.lr_scheduler, self.scaler = optimizer, lr_scheduler, scaler
        self.loader_train, self.loader_val = loader_train, loader_val
        self.n_parameters, self.total_steps, self.state = n_parameters, total_steps, state
        self.steps_per_epoch = len(loader_train)
        self.stats = {}

    def train(self, num_epochs: int, stop: StopSignals) -> dict:
        state, sampler = self.state, self.loader_train.sampler
        for epoch in range(state.start_epoch, num_epochs):
            steps_before = state.global_step
            if state.pending_eval is not None:  # trained, not evaluated: the evaluation failed last time
                result = engine.EpochResult(state.pending_eval['stats'], {}, 0, state.global_step, False)
                steps_before, state.pending_eval = state.pending_eval['steps_before'], None
            else:
                sampler.set_epoch(epoch)
                sampler.skip(state.first_step * self.args.batch_size)
                self.lr_scheduler.step(epoch)
                steps_before -= state.first_step
                result = engine.train_one_epoch(
                    self.model, self.task.loss, self.loader_train, self.optimizer, self.scaler, self.run.device,
                    epoch, amp_dtype=self.run.amp_dtype, lr_scheduler=self.lr_scheduler, seed=self.args.seed,
                    first_step=state.first_step, global_step=state.global_step, last_step=self.total_steps,
                    max_norm=self.task.max_norm, model_ema=self.model_ema, totals=state.totals,
                    stop_requested=stop, print_freq=self.args.print_freq)
                state.global_step, state.first_step, state.totals = result.global_step, 0, None
                if result.stopped:
                    self._save_progress(epoch, result)
                    raise Preempted(f'{self._signal(stop)} received during epoch {epoch}; stopped after '
                                    f'{result.steps} of its {self.steps_per_epoch} steps{self._resumes_there()}')
            self._end_epoch(epoch, result, steps_before)
            if epoch + 1 < num_epochs and utils.all_reduce_sum([float(stop())])[0]:  # a signal during the evaluation
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

    def _state(self, epoch: int, **extra) -> dict:
        state = {
            'model': self.model_without_ddp.state_dict(), 'optimizer': self.optimizer.state_dict(),
            'lr_scheduler': self.lr_scheduler.state_dict(), 'scaler': self.scaler.state_dict(),
            'epoch': epoch, 'step': self.state.global_step, 'args': self.run.config, 'meta': self.task.meta,
            'world_size': self.run.world_size, 'best': self.state.best, 'log': self.state.last_log,
            **{'max_accuracy': self.state.best[k] for k in [self.task.best_metric] if k in self.state.best},
            **extra,
        }
        if self.model_ema is not None:
            state['model_ema'] = self.model_ema.module.state_dict()
        return state

    def _save(self, state: dict, *names: str):
        if self.run.output is not None:
            for name in names:
                checkpoints.save_checkpoint(state, self.run.output.file(name))
        utils.wait_for_main_process()

    def _save_progress(self, epoch: int, result: engine.EpochResult):
        """The mid-epoch resume point (a signal): the last completed epoch's number with this epoch's progress."""
        progress = {'epoch': epoch, 'steps': result.steps, 'global_step': result.global_step, 'totals': result.totals}
        state = self._state(epoch - 1, progress=progress)
        state['step'] = result.global_step - result.steps
        self._save(state, RESUME_FILE)

    def _end_epoch(self, epoch: int, result: engine.EpochResult, steps_before: int):
        broken = utils.non_finite_tensors(self.model_without_ddp, *([self.model_ema.module] if self.model_ema else []))
        if broken:
            raise FloatingPointError(f'epoch {epoch} ended with NaN or infinite weights ({len(broken)} tensors, e.g. '
                                     f'{broken[0]}): not saved; {self._resume_point()}')
        if self.run.world_size > 1 and self.run.device.type == 'cpu':  # no SyncBatchNorm: rank 0's statistics
            utils.broadcast_buffers(self.model_without_ddp, *([self.model_ema.module] if self.model_ema else []))
        entry = {'epoch': epoch, 'step': self.state.global_step, 'n_parameters': self.n_parameters,
                 **{f'train_{k}': v for k, v in result.stats.items()}}
        improved = []
        if self.task.evaluate_after(steps_before, self.state.global_step, self.total_steps):
            try:
                # What --eval measures: the inference form of a copy (training goes on with the model).
                evaluations = {'test': self.task.evaluate(for_inference(self.model_without_ddp), self.loader_val)}
                if self.model_ema is not None:
                    evaluations['test_ema'] = self.task.evaluate(for_inference(self.model_ema.module),
                                                                 self.loader_val)
            except UsageError as e:  # unreadable validation data: keep the trained epoch, evaluate it next time
                pending = {'stats': result.stats, 'steps_before': steps_before}
                self._save(self._state(epoch, pending_eval=pending), RESUME_FILE)
                raise UsageError(f'{e} (the trained epoch {epoch} is saved; the next start evaluates it first)',
                                 everywhere=e.everywhere) from None
            loss = evaluations['test'].get('loss')
            if loss is not None and not (loss == loss and abs(loss) != float('inf')):
                raise FloatingPointError(f'epoch {epoch} gives an evaluation loss of {loss}: not saved; '
                                         f'{self._resume_point()}')
            self.stats = evaluations['test']
            for prefix, stats in evaluations.items():
                entry.update({f'{prefix}_{k}': v for k, v in stats.items()})
                key = self.task.best_metric and self.task.best_metric + prefix[len('test'):]
                if key and stats.get(self.task.best_metric) is not None and \
                        stats[self.task.best_metric] > self.state.best.get(key, float('-inf')):
                    self.state.best[key] = stats[self.task.best_metric]
                    improved.append('best' + prefix[len('test'):] + '.pth')
            best = ', '.join(f'{k} {v:.2f}' for k, v in self.state.best.items())
            if best:
                print(f'Best: {best}')
        self.state.last_log = entry
        names = improved + ([f'backup{epoch}.pth'] if self.task.backup_every and epoch % self.task.backup_every == 0
                            else [])
        self._save(self._state(epoch), *names, RESUME_FILE)  # the resume point last
        if self.run.output is not None:
            self.run.output.append_log(entry)

    def _resume_point(self) -> str:
        if not self.args.output_dir:
            return 'nothing is saved without --output_dir'
        if self.state.last_log is None:
            return 'no checkpoint was written yet'
        return f'the resume point stays {os.path.join(self.args.output_dir, RESUME_FILE)} of epoch ' \
            f'{self.state.last_log["epoch"]}'


def for_inference(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """The model as --eval, the benchmark and the ONNX export run it: in eval mode, with timm's inference-only
    folds applied (timm.utils.reparameterize_model: RAVLT's BatchNorms into their convs, its FFN skips into
    their kernels). Unless `inplace`, a copy (training goes on with the model itself); the model itself when
    nothing folds."""
    if not any(hasattr(m, 'reparameterize') for m in model.modules()):
        return model.eval()
    model = (model if inplace else copy.deepcopy(model)).eval()
    return timm.utils.reparameterize_model(model, inplace=True)


def channels_last_convs(model: torch.nn.Module):
    """Conv weights channels-last, as RAVLT's activations (and a channels-last weight makes any model's convs
    run so): no layout change per call, and their gradients come in the weights' layout, as
    DistributedDataParallel's buckets expect. Training and evaluation run the same kernels."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.to(memory_format=torch.channels_last)


def match_gradient_layouts(model: torch.nn.Module):
    """Give every gradient its parameter's memory layout, as DistributedDataParallel's buckets expect (else it
    warns "Grad strides do not match bucket view strides" and copies each mismatched gradient every step).
    Gradients that differ from their parameter only in the strides of size-1 dimensions (a (1, C, 1, 1) layer
    scale, a depthwise (C, 1, k, k) kernel: which stride a kernel gives such a dimension varies) are
    re-strided for free: the memory is the same. Call after channels_last_convs."""
    for param in model.parameters():
        if param.requires_grad and param.dim() > 1 and 1 in param.shape:
            param.register_hook(functools.partial(_restride_like, param))


def _restride_like(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    if grad.stride() == param.stride() or any(g != p for g, p, n in zip(grad.stride(), param.stride(), grad.shape)
                                              if n != 1):
        return grad
    return grad.as_strided(grad.shape, param.stride())


def create_model(name: str, model_kwargs: Optional[dict] = None, **kwargs) -> torch.nn.Module:
    """timm.create_model for --model (our variants by either name, or any timm model) and --model-kwargs,
    with a one-line UsageError for an unknown model or arguments it does not take."""
    resolved = models.resolve_model_name(name)
    if not timm.is_model(resolved):
        raise UsageError(f'unknown model {name!r}: choose RAVLT_T, RAVLT_S, RAVLT_B or RAVLT_L (any timm model name '
                         'also works, see timm.list_models())')
    try:
        return timm.create_model(resolved, **dict(model_kwargs or {}, **kwargs))
    except (TypeError, ValueError, AssertionError, IndexError, KeyError) as e:
        raise UsageError(f'cannot build {resolved} with --model-kwargs {json.dumps(model_kwargs)}: {e}') from None
