"""Every model the code builds, from flags or from a checkpoint, and the forms the run gives it: channels-last
convs, parameters in their gradients' layout, the inference form every evaluation runs, torch.compile."""

import copy
import json
from typing import Optional, Tuple

import timm
import torch

import checkpoints
import models
import utils
from errors import UsageError

# Errors of a model's constructor that mean its arguments do not fit it.
BUILD_ERRORS = (TypeError, ValueError, AssertionError, IndexError, KeyError, ZeroDivisionError)


def create_model(name: str, model_kwargs: Optional[dict] = None, **kwargs) -> torch.nn.Module:
    """timm.create_model for --model (our variants by either name, or any timm model) and --model-kwargs."""
    resolved = models.resolve_model_name(name)
    if not timm.is_model(resolved):
        raise UsageError(f'unknown model {name!r}: choose RAVLT_T, RAVLT_S, RAVLT_B or RAVLT_L (or a timm model)')
    if (model_kwargs or {}).get('pretrained'):
        raise UsageError('--model-kwargs: pretrained downloads nothing here; give the weights as a file')
    try:
        return timm.create_model(resolved, **dict(model_kwargs or {}, **kwargs))
    except BUILD_ERRORS as e:
        raise UsageError(f'cannot build {resolved} with --model-kwargs {json.dumps(model_kwargs)}: {e}') from None


def create_dense_model(
    task: str,
    name: str,
    num_classes: Optional[int] = None,
    model_kwargs: Optional[dict] = None,
    drop_path: Optional[float] = None,
    pretrained: str = '',
    **detector_kwargs,
) -> torch.nn.Module:
    """A detector or segmenter (models.dense) on a RAVLT backbone, with the backbone weights of `pretrained` (any
    checkpoint holding RAVLT weights) when given."""
    from models.dense import build_dense_model  # torchvision's detectors, segmentation_models_pytorch

    backbone_kwargs = dict(model_kwargs or {}, **({} if drop_path is None else {'drop_path_rate': drop_path}))
    try:
        model = build_dense_model(task, name, num_classes, backbone_kwargs, **detector_kwargs)
    except BUILD_ERRORS as e:
        raise UsageError(
            f'cannot build {task} with --model {name} --model-kwargs {json.dumps(model_kwargs)}: {e}'
        ) from None
    if pretrained:
        checkpoint = checkpoints.load_checkpoint(pretrained)
        missing, unexpected = checkpoints.load_backbone_weights(model, checkpoint, f'--pretrained {pretrained}', name)
        print(f'Backbone weights from {pretrained}: {len(missing)} missing {missing}, {len(unexpected)} unexpected')
    return model


def checkpoint_classes(state_dict: dict, model: torch.nn.Module) -> Optional[int]:
    """The class count of the classifier in `state_dict` (weights of `model`'s kind), or None without one."""
    head = next((k for k in sorted(checkpoints.classifier_keys(model)) if k.endswith('weight') and k in state_dict), 0)
    return state_dict[head].shape[0] if head else None


def model_from_checkpoint(
    checkpoint: dict,
    source: str,
    model_name: Optional[str] = None,
    model_kwargs: Optional[dict] = None,
    ema: bool = False,
    num_classes: Optional[int] = None,
    **kwargs,
) -> Tuple[torch.nn.Module, str]:
    """(classifier with the weights of `checkpoint`, its model name). The model and its keyword arguments are the
    checkpoint's own (its flags, else the published variant its weights fit) unless given; the class count is its
    classifier's unless `num_classes` differs, which gives a new classifier (fine-tuning). `ema`: the EMA weights
    when it has them; `kwargs` go to create_model."""
    flags = checkpoints.flags_of(checkpoint)
    state = checkpoints.state_dict_of(checkpoint, ema, source)
    name = model_name or flags.get('model') or checkpoints.ravlt_variant_of(state) or 'RAVLT_S'
    model_kwargs = flags.get('model_kwargs') if model_kwargs is None else model_kwargs
    model = create_model(name, model_kwargs, **kwargs)
    theirs = checkpoint_classes(state, model)
    classes = num_classes or theirs or model.num_classes
    if classes != model.num_classes:
        model = create_model(name, model_kwargs, num_classes=classes, **kwargs)
    if theirs is not None and theirs != classes:
        head = checkpoints.classifier_keys(model)
        without_head = {'model': {k: v for k, v in state.items() if k not in head}, 'args': checkpoint.get('args')}
        checkpoints.load_weights(model, without_head, source, name, allowed_missing=head)
    else:
        checkpoints.load_weights(model, checkpoint, source, name, ema=ema)
    return model, name


def inference_form(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """The model as --eval, the benchmark and the ONNX export run it: in eval mode with timm's inference-only folds
    (timm.utils.reparameterize_model: RAVLT's BatchNorms into their convs, its depthwise skips into their
    kernels); a copy unless `inplace` (training goes on with the model itself)."""
    model = (model if inplace else copy.deepcopy(model)).eval()
    return timm.utils.reparameterize_model(model, inplace=True)


def compile_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile (Inductor). Random draws inside the model (drop path) stay eager's (`fallback_random`), so a
    compiled run trains and resumes as the eager one does, within float32 rounding. Keep the model itself for
    checkpoints (the result's keys start with `_orig_mod.`)."""
    check_compiler(device)
    import torch._inductor.config

    torch._inductor.config.fallback_random = True
    return torch.compile(model)


def check_compiler(device: torch.device):
    """One line instead of a failure at the first step: Inductor needs triton on CUDA, a C++ compiler on the CPU."""
    if device.type == 'cuda':
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UsageError('--compile on CUDA needs triton (pip install triton); or leave --compile out')
        return
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise UsageError(
            '--compile on the CPU needs a C++ compiler (install g++ or set CXX); or leave it out'
        ) from None


def channels_last_convs(model: torch.nn.Module):
    """Conv weights channels-last, as RAVLT's activations: no layout change per call, and their gradients come in
    the weights' layout, as DistributedDataParallel's buckets expect."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.to(memory_format=torch.channels_last)


def match_gradient_layouts(module: torch.nn.Module, example: torch.Tensor, amp_dtype: Optional[torch.dtype] = None):
    """Give each parameter the strides of the gradient the kernels make for it where the two differ only at size-1
    dimensions (the same memory: nothing moves), found by one backward of `module` on `example` in eval mode.
    Otherwise DDP warns "Grad strides do not match bucket view strides" and copies such gradients every step
    (RALA's 1x1 q, k, v, o kernels, used in slices, get contiguous gradients; convolutions channels-last ones).
    Call after channels_last_convs, before the optimizer and the EMA exist."""
    params = [p for p in module.parameters() if p.requires_grad]
    training = module.training
    module.eval()
    try:
        device = utils.module_device(module)
        with utils.autocast(device, amp_dtype):
            output = module(example.to(device))
        flat = (
            output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else [output]
        )
        sum(t.float().sum() for t in flat if t.is_floating_point()).backward()
        for param in params:
            grad, same = param.grad, lambda g, p, n: g == p or n == 1
            if grad is not None and all(same(g, p, n) for g, p, n in zip(grad.stride(), param.stride(), param.shape)):
                param.data = param.data.as_strided(param.shape, grad.stride())
    finally:
        module.train(training)
        for param in params:
            param.grad = None
