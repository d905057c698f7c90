"""Models from flags or from a checkpoint, and the forms the run gives them: channels-last convs for training
and evaluation, parameters in their gradients' layout for training, the inference form (timm's
reparameterize_model) that every evaluation runs, and torch.compile.

Every entry point and script builds its model here, so a name, its keyword arguments and the weights of any
checkpoint kind (checkpoints.py) meet in one place, with one-line errors."""

import argparse
import copy
import json
from typing import Optional, Tuple

import timm
import timm.utils
import torch

import checkpoints
import models
import utils
from cli import FRACTION
from errors import UsageError

# The methods timm.utils.reparameterize_model calls on a module to fold it for inference.
FOLD_METHODS = ('fuse', 'reparameterize', 'switch_to_deploy')


# Errors of a model's constructor that mean its arguments do not fit it.
BUILD_ERRORS = (TypeError, ValueError, AssertionError, IndexError, KeyError, ZeroDivisionError)
# --model-kwargs values with the range of the flag that sets the same argument.
KWARG_RANGES = {'drop_path_rate': ('--drop-path', FRACTION), 'drop_rate': ('--drop', FRACTION)}


def check_model_kwargs(model_kwargs: Optional[dict]):
    """--model-kwargs that would build something other than what every entry point and script runs (an RGB
    classifier or backbone whose weights come from a file) or break a flag's range: one-line UsageErrors."""
    kwargs = model_kwargs or {}
    if not isinstance(kwargs, dict):
        raise UsageError(f'--model-kwargs {_brief(kwargs)} is not a mapping of argument names to values')
    if kwargs.get('pretrained'):
        raise UsageError(
            '--model-kwargs: pretrained is not taken (no weights are downloaded): give the weights as a '
            'file (main.py --finetune or --resume, --pretrained for main_det.py / main_seg.py, '
            '--checkpoint for the scripts)'
        )
    if kwargs.get('features_only'):
        raise UsageError(
            '--model-kwargs: features_only builds a feature extractor, not the classifier this runs: '
            'leave it out (main_det.py / main_seg.py build the dense models)'
        )
    if 'in_chans' in kwargs and kwargs['in_chans'] != 3:
        raise UsageError(
            f'--model-kwargs: in_chans {_brief(kwargs["in_chans"])}: the data are RGB images (3 '
            'channels) everywhere here; leave in_chans out'
        )
    for key, (flag, check) in KWARG_RANGES.items():
        if key in kwargs:
            try:
                check(str(kwargs[key]) if not isinstance(kwargs[key], bool) else 'true')
            except argparse.ArgumentTypeError as e:
                raise UsageError(f'--model-kwargs: {key} {e} (the range of {flag})') from None


