"""Importing this package registers the RAVLT models with timm (`ravlt_t`, `ravlt_s`, `ravlt_b`, `ravlt_l`)."""

from .ravlt import (
    ATTENTION_TYPES,
    PAPER_RESULTS,
    RALA,
    RAVLT,
    RAVLT_CONFIGS,
    SoftmaxAttention,
    checkpoint_filter_fn,
)

__all__ = [
    'ATTENTION_TYPES',
    'PAPER_RESULTS',
    'RAVLT',
    'RAVLT_CONFIGS',
    'RALA',
    'SoftmaxAttention',
    'checkpoint_filter_fn',
    'AUTHOR_NAMES',
    'resolve_model_name',
]

# The authors' names (RAVLT_T ...) are accepted by our scripts; they map to the timm names.
AUTHOR_NAMES = {name.upper(): name for name in RAVLT_CONFIGS}


def resolve_model_name(name: str) -> str:
    """'RAVLT_S' or 'ravlt_s' -> 'ravlt_s'; any other name is returned unchanged (a timm model)."""
    return AUTHOR_NAMES.get(name, AUTHOR_NAMES.get(name.upper(), name))
