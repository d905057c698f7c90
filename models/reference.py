"""A plain, literal RAVLT block, the reference the fast modules in `models/ravlt.py` are tested against.

The formulas as the paper and the authors' code write them: token-major (B, heads, N, head_dim) tensors,
full RoPE tables rebuilt on every call, q' = elu(q) + 1 and k' = elu(k) + 1 materialised, the N and 1/N
factors of RALA kept, an explicit softmax over the N x N scores. Slow and memory-hungry on purpose: it is
only for reading and for tests. It takes its weights from our modules, so both compute with the same ones.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .ravlt import RankAugmentedLinearAttention, RAVLTBlock, SoftmaxAttention


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
    """Rank-augmented linear attention of (B, heads, N, head_dim) tensors."""
    n = q.shape[-2]
    q = F.elu(q) + 1.0
    k = F.elu(k) + 1.0
    q_mean = q.mean(dim=-2, keepdim=True)  # (B, h, 1, d)
    alpha = torch.softmax(scale * q_mean @ k.transpose(-1, -2), dim=-1)  # (B, h, 1, N)
    k = k * alpha.transpose(-1, -2) * n
    z = 1.0 / (q @ k.mean(dim=-2, keepdim=True).transpose(-1, -2) + 1e-6)  # (B, h, N, 1)
    kv = (rope(k, sin, cos).transpose(-1, -2) * n ** -0.5) @ (v * n ** -0.5)  # (B, h, d, d)
    return rope(q, sin, cos) @ kv * z


def softmax_attention(q, k, v, sin, cos, scale: float):
    """Softmax attention with RoPE on q and k, (B, heads, N, head_dim) tensors."""
    q, k = rope(q, sin, cos), rope(k, sin, cos)
    attn = torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1)  # (B, h, N, N)
    return attn @ v


def attention(module, x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """What `module` (RALA or softmax attention) computes on x (B, C, H, W), literally."""
    B, C, H, W = x.shape
    h, d = module.num_heads, module.head_dim
    q, k, v, o = module.qkvo(x).chunk(4, dim=1)
    lepe = module.lepe(v)
    q, k, v = (t.reshape(B, h, d, H * W).transpose(-1, -2) for t in (q, k, v))  # (B, h, N, d)
    sin, cos = rope_tables(angle, H, W)
    if isinstance(module, RankAugmentedLinearAttention):
        out = rala(q, k, v, sin, cos, module.scale)
    elif isinstance(module, SoftmaxAttention):
        out = softmax_attention(q, k, v, sin, cos, module.scale)
    else:
        raise TypeError(f'no reference for {type(module).__name__}')
    out = out.transpose(-1, -2).reshape(B, C, H, W)
    return module.proj((out + lepe) * o)


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
