"""Checkpoint files, in one place: atomic saving, safe loading (`torch.load(weights_only=True)`: tensors,
containers, numbers and the `argparse.Namespace` of the authors' files; no pickled code ever runs), and
the weights inside every kind of file the project meets:

- ours, from main.py / main_det.py / main_seg.py (`model`, `model_ema`, `optimizer`, ..., `args`: the
  resolved flags as {flag name: value}, `meta`: the task and its classes);
- the authors' ImageNet files (`model`, `model_ema`, ..., `args` as an argparse.Namespace);
- the authors' mmdet / mmseg files (`state_dict` with `backbone.*`, `neck.*`, ...);
- raw state dicts, with or without DistributedDataParallel's `module.` prefix.

Every problem is a one-line `UsageError` that names at most a few keys and says what to do.
"""

import argparse
import functools
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import timm
import torch

import models
from errors import UsageError, first_line
from utils import atomic_file, sync_folder

# The anchor of RAVLT weights inside any checkpoint: the stem's first conv.
BACKBONE_ANCHOR = 'patch_embed.proj.0.weight'


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def save_checkpoint(obj, path, *more_paths):
    """torch.save `obj` once, to `path` atomically (see atomic_file), then give each of `more_paths` the same file,
    in order, each replaced atomically: a hard link (no copy, no space) where the file system has them, else a
    copy. The names then share one file until each is replaced by a later save (a rename: never written in
    place)."""
    with atomic_file(path) as f:
        torch.save(obj, f)
    for other in more_paths:
        _place(path, other)


def _place(source, path):
    directory = os.path.dirname(os.path.abspath(path))
    fd, link = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    os.close(fd)
    os.remove(link)
    try:
        os.link(source, link)
    except OSError:  # no hard links on this file system (some network and FUSE ones)
        with atomic_file(path) as f, open(source, 'rb') as copied:
            shutil.copyfileobj(copied, f)
        return
    try:
        os.replace(link, path)
    except BaseException:
        os.remove(link)
        raise
    sync_folder(directory)  # the rename itself survives a crash


