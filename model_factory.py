"""Models from flags or from a checkpoint, and the forms the run gives them: channels-last convs for training
and evaluation, and the inference form (timm's reparameterize_model) that every evaluation runs.

Every entry point and script builds its model here, so a name, its keyword arguments and the weights of any
checkpoint kind (checkpoints.py) meet in one place, with one-line errors."""
import copy
import functools
import json
from typing import Optional, Tuple

import timm
import timm.utils
import torch

import checkpoints
import models
from errors import UsageError

# The methods timm.utils.reparameterize_model calls on a module to fold it for inference.
FOLD_METHODS = ('fuse', 'reparameterize', 'switch_to_deploy')


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


def create_dense_model(task: str, name: str, num_classes: Optional[int] = None, model_kwargs: Optional[dict] = None,
                       drop_path: Optional[float] = None, pretrained: str = '', **detector_kwargs) -> torch.nn.Module:
    """A detector or segmenter (models.dense) on a RAVLT backbone, with the backbone weights of `pretrained`
    (any checkpoint holding RAVLT weights) when given."""
    from models.dense import build_dense_model  # torchvision's detectors, segmentation_models_pytorch
    backbone_kwargs = dict(model_kwargs or {})
    if drop_path is not None:
        backbone_kwargs['drop_path_rate'] = drop_path
    try:
        model = build_dense_model(task, name, num_classes, backbone_kwargs, **detector_kwargs)
    except (TypeError, ValueError, AssertionError, IndexError, KeyError) as e:
        raise UsageError(f'cannot build {task} with --model {name} and --model-kwargs '
                         f'{json.dumps(model_kwargs)}: {e}') from None
    if pretrained:
        missing, unexpected = checkpoints.load_backbone_weights(
            model, checkpoints.load_checkpoint(pretrained), f'--pretrained {pretrained}', name)
        print(f'Backbone weights from {pretrained}: {len(missing)} missing {missing}, '
              f'{len(unexpected)} unexpected {unexpected}')
    return model


def checkpoint_classes(state_dict: dict, model: torch.nn.Module) -> Optional[int]:
    """The class count of the classifier in `state_dict` (weights of `model`'s kind), or None without one."""
    head = next((k for k in sorted(checkpoints.classifier_keys(model)) if k.endswith('weight') and k in state_dict),
                None)
    return None if head is None else state_dict[head].shape[0]


def model_from_checkpoint(checkpoint: dict, source: str, model_name: Optional[str] = None,
                          model_kwargs: Optional[dict] = None, ema: bool = False, default_name: str = 'RAVLT_S',
                          num_classes: Optional[int] = None, **kwargs) -> Tuple[torch.nn.Module, str]:
    """(classifier with the weights of `checkpoint`, its model name). The model and its keyword arguments are
    the checkpoint's own (its training flags, else the published variant its weights fit, else `default_name`)
    unless given; the class count is its classifier's, or `num_classes`, for which a classifier of another
    count is left new (fine-tuning). `ema`: the EMA weights when it has them; `kwargs` go to create_model."""
    flags = checkpoints.flags_of(checkpoint)
    state = checkpoints.state_dict_of(checkpoint, ema)
    name = model_name or flags.get('model') or checkpoints.ravlt_variant_of(state) or default_name
    if model_kwargs is None:
        model_kwargs = flags.get('model_kwargs')
    model = create_model(name, model_kwargs, **kwargs)
    theirs = checkpoint_classes(state, model)
    classes = num_classes or theirs or model.num_classes
    if classes != model.num_classes:
        model = create_model(name, model_kwargs, num_classes=classes, **kwargs)
    if theirs is not None and theirs != classes:
        head = checkpoints.classifier_keys(model)
        checkpoint = {'model': {k: v for k, v in state.items() if k not in head}, 'args': checkpoint.get('args')}
        checkpoints.load_weights(model, checkpoint, source, name, allowed_missing=head)
    else:
        checkpoints.load_weights(model, checkpoint, source, name, ema=ema)
    return model, name


def for_inference(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """The model as --eval, the benchmark and the ONNX export run it: in eval mode, with timm's inference-only
    folds applied (timm.utils.reparameterize_model: RAVLT's BatchNorms into their convs, its FFN skips into
    their kernels). Unless `inplace`, a copy (training goes on with the model itself); the model itself when
    nothing folds."""
    if not any(hasattr(m, name) for m in model.modules() for name in FOLD_METHODS):
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
