"""A plain, literal RAVLT block, the reference the fast modules in `models/ravlt.py` are tested against.

The formulas as the paper and the authors' code write them: token-major (B, heads, N, head_dim) tensors,
full RoPE tables rebuilt on every call, q' = elu(q) + 1 and k' = elu(k) + 1 materialised, the N and 1/N
factors of RALA kept, an explicit softmax over the N x N scores. Slow and memory-hungry on purpose: it is
only for reading, for tests and for the rank analysis (scripts/rank_analysis.py), which needs what the fast
modules never form: the KV buffer, the attention matrix and the output features before `proj`. It takes its
weights from our modules, so both compute with the same ones.

Attention kinds (the names of `attn_types`): 'softmax', and four linear ones that differ in RALA's two rank
augmentations, alpha (the KV buffer's) and LePE plus the gate o (the output's):

    kind                alpha  LePE and gate
    linear              no     no      (the paper's baseline)
    rala_no_alpha       no     yes
    rala_no_gate_lepe   yes    no
    rala                yes    yes
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ravlt import RALA, RAVLTBlock, SoftmaxAttention

# kind: (alpha, LePE and gate)
LINEAR_KINDS = {
    'linear': (False, False),
    'rala_no_alpha': (False, True),
    'rala_no_gate_lepe': (True, False),
    'rala': (True, True),
}


def rope_tables(angle: torch.Tensor, height: int, width: int):
    """sin and cos tables (H * W, head_dim): channel c < head_dim / 2 turns by row * angle[c], the others by
    column * angle[c - head_dim / 2]; `angle` holds each frequency twice, so both channels of a pair agree."""
    rows = torch.arange(height, dtype=angle.dtype, device=angle.device)
    cols = torch.arange(width, dtype=angle.dtype, device=angle.device)
    pos_h = (rows[:, None] * angle[None, :])[:, None, :].repeat(1, width, 1)  # (H, W, d/2)
    pos_w = (cols[:, None] * angle[None, :])[None, :, :].repeat(height, 1, 1)
    pos = torch.cat([pos_h, pos_w], dim=-1).flatten(0, 1)  # (H*W, d)
    return torch.sin(pos), torch.cos(pos)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)


def rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_every_two(x) * sin


def rala(q, k, v, sin, cos, scale: float):
    """Rank-augmented linear attention of (B, heads, N, head_dim) tensors: (output, KV buffer (B, h, d, d))."""
    n = q.shape[-2]
    q = F.elu(q) + 1.0
    k = F.elu(k) + 1.0
    q_mean = q.mean(dim=-2, keepdim=True)  # (B, h, 1, d)
    alpha = torch.softmax(scale * q_mean @ k.transpose(-1, -2), dim=-1)  # (B, h, 1, N)
    k = k * alpha.transpose(-1, -2) * n
    z = 1.0 / (q @ k.mean(dim=-2, keepdim=True).transpose(-1, -2) + 1e-6)  # (B, h, N, 1)
    kv = (rope(k, sin, cos).transpose(-1, -2) * n**-0.5) @ (v * n**-0.5)  # (B, h, d, d)
    return rope(q, sin, cos) @ kv * z, kv


def linear_attention(q, k, v, sin, cos):
    """Plain linear attention with RALA's features and RoPE, of (B, heads, N, head_dim) tensors:
    out_n = RoPE(q'_n) (mean_m RoPE(k'_m) v_m^T) / (q'_n . mean_m k'_m + 1e-6). Returns (output, KV buffer)."""
    q = F.elu(q) + 1.0
    k = F.elu(k) + 1.0
    z = 1.0 / (q @ k.mean(dim=-2, keepdim=True).transpose(-1, -2) + 1e-6)  # (B, h, N, 1)
    kv = rope(k, sin, cos).transpose(-1, -2) @ v / q.shape[-2]  # (B, h, d, d)
    return rope(q, sin, cos) @ kv * z, kv


def softmax_attention(q, k, v, sin, cos, scale: float):
    """Softmax attention with RoPE on q and k, (B, heads, N, head_dim) tensors: (output, attention (B, h, N, N))."""
    q, k = rope(q, sin, cos), rope(k, sin, cos)
    attn = torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1)
    return attn @ v, attn


def kind_of(module: nn.Module) -> str:
    """The `attn_types` name of an attention module."""
    if isinstance(module, SoftmaxAttention):
        return 'softmax'
    if isinstance(module, RALA):
        return next(kind for kind, flags in LINEAR_KINDS.items() if flags == (module.alpha, module.gate_lepe))
    raise TypeError(f'no reference for {type(module).__name__}')


def has_gate(module: nn.Module) -> bool:
    """Whether the module has the gate o and LePE (the layout of RALA and softmax attention)."""
    return hasattr(module, 'qkvo')


def computable_kinds(module: nn.Module) -> list:
    """The kinds whose formulas the module's weights feed: its own, and for a linear kind every linear kind
    its layout allows (alpha has no parameters; a module with gate and LePE can also be computed without)."""
    own = kind_of(module)
    if own not in LINEAR_KINDS:
        return [own]
    return [own] + [
        kind for kind, (_, gated) in LINEAR_KINDS.items() if kind != own and (has_gate(module) or not gated)
    ]


def attention_terms(module: nn.Module, x: torch.Tensor, angle: torch.Tensor, kind: str = '') -> dict:
    """What `module` computes on x (B, C, H, W) before its `proj`, literally, as its own kind or as another
    kind of `computable_kinds(module)` with the same weights: {'kv_buffer': (B, h, d, d) for the linear kinds
    or 'attention_matrix': (B, h, N, N) for softmax, 'output': the output features (B, h, N, d)}."""
    kind = kind or kind_of(module)
    if kind not in computable_kinds(module):
        raise ValueError(
            f'{type(module).__name__} cannot be computed as {kind!r}; it can as {computable_kinds(module)}'
        )
    B, C, H, W = x.shape
    h, d = module.num_heads, module.head_dim

    def heads(t):  # (B, C, H, W) -> (B, h, N, d)
        return t.reshape(B, h, d, H * W).transpose(-1, -2)

    if has_gate(module):
        q, k, v, o = module.qkvo(x).chunk(4, dim=1)
    else:
        q, k, v = module.qkv(x).chunk(3, dim=1)
    sin, cos = rope_tables(angle, H, W)
    if kind == 'softmax':
        out, attn = softmax_attention(heads(q), heads(k), heads(v), sin, cos, d**-0.5)
        terms = {'attention_matrix': attn}
        gated = True
    else:
        alpha, gated = LINEAR_KINDS[kind]
        if alpha:
            out, kv = rala(heads(q), heads(k), heads(v), sin, cos, d**-0.5)
        else:
            out, kv = linear_attention(heads(q), heads(k), heads(v), sin, cos)
        terms = {'kv_buffer': kv}
    if gated:
        out = (out + heads(module.lepe(v))) * heads(o)
    terms['output'] = out
    return terms


def attention(module: nn.Module, x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """What an attention module of `ATTENTION_TYPES` computes on x (B, C, H, W), literally."""
    B, C, H, W = x.shape
    out = attention_terms(module, x, angle)['output']
    return module.proj(out.transpose(-1, -2).reshape(B, C, H, W))


def layer_norm_2d(norm, x: torch.Tensor) -> torch.Tensor:
    return norm.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The plain convolution of a conv module (without the skip connection of a ResidualDepthwiseConv)."""
    return nn.Conv2d.forward(module, x)


def block(module: RAVLTBlock, x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """What a RAVLTBlock computes without stochastic depth."""
    x = x + conv(module.pos, x)
    x = x + module.gamma_1 * attention(module.attn, layer_norm_2d(module.norm1, x), angle)
    ffn = module.ffn
    y = F.gelu(ffn.fc1(layer_norm_2d(module.norm2, x)))
    y = ffn.fc2(y + conv(ffn.dwconv, y))
    return x + module.gamma_2 * y