def load_checkpoint(path, map_location='cpu', mmap: bool = False) -> dict:
    """A checkpoint dict, loaded with `torch.load(weights_only=True)` (`mmap`: the tensors mapped, not read). A
    missing, empty, unreadable or code-carrying file raises a one-line UsageError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f'checkpoint {path} does not exist')
    if os.path.isdir(path):
        raise UsageError(f'checkpoint {path} is a directory; give the .pth file')
    if os.path.getsize(path) == 0:
        raise UsageError(f'checkpoint {path} is empty (0 bytes); was its download or copy interrupted?')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # e.g. "Detected pickle protocol 4" on a file that is no checkpoint
            checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r'GLOBAL ([\w.]+)', str(e))
        if found:
            raise UsageError(
                f'checkpoint {path} needs code execution to unpickle (it references {found.group(1)}); '
                'refusing to load it: save plain state dicts (tensors, numbers, strings)'
            ) from None
        raise UsageError(f'{path} is not a PyTorch checkpoint (unreadable by torch.load)') from None
    except PermissionError:
        raise UsageError(f'checkpoint {path} cannot be read (permission denied)') from None
    except Exception as e:  # torch.load raises many types for files that are no checkpoints
        detail = first_line(e).split('. ')[0] if isinstance(e, RuntimeError) else 'unreadable by torch.load'
        raise UsageError(f'{path} is not a PyTorch checkpoint ({detail})') from None
    if not isinstance(checkpoint, dict):
        raise UsageError(
            f'{path} is not a checkpoint: it holds a {type(checkpoint).__name__}, not a dict of state dicts'
        )
    return checkpoint


def flags_of(checkpoint: dict, source: str = '', parser=None, check: Iterable[str] = ()) -> dict:
    """The flags a checkpoint was trained with, as {argparse destination: value} (`model_kwargs`): ours store
    them by flag name (`model-kwargs`), the authors' files as an argparse.Namespace. The destinations in `check`
    pass `parser`'s checks of the command line (cli.ArgumentParser.check_saved): a hand-edited value is a
    one-line UsageError naming `source` and the flag."""
    args = checkpoint.get('args')
    if isinstance(args, argparse.Namespace):
        flags = dict(vars(args))
    else:
        flags = {str(k).replace('-', '_'): v for k, v in args.items()} if isinstance(args, dict) else {}
    for dest in check:
        if dest in flags:
            flags[dest] = parser.check_saved(dest, flags[dest], f'the flags (args) of checkpoint {source}')
    return flags


def resumable_checkpoints(folder: str, exclude: str = '') -> List[str]:
    """The files in `folder` other than `exclude` that load as whole training checkpoints (best.pth, backup{N}.pth
    ...), as 'NAME (epoch N)', the latest epoch first: what a run can resume from when its own checkpoint is
    damaged."""
    found = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.endswith('.pth') or name == exclude or not os.path.isfile(path):
            continue
        try:
            checkpoint = load_checkpoint(path, mmap=True)  # the structure is read, not the tensors
        except UsageError:
            continue
        if 'optimizer' in checkpoint and _count(checkpoint.get('epoch'), -1):
            found.append((checkpoint['epoch'], name))
    return [f'{name} (epoch {epoch})' for epoch, name in sorted(found, key=lambda f: -f[0])]


# ----------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------


def state_dict_of(checkpoint: dict, ema: bool = False, source: str = 'the checkpoint') -> Dict[str, torch.Tensor]:
    """The weights in any checkpoint (see the module docstring); `ema` takes `model_ema` when present. A `model`
    entry that holds no weights (None ...) is a one-line UsageError naming `source`: the EMA weights are never
    taken for the weights."""
    if ema and isinstance(checkpoint.get('model_ema'), dict):
        checkpoint = checkpoint['model_ema']
    elif 'model' in checkpoint and not isinstance(checkpoint['model'], dict):
        ema_note = (
            ' (its EMA weights, model_ema, are there: save them as model to use them)'
            if isinstance(checkpoint.get('model_ema'), dict)
            else ''
        )
        raise UsageError(
            f'{source}: its model entry is {_brief(checkpoint["model"])}, not a state dict of weights{ema_note}'
        )
    return models.checkpoint_filter_fn(checkpoint, None)


def _brief(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + '...'


def check_weight_values(state: dict, own: dict, source: str):
    """Every weight a tensor, and a floating-point one where the model's is: weights saved as integers or
    booleans have lost their values (a model would load them, rounded, and predict at chance)."""
    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise UsageError(
            f'{source}: {len(odd)} weights are not tensors (e.g. {odd[0]}: '
            f'{_brief(state[odd[0]])}): the file is damaged or was edited'
        )
    rounded = [k for k, v in state.items() if k in own and own[k].is_floating_point() and not v.is_floating_point()]
    if rounded:
        dtypes = sorted({str(state[k].dtype).replace('torch.', '') for k in rounded})
        raise UsageError(
            f'{source}: {len(rounded)} weights are stored as {"/".join(dtypes)}, not floating point (e.g. '
            f'{rounded[0]}): their values are lost; use the original file'
        )


@functools.lru_cache(maxsize=1)
def _variant_shapes() -> dict:
    """{'RAVLT_T': {key: shape}, ...} of the published variants' backbones (no classifier), built on 'meta'."""
    shapes = {}
    for name in models.RAVLT_CONFIGS:
        with torch.device('meta'):  # shapes only: no memory, no initialisation
            model = timm.create_model(name)
        classifier = classifier_keys(model) | {k for k in model.state_dict() if k.startswith(('proj.', 'norm.'))}
        shapes[name.upper()] = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in classifier}
    return shapes


def classifier_keys(model: torch.nn.Module) -> set:
    """State-dict keys of a classifier (timm's pretrained_cfg['classifier'], 'head' by default)."""
    classifier = getattr(model, 'pretrained_cfg', {}).get('classifier', 'head')
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return {f'{n}.weight' for n in names} | {f'{n}.bias' for n in names}


