"""What several test files share: the repository's root, the four RAVLT variants, a tiny RAVLT and the relative
error of two tensors. (A module of its own: pytest advises against importing conftest.py.)"""

import os

import timm
import torch

import models  # noqa: F401  (registers the RAVLT models)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ['ravlt_t', 'ravlt_s', 'ravlt_b', 'ravlt_l']
# Every module kind of RAVLT-T (two RALA stages, two softmax stages, one of them two blocks deep) at a small width.
TINY_KWARGS = dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4), projection_dim=64)


def tiny(**kwargs) -> torch.nn.Module:
    """A tiny RAVLT-T with 7 classes; the same weights on every call with the same kwargs."""
    torch.manual_seed(0)
    return timm.create_model('ravlt_t', **{**TINY_KWARGS, 'num_classes': 7, **kwargs})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in the Frobenius norm."""
    return ((a - b).norm() / b.norm()).item()
