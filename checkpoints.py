"""Checkpoint files, in one place: atomic saving, safe loading (`torch.load(weights_only=True)`: tensors,
containers, numbers and the `argparse.Namespace` of the authors' files; no pickled code runs), the weights inside
every kind of file the project meets, and the training state (one writer, one reader).

Kinds: ours (`model`, `model_ema`, `optimizer`, ..., `args`: the resolved flags by flag name, `meta`: the task
and its classes); the authors' ImageNet files (`args` an argparse.Namespace); the authors' mmdet / mmseg files
(`state_dict` with `backbone.*`); raw state dicts, with or without DDP's `module.` prefix."""

import argparse
import functools
import inspect
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import timm
import torch

import models
from errors import UsageError
from utils import atomic_file, sync_folder

BACKBONE_ANCHOR = 'patch_embed.proj.0.weight'  # RAVLT weights inside any checkpoint: the stem's first conv


def save_checkpoint(obj, path, *more_paths):
    """torch.save `obj` once, atomically, to `path`; then each of `more_paths` becomes the same file, each replaced
    atomically: a hard link (no copy) where the file system has them, else a copy."""
    with atomic_file(path) as f:
        torch.save(obj, f)
    for other in more_paths:
        directory = os.path.dirname(os.path.abspath(other))
        link = os.path.join(directory, f'.{os.path.basename(other)}.{os.getpid()}.tmp')
        try:
            os.link(path, link)
        except OSError:  # no hard links here (some network and FUSE file systems)
            with atomic_file(other) as f, open(path, 'rb') as source:
                shutil.copyfileobj(source, f)
            continue
        try:
            os.replace(link, other)
        except OSError as e:  # named by the file, never by its temporary link (which goes)
            os.remove(link)
            raise OSError(e.errno, e.strerror, os.fspath(other)) from None
        sync_folder(directory)


def load_checkpoint(path, mmap: bool = False) -> dict:
    """A checkpoint dict on the CPU, loaded with `torch.load(weights_only=True)` (`mmap`: tensors mapped, not
    read). A missing, empty, damaged or code-carrying file is a one-line UsageError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f'checkpoint {path} does not exist' + (' (it is a folder)' if os.path.isdir(path) else ''))
    if os.path.getsize(path) == 0:
        raise UsageError(f'checkpoint {path} is empty (0 bytes); was its download or copy interrupted?')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as e:  # torch.load raises many types for files that are no (whole) checkpoints
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(f'{path} is not a readable PyTorch checkpoint ({detail})') from None
    if not isinstance(checkpoint, dict):
        raise UsageError(f'{path} holds a {type(checkpoint).__name__}, not a checkpoint (a dict of state dicts)')
    return checkpoint


def flags_of(checkpoint: dict) -> dict:
    """The flags a checkpoint was trained with, by argparse destination (`model_kwargs`): ours store them by flag
    name (`model-kwargs`), the authors' as an argparse.Namespace."""
    args = checkpoint.get('args')
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return {str(k).replace('-', '_'): v for k, v in args.items()} if isinstance(args, dict) else {}


# ----------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------


def state_dict_of(checkpoint: dict, ema: bool = False, source: str = 'the checkpoint') -> Dict[str, torch.Tensor]:
    """The weights in any checkpoint; `ema` takes `model_ema` when present."""
    if ema and isinstance(checkpoint.get('model_ema'), dict):
        checkpoint = checkpoint['model_ema']
    elif 'model' in checkpoint and not isinstance(checkpoint['model'], dict):
        raise UsageError(f'{source}: its model entry is {type(checkpoint["model"]).__name__}, not weights')
    state = models.checkpoint_filter_fn(checkpoint, None)
    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise UsageError(f'{source}: {len(odd)} weights are not tensors (e.g. {odd[0]}): the file is damaged')
    return state


def classifier_keys(model: torch.nn.Module) -> set:
    """State-dict keys of a classifier (timm's pretrained_cfg['classifier'], 'head' by default)."""
    classifier = getattr(model, 'pretrained_cfg', {}).get('classifier', 'head')
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return {f'{n}.{p}' for n in names for p in ('weight', 'bias')}


def backbone_state_dict(state_dict: dict) -> Dict[str, torch.Tensor]:
    """The RAVLT part of any state dict (a classifier's, a detector's `backbone.body.*`, the authors' mmdet
    `backbone.*`), its prefix removed; empty when it holds no RAVLT weights."""
    anchor = next((k for k in state_dict if k.endswith(BACKBONE_ANCHOR)), None)
    if anchor is None:
        return {}
    prefix = anchor[: -len(BACKBONE_ANCHOR)]
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