def backbone_state_dict(state_dict: dict) -> Dict[str, torch.Tensor]:
    """The RAVLT part of any state dict (a classifier's, a detector's `backbone.body.*`, the authors'
    mmdet `backbone.*`), its prefix removed; empty when it holds no RAVLT weights."""
    anchor = next((k for k in state_dict if k.endswith(BACKBONE_ANCHOR)), None)
    if anchor is None:
        return {}
    prefix = anchor[: -len(BACKBONE_ANCHOR)]
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def ravlt_variant_of(state_dict: dict) -> Optional[str]:
    """The published variant ('RAVLT_T' ...) whose backbone these weights fit exactly, or None."""
    backbone = backbone_state_dict(state_dict)
    for variant, reference in _variant_shapes().items():
        if backbone and all(k in backbone and tuple(backbone[k].shape) == shape for k, shape in reference.items()):
            return variant
    return None


def _examples(keys: Iterable[str], limit: int = 2) -> str:
    keys = list(keys)
    return ', '.join(keys[:limit]) + (f' and {len(keys) - limit} more' if len(keys) > limit else '')


def describe_mismatch(
    model_name: str, state_dict: dict, mismatched, missing, unexpected, trained_with: str = ''
) -> str:
    """One line: what does not fit (a few keys), which published variant the weights are (or the model flags
    they were trained with), and the fix."""
    parts = []
    if mismatched:
        parts.append(
            f'{len(mismatched)} tensors differ in shape (e.g. {mismatched[0][0]}: '
            f'{mismatched[0][1]} here vs {mismatched[0][2]} in the model)'
        )
    if missing:
        parts.append(f'{len(missing)} missing ({_examples(missing)})')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected ({_examples(unexpected)})')
    problem = '; '.join(parts)
    variant = ravlt_variant_of(state_dict)
    if variant is not None and models.resolve_model_name(variant) != models.resolve_model_name(model_name):
        return f'the weights are {variant} weights but the model is {model_name} ({problem}): pass --model {variant}'
    if variant is not None:
        return (
            f'the weights are {variant} weights with its default shape, but --model-kwargs changed the model '
            f'({problem}): drop --model-kwargs'
        )
    if trained_with:
        return f'the weights do not fit {model_name} ({problem}): they were trained with {trained_with}'
    return f'the weights do not fit {model_name} ({problem}): check --model and --model-kwargs'


def load_weights(
    model: torch.nn.Module, checkpoint: dict, source: str, model_name: str, ema: bool = False, allowed_missing=()
) -> None:
    """Load the weights of `checkpoint` (any kind; `ema`: its `model_ema` when present) into `model`, key
    for key but for `allowed_missing`. Anything else raises a one-line UsageError starting with `source`."""
    state = state_dict_of(checkpoint, ema, source)
    own = model.state_dict()
    check_weight_values(state, own, source)
    mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape))
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = [k for k in own if k not in state and k not in allowed_missing]
    unexpected = [k for k in state if k not in own]
    head = classifier_keys(model)
    if mismatched and {k for k, _, _ in mismatched} <= head and not missing and not unexpected:
        key, theirs, ours = sorted(mismatched)[0]
        raise UsageError(
            f'{source}: the checkpoint classifier has {theirs[0]} classes, the model {ours[0]}: use '
            '--finetune to start from these weights with a new classifier'
        )
    if mismatched or missing or unexpected:
        raise UsageError(
            f'{source}: '
            + describe_mismatch(model_name, state, mismatched, missing, unexpected, _trained_with(checkpoint))
        )
    model.load_state_dict(state, strict=False)


def _trained_with(checkpoint: dict) -> str:
    """'--model X --model-kwargs {...}' from the checkpoint's flags, or ''."""
    flags = flags_of(checkpoint)
    return ' '.join(
        f'--{k.replace("_", "-")} {json.dumps(flags[k], default=str)}'
        for k in ('model', 'model_kwargs')
        if flags.get(k) is not None
    )


