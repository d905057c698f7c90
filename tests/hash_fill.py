"""'hash fill v1': deterministic weights and inputs for comparing with the authors' golden outputs
(the recipe is described in tests/fixtures/README.md)."""

import math
import zlib

import numpy as np
import torch

M = np.uint64(2**32 - 1)


def hash32(x: np.ndarray) -> np.ndarray:
    x = x & M
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & M
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & M
    x ^= x >> np.uint64(16)
    return x


def unit(name: str, n: int) -> np.ndarray:
    """n values with mean 0 and variance 1, determined by `name`."""
    i = np.arange(n, dtype=np.uint64)
    h = hash32((i * np.uint64(0x9E3779B1) + np.uint64(zlib.crc32(name.encode('utf-8')))) & M)
    return (2.0 * h.astype(np.float64) / 2**32 - 1.0) * math.sqrt(3.0)


def fill_value(key: str, shape) -> torch.Tensor:
    """The recipe's value for one state-dict entry (float64; None for the RoPE `angle` buffers)."""
    if key.endswith('num_batches_tracked'):
        return torch.zeros((), dtype=torch.int64)
    if key.endswith('.angle'):
        return None
    u = torch.from_numpy(unit(key, int(np.prod(shape)))).reshape(tuple(shape))
    if key.endswith('running_mean'):
        return 0.1 * u
    if key.endswith('running_var'):
        return 1 + 0.5 * u.abs()
    if key.split('.')[-1].startswith('gamma_'):
        return 0.5 + 0.1 * u
    if key.endswith('.bias'):
        return 0.05 * u
    if len(shape) == 1 and key.endswith('.weight'):
        return 1 + 0.1 * u
    return u / math.sqrt(float(np.prod(shape[1:])))


def hash_fill_(model: torch.nn.Module) -> torch.nn.Module:
    """Cast the model to float64 and load the recipe's values into every tensor but the RoPE angles."""
    model.double()
    state = model.state_dict()
    filled = {k: (v if fill_value(k, v.shape) is None else fill_value(k, v.shape)) for k, v in state.items()}
    model.load_state_dict(filled, strict=True)
    return model


def hash_input(shape) -> torch.Tensor:
    b, c, h, w = shape
    return torch.from_numpy(unit(f'input/{b}x{c}x{h}x{w}', b * c * h * w)).reshape(b, c, h, w)