@functools.lru_cache(maxsize=1)
def _variant_shapes() -> dict:
    """{'RAVLT_T': {key: shape}, ...} of the published variants' stages, built on the meta device (no memory)."""
    shapes = {}
    for name in models.RAVLT_CONFIGS:
        with torch.device('meta'):
            state = timm.create_model(name).state_dict()
        shapes[name.upper()] = {k: tuple(v.shape) for k, v in state.items() if k.startswith(('patch_embed', 'layers'))}
    return shapes


def ravlt_variant_of(state_dict: dict) -> Optional[str]:
    """The published variant ('RAVLT_T' ...) whose backbone these weights fit exactly, or None."""
    backbone = backbone_state_dict(state_dict)
    for variant, reference in _variant_shapes().items():
        if backbone and all(k in backbone and tuple(backbone[k].shape) == s for k, s in reference.items()):
            return variant
    return None


def _mismatch(model_name: str, state: dict, own: dict, allowed_missing=()) -> Optional[str]:
    """What does not fit between weights and a model (a few keys), with the fix; None when everything fits."""
    shapes = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in state and k not in allowed_missing]
    unexpected = [k for k in state if k not in own]
    if not (shapes or missing or unexpected):
        return None
    parts = [f'{len(shapes)} differ in shape (e.g. {shapes[0][0]}: {shapes[0][1]} vs {shapes[0][2]})'] if shapes else []
    parts += [
        f'{len(keys)} {what} (e.g. {keys[0]})'
        for what, keys in (('missing', missing), ('unexpected', unexpected))
        if keys
    ]
    variant = ravlt_variant_of(state)
    if variant and models.resolve_model_name(variant) != models.resolve_model_name(model_name):
        return f'the weights are {variant} weights, not {model_name} ({"; ".join(parts)}): pass --model {variant}'
    return f'the weights do not fit {model_name} ({"; ".join(parts)}): check --model and --model-kwargs'


def load_weights(
    model: torch.nn.Module, checkpoint: dict, source: str, model_name: str, ema: bool = False, allowed_missing=()
):
    """Load the weights of any checkpoint (`ema`: its `model_ema` when present) into `model`, every key but
    `allowed_missing`; anything else is a one-line UsageError starting with `source`."""
    state, own = state_dict_of(checkpoint, ema, source), model.state_dict()
    head = classifier_keys(model)
    wrong_head = [k for k in head if k in state and k in own and state[k].shape != own[k].shape]
    if wrong_head and set(state) == set(own) and all(state[k].shape == own[k].shape for k in own if k not in head):
        raise UsageError(
            f'{source}: its classifier has {state[wrong_head[0]].shape[0]} classes, the model '
            f'{own[wrong_head[0]].shape[0]}: use --finetune to start from these weights with a new classifier'
        )
    problem = _mismatch(model_name, state, own, allowed_missing)
    if problem:
        raise UsageError(f'{source}: {problem}')
    kinds, flags = getattr(model, 'attn_types', None), flags_of(checkpoint)
    if kinds is not None and 'model_kwargs' in flags:  # ours record the arguments: kinds of one shape share names
        theirs = (flags['model_kwargs'] or {}).get(
            'attn_types', inspect.signature(type(model)).parameters['attn_types'].default
        )
        theirs = [theirs] * len(kinds) if isinstance(theirs, str) else list(theirs)
        if theirs != list(kinds):
            raise UsageError(
                f'{source} was trained with attn_types {theirs}, the model has {list(kinds)}: give its attn_types '
                'in --model-kwargs (or leave --model-kwargs out to take them from the checkpoint)'
            )
    model.load_state_dict(state, strict=False)


def load_backbone_weights(model, checkpoint: dict, source: str, model_name: str) -> Tuple[List[str], List[str]]:
    """Load, non-strictly, the RAVLT part of any checkpoint into the backbone of a dense model. Returns (missing,
    unexpected) keys: from an ImageNet checkpoint the `extra_norms`, and the classifier's `proj`, `norm`, `head`."""
    from models.dense import dense_backbone

    backbone = dense_backbone(model)
    state = backbone_state_dict(state_dict_of(checkpoint, source=source))
    if not state:
        raise UsageError(f'{source} holds no RAVLT weights (no key ending in {BACKBONE_ANCHOR})')
    own = backbone.state_dict()
    problem = _mismatch(model_name, {k: v for k, v in state.items() if k in own}, own, allowed_missing=own)
    if problem:
        raise UsageError(f'{source}: {problem}')
    result = backbone.load_state_dict(state, strict=False)
    return result.missing_keys, result.unexpected_keys