def load_backbone_weights(
    model: torch.nn.Module, checkpoint: dict, source: str, model_name: str
) -> Tuple[List[str], List[str]]:
    """Load, non-strictly, the RAVLT part of any checkpoint into the backbone of a dense model
    (models.dense.build_dense_model). Returns (missing_keys, unexpected_keys): from an ImageNet checkpoint
    these are the `extra_norms` and the classifier's `proj`, `norm` and `head`. Shapes must fit."""
    from models.dense import dense_backbone

    backbone = dense_backbone(model)
    state = backbone_state_dict(state_dict_of(checkpoint, source=source))
    if not state:
        raise UsageError(f'{source} holds no RAVLT weights (no key ending in {BACKBONE_ANCHOR})')
    own = backbone.state_dict()
    check_weight_values(state, own, source)
    mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape))
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise UsageError(f'{source}: ' + describe_mismatch(model_name, state, mismatched, [], []))
    result = backbone.load_state_dict(state, strict=False)
    return result.missing_keys, result.unexpected_keys


# ----------------------------------------------------------------------------------------------------
# Training state: what a training checkpoint holds beside the weights, written and read here only
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrainingState:
    """Where a training run stands."""

    start_epoch: int = 0
    first_step: int = 0  # steps of start_epoch already done (a mid-epoch resume)
    global_step: int = 0
    totals: Optional[dict] = None  # the metric totals of start_epoch's first steps
    best: dict = field(default_factory=dict)
    last_log: Optional[dict] = None  # the log line of the last completed epoch
    pending_eval: Optional[dict] = None  # the train stats of an epoch whose evaluation failed


def training_checkpoint(
    *,
    model,
    model_ema,
    optimizer,
    lr_scheduler,
    scaler,
    epoch: int,
    state: TrainingState,
    flags: dict,
    meta: dict,
    world_size: int,
    best_metric: Optional[str],
    **extra,
) -> dict:
    """A training checkpoint: the weights (`model`, `model_ema`), the optimizer, schedule and loss-scaler state,
    the last completed `epoch` and the run's step, the resolved `flags` ({flag name: value}), the task's `meta`,
    the process count, the best metrics and the epoch's log line; `extra` (a mid-epoch `progress`, a
    `pending_eval`) is added. `max_accuracy` is kept for DeiT-style tools."""
    checkpoint = {
        'model': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'lr_scheduler': lr_scheduler.state_dict(),
        'scaler': scaler.state_dict(),
        'epoch': epoch,
        'step': state.global_step,
        'args': flags,
        'meta': meta,
        'world_size': world_size,
        'best': state.best,
        'log': state.last_log,
        **({'max_accuracy': state.best[best_metric]} if best_metric in state.best else {}),
        **extra,
    }
    if model_ema is not None:
        checkpoint['model_ema'] = model_ema.module.state_dict()
    return checkpoint


def _count(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_training_fields(checkpoint: dict, source: str):
    """The fields of a training checkpoint have the types and ranges training_checkpoint writes: a hand-edited
    or damaged one is a one-line UsageError naming the file and the field."""

    def refuse(name, value, expected):
        raise UsageError(f'{source}: its field {name} is {_brief(value)}, expected {expected} (was the file edited?)')

    def optional(name, valid, expected):
        if checkpoint.get(name) is not None and not valid(checkpoint[name]):
            refuse(name, checkpoint[name], expected)

    if not _count(checkpoint['epoch'], -1):  # -1: a checkpoint taken during the first epoch
        refuse('epoch', checkpoint['epoch'], 'the last completed epoch (an integer, -1 or more)')
    if not isinstance(checkpoint['optimizer'], dict):
        refuse('optimizer', checkpoint['optimizer'], "an optimizer's state dict")
    optional('step', _count, 'a step count (an integer, 0 or more)')
    optional('world_size', lambda v: _count(v, 1), 'a process count (an integer, 1 or more)')
    optional('scaler', lambda v: isinstance(v, dict), "a GradScaler's state dict")
    optional('log', lambda v: isinstance(v, dict), 'a log line (a mapping)')
    optional(
        'best',
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and _number(x) for k, x in v.items()),
        'a mapping of metric names to numbers',
    )
    for legacy in ('max_accuracy', 'max_accuracy_ema'):
        optional(legacy, _number, 'a number')

    def totals_ok(totals):
        return isinstance(totals, dict) and all(
            isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(x) for x in v) for v in totals.values()
        )

    optional(
        'progress',
        lambda v: (
            isinstance(v, dict)
            and _count(v.get('steps'))
            and _count(v.get('global_step'))
            and totals_ok(v.get('totals'))
        ),
        'the steps, global_step and totals of an unfinished epoch',
    )
    optional(
        'pending_eval',
        lambda v: isinstance(v, dict) and isinstance(v.get('stats'), dict) and _count(v.get('steps_before')),
        'the stats and steps_before of an epoch awaiting evaluation',
    )


