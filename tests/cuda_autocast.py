"""CUDA's autocast op policy, simulated on any device (the CPU's own autocast has other lists, so CPU tests cannot
see what CUDA does): products (convolutions, matmuls, einsum, linear, attention) run in the low dtype; `exp`,
`reciprocal` (also `1 / x`), `pow`, norms and the other float32-listed functions in float32; `softmax`, `sum`,
`cumsum`, `prod`, `log_softmax` output float32 unless given a dtype; everything else follows type promotion.
The lists are torch's (aten/src/ATen/autocast_mode.cpp, CUDA), for the functions these models call.

    with CudaAutocast(torch.float16) as policy:
        model(x)
    policy.products  # [(function name, (dtype of each floating tensor operand before the cast), ...]
"""

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

Tensor = torch.Tensor
LOW_PRECISION = {
    torch.conv2d,
    torch.conv_transpose2d,
    torch.matmul,
    Tensor.matmul,
    Tensor.__matmul__,
    torch.mm,
    Tensor.mm,
    torch.bmm,
    Tensor.bmm,
    torch.einsum,
    F.linear,
    F.scaled_dot_product_attention,
    torch.baddbmm,
    torch.addmm,
}
FLOAT32 = {
    torch.exp,
    Tensor.exp,
    torch.expm1,
    Tensor.expm1,
    torch.log,
    Tensor.log,
    torch.reciprocal,
    Tensor.reciprocal,
    torch.rsqrt,
    Tensor.rsqrt,
    torch.pow,
    Tensor.pow,
    Tensor.__pow__,
    F.layer_norm,
    F.group_norm,
    F.softplus,
    F.cross_entropy,
    F.nll_loss,
    F.mse_loss,
    F.l1_loss,
    F.smooth_l1_loss,
    F.binary_cross_entropy_with_logits,
    torch.cdist,
    torch.logsumexp,
    Tensor.logsumexp,
}
FLOAT32_UNLESS_GIVEN = {
    torch.softmax,
    Tensor.softmax,
    F.softmax,
    F.log_softmax,
    Tensor.log_softmax,
    torch.sum,
    Tensor.sum,
    torch.cumsum,
    Tensor.cumsum,
    torch.prod,
    Tensor.prod,
}
RECIPROCAL_OF = {Tensor.__rtruediv__, Tensor.__rdiv__}  # `1 / x`: reciprocal (float32-listed), then a multiply


def _cast(value, dtype):
    if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _dtypes(value) -> list:
    if isinstance(value, Tensor):
        return [value.dtype] if value.is_floating_point() else []
    if isinstance(value, (list, tuple)):
        return [d for v in value for d in _dtypes(v)]
    return []


class CudaAutocast(TorchFunctionMode):
    def __init__(self, dtype: torch.dtype = torch.float16):
        super().__init__()
        self.dtype, self.products = dtype, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in LOW_PRECISION:
            self.products.append((getattr(func, '__name__', str(func)), tuple(_dtypes(args))))
            return func(*_cast(args, self.dtype), **kwargs)
        if func in FLOAT32:
            return func(*_cast(args, torch.float32), **kwargs)
        if func in FLOAT32_UNLESS_GIVEN and kwargs.get('dtype') is None:
            return func(*args, **dict(kwargs, dtype=torch.float32))
        if func in RECIPROCAL_OF:
            tensor, other = args[:2]
            return torch.reciprocal(_cast(tensor, torch.float32)) * other
        return func(*args, **kwargs)
