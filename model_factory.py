"""Models from flags or from a checkpoint, and the forms the run gives them: channels-last convs for training
and evaluation, the inference form (timm's reparameterize_model) that every evaluation runs, and torch.compile.

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


def model_from_checkpoint(checkpoint: dict, source: str, model_name: Optional[str] = None,
                          model_kwargs: Optional[dict] = None, ema: bool = False,
                          default_name: str = 'RAVLT_S') -> Tuple[torch.nn.Module, str]:
    """(classifier with the weights of `checkpoint`, its model name). The model and its keyword arguments are
    the checkpoint's own (its training flags, else the published variant its weights fit, else `default_name`)
    unless given; the class count is its classifier's. `ema`: the EMA weights when it has them."""
    flags = checkpoints.flags_of(checkpoint)
    state = checkpoints.state_dict_of(checkpoint, ema)
    name = model_name or flags.get('model') or checkpoints.ravlt_variant_of(state) or default_name
    if model_kwargs is None:
        model_kwargs = flags.get('model_kwargs')
    model = create_model(name, model_kwargs)
    head = next((k for k in sorted(checkpoints.classifier_keys(model)) if k.endswith('weight') and k in state), None)
    if head is not None and state[head].shape[0] != model.num_classes:
        model = create_model(name, model_kwargs, num_classes=state[head].shape[0])
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


def compile_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile(model) (Inductor), after checking that it can generate code on `device`. The result wraps the
    model (its state dict has `_orig_mod.` keys): keep the model itself for checkpoints. Random draws inside
    the model (drop path) are eager's (Inductor's `fallback_random`): a compiled run trains as the eager run does,
    within float32 rounding, and resumes as it does."""
    check_compiler(device)
    import torch._inductor.config
    torch._inductor.config.fallback_random = True
    return torch.compile(model)


def check_compiler(device: torch.device):
    """One line instead of a failure at the first step: Inductor needs a C++ compiler for the CPU and triton (on
    a GPU it supports) for CUDA."""
    if device.type == 'cuda':
        from torch.utils._triton import has_triton
        if not has_triton():
            raise UsageError('--compile on CUDA needs triton (pip install triton) and a GPU of compute capability 7.0 '
                             'or newer; or leave --compile out')
        return
    from torch._inductor import config, cpp_builder, exc
    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        tried = ', '.join(c for c in config.cpp.cxx if c)
        raise UsageError(f'--compile on the CPU needs a C++ compiler and none works here (tried {tried}): install g++ '
                         '(or set CXX to a compiler); or leave --compile out') from None


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