# ----------------------------------------------------------------------------------------------------
# Training state
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


def training_checkpoint(
    *, model, model_ema, optimizer, lr_scheduler, scaler, epoch: int, state: TrainingState, **extra
):
    """The weights (`model`, `model_ema`), optimizer, schedule and loss-scaler state, the last completed `epoch`,
    the run's step, the best metrics and the epoch's log line, plus `extra` (the resolved flags as `args`, the
    task's `meta`, `world_size`, a mid-epoch `progress`)."""
    checkpoint = {
        'model': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'lr_scheduler': lr_scheduler.state_dict(),
        'scaler': scaler.state_dict(),
        'epoch': epoch,
        'step': state.global_step,
        'best': state.best,
        'log': state.last_log,
        **extra,
    }
    if model_ema is not None:
        checkpoint['model_ema'] = model_ema.module.state_dict()
    return checkpoint


def restore_training(
    checkpoint: dict,
    source: str,
    *,
    optimizer,
    scaler,
    world_size: int,
    batch_size: int,
    steps_per_epoch: int,
    steps_fixed: bool,
    amp: str,
) -> TrainingState:
    """Load the optimizer and loss-scaler state of a training checkpoint and return where training stands.

    Hyperparameters given now (learning rate, weight decay ...) override the saved ones; the scaler's state is
    kept when the precision (--amp) is the checkpoint's. A checkpoint taken mid-epoch continues at its step when
    the process count and --batch-size are unchanged; otherwise that epoch restarts from its beginning, and the
    run's step is the epoch's first, or, for a schedule counted in steps (`steps_fixed`), the steps done."""
    if not all(k in checkpoint for k in ('optimizer', 'epoch')):
        raise UsageError(f'{source} holds weights only (no optimizer state): evaluate it with --eval, or train from it')
    hyperparameters = [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]
    params = [p for g in optimizer.param_groups for p in g['params']]
    saved = checkpoint['optimizer']
    try:
        for index, values in saved['state'].items():  # a damaged or merged state would write past its tensors
            bad = [k for k, v in values.items() if v.dim() and v.shape != params[int(index)].shape]
            if bad:
                raise ValueError(f'state {bad[0]} of parameter {index} has shape {tuple(values[bad[0]].shape)}')
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise UsageError(f'{source}: its optimizer state does not fit this model and optimizer ({e})') from None
    for group, values in zip(optimizer.param_groups, hyperparameters):
        group.update(values)  # flags changed since the checkpoint apply (the schedule is rebuilt from them too)
    if checkpoint.get('scaler') and scaler.is_enabled() and flags_of(checkpoint).get('amp', amp) == amp:
        scaler.load_state_dict(checkpoint['scaler'])
    state = TrainingState(
        checkpoint['epoch'] + 1, best=dict(checkpoint.get('best') or {}), last_log=checkpoint.get('log')
    )
    if 'max_accuracy' in checkpoint and not state.best:  # the authors' files and DeiT's
        state.best['acc1'] = checkpoint['max_accuracy']
    saved_batch = flags_of(checkpoint).get('batch_size', batch_size)
    same_shape = checkpoint.get('world_size', world_size) == world_size and saved_batch == batch_size
    has_step = 'step' in checkpoint and (same_shape or steps_fixed)
    state.global_step = checkpoint['step'] if has_step else state.start_epoch * steps_per_epoch
    progress = checkpoint.get('progress')
    if progress is not None and same_shape:
        state.first_step, state.global_step, state.totals = (
            progress['steps'],
            progress['global_step'],
            progress['totals'],
        )
    elif progress is not None:
        if steps_fixed:
            state.global_step = progress['global_step']
        print(
            f'The checkpoint was taken during epoch {state.start_epoch} with {checkpoint.get("world_size")} '
            f'processes of batch {saved_batch}: with {world_size} of {batch_size} that epoch restarts from its '
            'beginning' + (f' at step {state.global_step} of the schedule' if steps_fixed else '')
        )
    return state