def restore_training(
    checkpoint: dict,
    source: str,
    *,
    optimizer,
    scaler,
    best_metric: Optional[str],
    world_size: int,
    batch_size: int,
    steps_per_epoch: int,
    schedule_in_epochs: bool,
    start_option: str,
    amp: Optional[str] = None,
) -> TrainingState:
    """Load the optimizer and loss-scaler state of a training checkpoint and return where training stands.

    Hyperparameters given now (learning rate, weight decay ...) override the saved ones; the loss scaler's state
    is kept when the precision (`amp`, --amp) is the checkpoint's. A checkpoint taken mid-epoch continues at
    its step when the process count and --batch-size are unchanged; otherwise that epoch restarts from its
    beginning, and the run's step is the epoch's first (epoch-counted schedules) or the steps already done
    (step-counted ones: the run ends at its last step whatever the process count)."""
    if not all(k in checkpoint for k in ('optimizer', 'epoch')):
        raise UsageError(
            f'{source} holds weights only (no optimizer state or epoch): use it with --eval, or start '
            f'training from it with {start_option}'
        )
    check_training_fields(checkpoint, source)
    hyperparameters = [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise UsageError(f'{source}: its optimizer state does not fit this optimizer ({first_line(e)})') from None
    for group, values in zip(optimizer.param_groups, hyperparameters):
        group.update(values)  # flags changed since the checkpoint apply (the schedule is rebuilt from them too)
    if checkpoint.get('scaler') and scaler.is_enabled() and flags_of(checkpoint).get('amp', amp) == amp:
        try:
            scaler.load_state_dict(checkpoint['scaler'])
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
            raise UsageError(f'{source}: its scaler field does not fit a GradScaler ({first_line(e)})') from None
    state = TrainingState(
        start_epoch=checkpoint['epoch'] + 1, best=dict(checkpoint.get('best') or {}), last_log=checkpoint.get('log')
    )
    for legacy in ('max_accuracy', 'max_accuracy_ema'):  # the authors' files and DeiT's
        if legacy in checkpoint and best_metric:
            state.best.setdefault(best_metric + ('_ema' if legacy.endswith('ema') else ''), checkpoint[legacy])
    saved_batch = flags_of(checkpoint).get('batch_size', batch_size)
    same_shape = checkpoint.get('world_size', world_size) == world_size and saved_batch == batch_size
    state.global_step = (
        checkpoint['step']
        if 'step' in checkpoint and (same_shape or not schedule_in_epochs)
        else state.start_epoch * steps_per_epoch
    )
    progress = checkpoint.get('progress')
    if progress is not None and same_shape:
        if progress['steps'] >= steps_per_epoch:
            raise UsageError(
                f'{source}: its field progress has steps {progress["steps"]}, but an epoch has '
                f'{steps_per_epoch} (was the file edited?)'
            )
        state.first_step, state.global_step, state.totals = (
            progress['steps'],
            progress['global_step'],
            progress['totals'],
        )
    elif progress is not None:
        if not schedule_in_epochs:
            state.global_step = progress['global_step']
        print(
            f'The checkpoint was taken during epoch {state.start_epoch} with {checkpoint.get("world_size")} '
            f'processes of batch {saved_batch}: with {world_size} of {batch_size} that epoch restarts from its '
            'beginning' + ('' if schedule_in_epochs else f' at step {state.global_step} of the schedule')
        )
    state.pending_eval = checkpoint.get('pending_eval')
    if state.pending_eval is not None:
        state.start_epoch -= 1
    return state