def _brief(value, limit: int = 200) -> str:
    """JSON of a value for an error line, cut to `limit` characters."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + '...'


def create_model(name: str, model_kwargs: Optional[dict] = None, **kwargs) -> torch.nn.Module:
    """timm.create_model for --model (our variants by either name, or any timm model) and --model-kwargs,
    with a one-line UsageError for an unknown model or arguments it does not take."""
    resolved = models.resolve_model_name(name)
    if not timm.is_model(resolved):
        raise UsageError(
            f'unknown model {name!r}: choose RAVLT_T, RAVLT_S, RAVLT_B or RAVLT_L (any timm model name '
            'also works, see timm.list_models())'
        )
    check_model_kwargs(model_kwargs)
    try:
        return timm.create_model(resolved, **dict(model_kwargs or {}, **kwargs))
    except BUILD_ERRORS as e:
        raise UsageError(f'cannot build {resolved} with --model-kwargs {_brief(model_kwargs)}: {e}') from None


def create_dense_model(
    task: str,
    name: str,
    num_classes: Optional[int] = None,
    model_kwargs: Optional[dict] = None,
    drop_path: Optional[float] = None,
    pretrained: str = '',
    **detector_kwargs,
) -> torch.nn.Module:
    """A detector or segmenter (models.dense) on a RAVLT backbone, with the backbone weights of `pretrained`
    (any checkpoint holding RAVLT weights) when given."""
    from models.dense import build_dense_model  # torchvision's detectors, segmentation_models_pytorch

    check_model_kwargs(model_kwargs)
    backbone_kwargs = dict(model_kwargs or {})
    if drop_path is not None:
        backbone_kwargs['drop_path_rate'] = drop_path
    try:
        model = build_dense_model(task, name, num_classes, backbone_kwargs, **detector_kwargs)
    except BUILD_ERRORS as e:
        raise UsageError(
            f'cannot build {task} with --model {name} and --model-kwargs {_brief(model_kwargs)}: {e}'
        ) from None
    if pretrained:
        missing, unexpected = checkpoints.load_backbone_weights(
            model, checkpoints.load_checkpoint(pretrained), f'--pretrained {pretrained}', name
        )
        print(
            f'Backbone weights from {pretrained}: {len(missing)} missing {missing}, '
            f'{len(unexpected)} unexpected {unexpected}'
        )
    return model


def checkpoint_classes(state_dict: dict, model: torch.nn.Module) -> Optional[int]:
    """The class count of the classifier in `state_dict` (weights of `model`'s kind), or None without one."""
    head = next(
        (k for k in sorted(checkpoints.classifier_keys(model)) if k.endswith('weight') and k in state_dict), None
    )
    return None if head is None else state_dict[head].shape[0]


def model_from_checkpoint(
    checkpoint: dict,
    source: str,
    model_name: Optional[str] = None,
    model_kwargs: Optional[dict] = None,
    ema: bool = False,
    default_name: str = 'RAVLT_S',
    num_classes: Optional[int] = None,
    parser=None,
    **kwargs,
) -> Tuple[torch.nn.Module, str]:
    """(classifier with the weights of `checkpoint`, its model name). The model and its keyword arguments are
    the checkpoint's own (its training flags, checked by `parser`'s --model and --model-kwargs, else the
    published variant its weights fit, else `default_name`) unless given; the class count is its classifier's,
    or `num_classes`, for which a classifier of another count is left new (fine-tuning). `ema`: the EMA weights
    when it has them; `kwargs` go to create_model."""
    taken = [dest for dest, given in (('model', model_name), ('model_kwargs', model_kwargs)) if given is None]
    flags = checkpoints.flags_of(checkpoint, source, parser, check=taken if parser is not None else ())
    state = checkpoints.state_dict_of(checkpoint, ema, source)
    checkpoints.check_weight_values(state, {}, source)
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
            raise UsageError(
                '--compile on CUDA needs triton (pip install triton) and a GPU of compute capability 7.0 '
                'or newer; or leave --compile out'
            )
        return
    from torch._inductor import config, cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        tried = ', '.join(c for c in config.cpp.cxx if c)
        raise UsageError(
            f'--compile on the CPU needs a C++ compiler and none works here (tried {tried}): install g++ '
            '(or set CXX to a compiler); or leave --compile out'
        ) from None


def channels_last_convs(model: torch.nn.Module):
    """Conv weights channels-last, as RAVLT's activations (and a channels-last weight makes any model's convs
    run so): no layout change per call, and their gradients come in the weights' layout, as
    DistributedDataParallel's buckets expect. Training and evaluation run the same kernels."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.to(memory_format=torch.channels_last)


def match_gradient_layouts(module: torch.nn.Module, example: torch.Tensor, amp_dtype: Optional[torch.dtype] = None):
    """Give each parameter of `module` the strides of the gradient the kernels make for it, where the two differ
    only at size-1 dimensions (the same memory, so this moves nothing). DistributedDataParallel's buckets take
    the parameters' strides and otherwise warn "Grad strides do not match bucket view strides" and copy such
    gradients every step. Which stride a size-1 dimension gets varies by kernel (the gradient of a 1x1 kernel
    used in slices, as RALA's q, k, v, o, comes contiguous, a convolution's channels-last), so one backward of
    `module` on `example`, in eval mode (no statistics or random draws change) under the run's autocast, finds
    out once before training: no hook runs in training. Call after channels_last_convs, before the optimizer
    and the EMA exist."""
    params = [p for p in module.parameters() if p.requires_grad]
    held, training = [p.grad for p in params], module.training
    for param in params:
        param.grad = None
    module.eval()
    try:
        with utils.autocast(utils.module_device(module), amp_dtype):
            output = module(example.to(utils.module_device(module)))
        sum(t.float().sum() for t in _floating_tensors(output)).backward()
        for param in params:
            grad = param.grad
            if (
                grad is not None
                and grad.stride() != param.stride()
                and all(g == p for g, p, n in zip(grad.stride(), param.stride(), param.shape) if n != 1)
            ):
                param.data = param.data.as_strided(param.shape, grad.stride())
    finally:
        module.train(training)
        for param, grad in zip(params, held):
            param.grad = grad


def _floating_tensors(output) -> list:
    """The floating-point tensors in a module's output (a tensor, or dicts, lists and tuples of them)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else []
    return [t for value in values for t in _floating_tensors(value)]
