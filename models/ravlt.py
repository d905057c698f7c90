""" RAVLT: Rank-Augmented Vision Linear Transformer

A PyTorch implementation of RAVLT and its Rank-Augmented Linear Attention (RALA) from
`Breaking the Low-Rank Dilemma of Linear Attention` - https://arxiv.org/abs/2411.07635

    @inproceedings{fan2025breaking,
      title={Breaking the Low-Rank Dilemma of Linear Attention},
      author={Fan, Qihang and Huang, Huaibo and He, Ran},
      booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
      year={2025}
    }

RAVLT is a four-stage hierarchical network on (B, C, H, W) maps. Stages 1-2 use RALA, stages 3-4
(few tokens) use softmax attention; both kinds share one parameter layout, apply 2-D RoPE to q and
k, add a 5x5 depthwise LePE of v and gate the result with a fourth projection `o`.

Module attribute names follow the authors' code, so their checkpoints (`RAVLT_T.pth` ...) load with
`strict=True`; class names say what the modules are.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

__all__ = ['RAVLT', 'RankAugmentedLinearAttention', 'SoftmaxAttention', 'RAVLT_CONFIGS']


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (the authors' `LayerNorm2d`, key `.norm`).

    The network runs channels-last, where both permutes below are free views.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.norm.normalized_shape, self.norm.weight, self.norm.bias,
                         self.norm.eps)
        return x.permute(0, 3, 1, 2)


class RotaryEmbedding2d(nn.Module):
    """2-D rotary position embedding tables for one stage.

    The persistent buffer `angle` (head_dim / 2 values, each frequency twice, interleaved) is part of
    the authors' checkpoints. Channels (2i, 2i + 1) of a head are a pair that turns by one angle: a
    token at row h, column w turns the pairs of the first half of the head dim by h * angle and those
    of the second half by w * angle. Tables are (H * W, head_dim / 2), row-major tokens by pairs, and
    cached per size, device and dtype.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 4))
        self.register_buffer('angle', angle.repeat_interleave(2), persistent=True)
        self._cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
        angle = self.angle[0::2]  # one angle per pair (the buffer holds each twice)
        rows = torch.arange(height, device=angle.device, dtype=angle.dtype)
        cols = torch.arange(width, device=angle.device, dtype=angle.dtype)
        pos_h = (rows[:, None] * angle)[:, None, :].expand(-1, width, -1)  # (H, W, d/4)
        pos_w = (cols[:, None] * angle)[None, :, :].expand(height, -1, -1)
        pos = torch.cat([pos_h, pos_w], dim=-1).flatten(0, 1)  # (H*W, d/2)
        return torch.sin(pos), torch.cos(pos)

    def forward(self, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self._tables(height, width)
        # `_version` changes when a state dict is loaded into the buffer in place.
        key = (height, width, self.angle.device, self.angle.dtype, self.angle._version)
        tables = self._cache.get(key)
        if tables is None:
            if len(self._cache) > 8:
                self._cache.clear()
            tables = self._cache[key] = self._tables(height, width)
        return tables


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, shift: float = 0.0,
               inplace: bool = False) -> torch.Tensor:
    """RoPE of x + shift: each channel pair (x0, x1) = x[..., 2i:2i + 2] of x (..., head_dim) turns to
    (x0 cos - x1 sin, x1 cos + x0 sin); sin and cos broadcast against (..., head_dim / 2). Computed in
    at least the tables' precision; the result has x's dtype.

    `inplace` lets float32 / float64 results overwrite x (only where autograd does not need x).
    """
    dtype = torch.promote_types(x.dtype, cos.dtype)
    if torch.compiler.is_compiling() or x.stride(-1) != 1:
        # The real form: Inductor fuses it into one kernel.
        x0, x1 = (x.to(dtype) + shift).unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2).to(x.dtype)
    # Eager: a pair is a complex number, so the rotation (and the shift) is one multiply-add, one pass over
    # x. Pairs are adjacent in memory on channels-last maps, so the complex view is free.
    inplace = inplace and x.dtype == dtype
    pairs = torch.view_as_complex(x.to(dtype).unflatten(-1, (-1, 2)))
    turn = torch.complex(cos.to(dtype), sin.to(dtype))
    if inplace:
        rotated = (pairs.add_(complex(shift, shift)) if shift else pairs).mul_(turn)
    else:
        rotated = torch.addcmul(turn * complex(shift, shift), pairs, turn) if shift else pairs * turn
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


def can_overwrite() -> bool:
    """Whether eager inference may overwrite its own intermediates. Autograd needs them (and an in-place op
    on a view costs it a zero-filled copy of the whole map in the backward); Inductor plans its own buffers."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling())


class GatedAttentionBase(nn.Module):
    """What RALA and softmax attention share: one 1x1 conv to q, k, v, o; a 5x5 depthwise LePE of v;
    the output gated by o and projected: proj((attend(q, k, v) + lepe(v)) * o)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0 and (dim // num_heads) % 4 == 0, 'head_dim must be a multiple of 4 (2-D RoPE)'
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkvo = nn.Conv2d(dim, dim * 4, 1)
        self.lepe = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj = nn.Conv2d(dim, dim, 1)

    def attend(self, qk: torch.Tensor, v: torch.Tensor, lepe: torch.Tensor, sin: torch.Tensor,
               cos: torch.Tensor) -> torch.Tensor:
        """attention(q, k, v) + lepe, token-major: qk (B, N, 2, heads, head_dim) holds q and k; v and
        lepe are (B, N, heads, head_dim), as is the result. qk and lepe are overwritten if can_overwrite()."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x.contiguous(memory_format=torch.channels_last)  # free inside RAVLT, which runs channels-last
        if torch.is_autocast_enabled(x.device.type):  # cast once, not once per conv
            x = x.to(torch.get_autocast_dtype(x.device.type))
        # q|k, v and o as three convs on slices of the one weight, so that each is a dense map:
        # elementwise work on a dense map is several times faster than on channel slices of a 4C map.
        w, b = self.qkvo.weight, self.qkvo.bias
        qk = F.conv2d(x, w[:2 * C], b[:2 * C])
        v = F.conv2d(x, w[2 * C:3 * C], b[2 * C:3 * C])
        o = F.conv2d(x, w[3 * C:], b[3 * C:])

        def tokens(t, *groups):  # (B, g * C, H, W) -> (B, N, [g,] heads, head_dim): a view of a channels-last map
            return t.permute(0, 2, 3, 1).reshape(B, H * W, *groups, self.num_heads, self.head_dim)

        out = self.attend(tokens(qk, 2), tokens(v), tokens(self.lepe(v)), sin, cos)
        out = out.mul_(tokens(o)) if can_overwrite() else out * tokens(o)
        return self.proj(out.reshape(B, H, W, C).permute(0, 3, 1, 2))


class RankAugmentedLinearAttention(GatedAttentionBase):
    """RALA: linear attention whose keys are re-weighted by alpha = softmax_tokens(scale * mean(q') . k').

    With q' = elu(q) + 1, k' = elu(k) + 1 and k'' = N * alpha * k' (per token):
    out = RoPE(q') (RoPE(k'')^T v / N) / (q' . mean_tokens(k'') + 1e-6). The N and 1/N cancel, so
    alpha * k' is used throughout. Heads are computed as (N, head_dim) x (head_dim, head_dim) products.
    """

    def attend(self, qk, v, lepe, sin, cos):
        inplace = can_overwrite()
        # q' and k' are never formed: the + 1 joins each use below.
        e_q, e_k = (F.elu_(qk) if inplace else F.elu(qk)).unbind(2)  # (B, N, h, d)
        q_mean = e_q.mean(1, keepdim=True) + 1.0  # mean_tokens(q'), (B, 1, h, d)
        # Products as einsum: faster than multiply-and-sum, and fvcore counts them as the authors' matmuls.
        scores = torch.einsum('bnhd,bhd->bnh', e_k, q_mean[:, 0]) + q_mean.sum(-1)  # q_mean . k', (B, N, h)
        alpha = torch.softmax(self.scale * scores, dim=1).unsqueeze(-1)
        k = torch.addcmul(alpha, e_k, alpha, out=e_k if inplace else None)  # alpha * k'
        k_sum = k.sum(1, keepdim=True)  # (B, 1, h, d)
        denom = (torch.einsum('bnhd,bhd->bnh', e_q, k_sum[:, 0]).unsqueeze(-1)
                 + (k_sum.sum(-1, keepdim=True) + 1e-6))  # q' . k_sum
        k = apply_rope(k, sin[:, None], cos[:, None], inplace=inplace)
        q = apply_rope(e_q, sin[:, None], cos[:, None], shift=1.0, inplace=inplace)  # RoPE(q')
        # Per head, (N, d) x (d, d) products on strided views, which need no copies.
        kv = [torch.bmm(k[:, :, i].transpose(1, 2), v[:, :, i]) for i in range(self.num_heads)]
        if inplace:
            # (q / denom) kv is accumulated straight into lepe: no (B, N, C) result to allocate and add.
            q = q.div_(denom)
            for i in range(self.num_heads):
                lepe[:, :, i].baddbmm_(q[:, :, i], kv[i])
            return lepe
        heads = [torch.bmm(q[:, :, i], kv[i]) for i in range(self.num_heads)]
        out = heads[0].unsqueeze(2) if self.num_heads == 1 else torch.stack(heads, dim=2)
        return torch.addcdiv(lepe, out, denom)


class SoftmaxAttention(GatedAttentionBase):
    """Softmax attention with 2-D RoPE on q and k (stages 3-4), through scaled_dot_product_attention."""

    def attend(self, qk, v, lepe, sin, cos):
        inplace = can_overwrite()
        qk = apply_rope(qk, sin[:, None, None], cos[:, None, None], inplace=inplace)
        q, k = qk.permute(2, 0, 3, 1, 4)  # (B, h, N, d) each
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2)).transpose(1, 2)
        return lepe.add_(out) if inplace else lepe + out


ATTENTION_TYPES = {'rala': RankAugmentedLinearAttention, 'softmax': SoftmaxAttention}


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, in place on a map that autograd does not track (its backward needs the input)."""
    return F.gelu(x) if x.requires_grad else torch.ops.aten.gelu_(x)


class GELU(nn.GELU):
    """nn.GELU through `gelu` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x)


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """norm(conv(x)). A BatchNorm in inference is an affine map per channel, folded here into the conv's
    weight and bias: one pass and one map fewer. Not while tracing, so that fvcore counts the network as
    the authors wrote it."""
    if (norm.training or not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.running_var is None
            or torch.jit.is_tracing()):
        return norm(conv(x))
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    bias = shift if conv.bias is None else torch.addcmul(shift, conv.bias, scale)
    return F.conv2d(x, conv.weight * scale.view(-1, 1, 1, 1), bias, conv.stride, conv.padding, conv.dilation,
                    conv.groups)


def conv_plus_input(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """x + conv(x) for a depthwise 'same' conv, as one conv: the identity joins the kernel's centre tap."""
    if torch.is_autocast_enabled(x.device.type):
        return x + conv(x)  # the sum keeps x's precision; the folded conv would round it to the autocast dtype
    identity = torch.zeros_like(conv.weight)
    identity[:, :, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1
    return F.conv2d(x, conv.weight + identity, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class ConvFeedForward(nn.Module):
    """1x1 conv, GELU, residual 3x3 depthwise conv, 1x1 conv."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, groups=hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(conv_plus_input(self.dwconv, gelu(self.fc1(x))))


class RAVLTBlock(nn.Module):
    """Conv positional encoding, then pre-norm attention and FFN, each with layer scale and drop path."""

    def __init__(self, dim: int, num_heads: int, attn_type: str = 'rala', mlp_ratio: float = 3.5,
                 drop_path: float = 0., layer_scale_init_value: float = 1.0):
        super().__init__()
        # Registration order reproduces the authors' state-dict order.
        self.norm1 = ChannelLayerNorm(dim)
        self.attn = ATTENTION_TYPES[attn_type](dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = ChannelLayerNorm(dim)
        self.ffn = ConvFeedForward(dim, int(mlp_ratio * dim))
        self.pos = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.gamma_1 = nn.Parameter(torch.full((1, dim, 1, 1), float(layer_scale_init_value)))
        self.gamma_2 = nn.Parameter(torch.full((1, dim, 1, 1), float(layer_scale_init_value)))

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        # Channels-last throughout: 1x1 convs, LayerNorm and the token-major attention need no copies.
        x = conv_plus_input(self.pos, x.contiguous(memory_format=torch.channels_last))
        x = self.add_residual(x, self.gamma_1, self.attn(self.norm1(x), sin, cos))
        return self.add_residual(x, self.gamma_2, self.ffn(self.norm2(x)))

    def add_residual(self, x: torch.Tensor, gamma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x + drop_path(gamma * y); x is this block's own intermediate, so under no_grad it is updated in place."""
        if self.training and isinstance(self.drop_path, DropPath):
            # timm's DropPath (the same random draws) with its per-sample factor joined to gamma: one pass over y.
            keep = 1 - self.drop_path.drop_prob
            factor = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep)
            if self.drop_path.scale_by_keep and keep > 0:
                factor.div_(keep)
            return torch.addcmul(x, gamma * factor, y)
        if not can_overwrite() or x.dtype != torch.promote_types(gamma.dtype, y.dtype):
            return torch.addcmul(x, gamma, y)  # (under autocast the sum is float32, as the authors')
        return x.addcmul_(gamma, y)


class Downsample(nn.Module):
    """3x3 stride-2 conv + BatchNorm at the end of stages 1-3."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_norm(self.reduction, self.norm, x)


# glibc serves allocations above 32 MiB with fresh pages from the OS, every time: on CPU, a stage-1 FFN
# map of a batch of 16 at 224x224 (45 MiB) costs more in page faults than its convolution takes.
INFERENCE_CHUNK_BYTES = 24 * 2 ** 20


class RAVLTStage(nn.Module):
    """A stage: its RoPE tables, its blocks, then (except the last stage) a downsampling layer."""

    def __init__(self, dim: int, out_dim: Optional[int], depth: int, num_heads: int, attn_type: str,
                 mlp_ratio: float, drop_path: Sequence[float], layer_scale_init_value: float):
        super().__init__()
        self.grad_checkpointing = False
        self.RoPE = RotaryEmbedding2d(dim // num_heads)
        self.blocks = nn.ModuleList([
            RAVLTBlock(dim, num_heads, attn_type, mlp_ratio, drop_path[i], layer_scale_init_value)
            for i in range(depth)])
        self.downsample = Downsample(dim, out_dim) if out_dim is not None else None

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        sin, cos = self.RoPE(x.shape[2], x.shape[3])
        chunk = self.inference_chunk(x)
        if chunk >= x.shape[0]:
            return self.run_blocks(x, sin, cos)
        out = torch.empty_like(x, memory_format=torch.channels_last)
        for start in range(0, x.shape[0], chunk):
            out[start:start + chunk] = self.run_blocks(x[start:start + chunk], sin, cos)
        return out

    def inference_chunk(self, x: torch.Tensor) -> int:
        """How many images CPU inference passes through the blocks at once: the batch in as few equal slices
        as keep the FFN's hidden map (the largest) under INFERENCE_CHUNK_BYTES, one image at least. Every
        image is computed alone, so slicing changes no result; it keeps the maps in cache and in memory the
        allocator reuses."""
        if (torch.is_grad_enabled() or x.device.type != 'cpu' or torch.compiler.is_compiling()
                or torch.jit.is_tracing() or len(self.blocks) == 0):
            return x.shape[0]
        image_bytes = self.blocks[0].ffn.fc1.out_channels * x.shape[2] * x.shape[3] * x.element_size()
        slices = -(-x.shape[0] * image_bytes // INFERENCE_CHUNK_BYTES)  # ceil
        return -(-x.shape[0] // max(slices, 1))  # slices of equal size (16 -> 8 + 8, not 14 + 2)

    def run_blocks(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, sin, cos)
            else:
                x = block(x, sin, cos)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


def conv_stem(in_chans: int, dim: int) -> nn.Sequential:
    """Four 3x3 convs (stride 2, 1, 1, 2) with BatchNorm, GELU between: stride 4 overall."""
    half = dim // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), GELU(),
        nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), GELU(),
        nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), GELU(),
        nn.Conv2d(half, dim, 3, 2, 1), nn.BatchNorm2d(dim),
    )


class PatchEmbed(nn.Module):
    """The convolutional stem (key `patch_embed.proj`)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj = conv_stem(in_chans, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The network runs channels-last from here on (faster convs, copy-free LayerNorm and attention).
        x = x.contiguous(memory_format=torch.channels_last)
        layers = list(self.proj)  # (conv, BatchNorm, GELU) x 3, then conv, BatchNorm
        for i in range(0, len(layers), 3):
            x = conv_norm(layers[i], layers[i + 1], x)
            if i + 2 < len(layers):
                x = layers[i + 2](x)
        return x


def _per_stage(value, num_stages: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * num_stages


class RAVLT(nn.Module):
    """RAVLT: conv stem, four stages (RALA, RALA, softmax, softmax by default), then a 1x1 conv
    projection to `projection_dim` with BatchNorm and SiLU, global average pooling and a 1x1 conv
    classifier.

    Args:
        in_chans: Number of input image channels.
        num_classes: Number of classes for the classifier (0 for none).
        embed_dims: Channels per stage.
        depths: Blocks per stage.
        num_heads: Attention heads per stage.
        attn_types: 'rala' or 'softmax' per stage. An all-'rala' model is linear in the token count.
        mlp_ratio: FFN hidden width as a multiple of the stage width (int() of the product).
        projection_dim: Channels of the pre-classifier projection (= num_features).
        layer_scale_init_value: Initial layer scale, one value or one per stage.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth, rising linearly from 0 over all blocks.
        global_pool: Only 'avg' (the classifier is defined on pooled features).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (1, 2, 4, 8),
            attn_types: Sequence[str] = ('rala', 'rala', 'softmax', 'softmax'),
            mlp_ratio: float = 3.5,
            projection_dim: int = 1024,
            layer_scale_init_value: Union[float, Sequence[float]] = 1.0,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            global_pool: str = 'avg',
    ):
        super().__init__()
        num_stages = len(depths)
        attn_types = _per_stage(attn_types, num_stages)
        unknown = sorted(set(attn_types) - set(ATTENTION_TYPES))
        if unknown:
            raise ValueError(f'unknown attention type(s) {unknown}; choose from {sorted(ATTENTION_TYPES)}')
        self._check_pool(global_pool)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dims = list(embed_dims)
        self.attn_types = attn_types
        self.num_features = self.head_hidden_size = projection_dim
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        layer_scale = _per_stage(layer_scale_init_value, num_stages)

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i in range(num_stages):
            first = sum(depths[:i])
            self.layers.append(RAVLTStage(
                dim=embed_dims[i],
                out_dim=embed_dims[i + 1] if i < num_stages - 1 else None,
                depth=depths[i],
                num_heads=num_heads[i],
                attn_type=attn_types[i],
                mlp_ratio=mlp_ratio,
                drop_path=dpr[first:first + depths[i]],
                layer_scale_init_value=layer_scale[i],
            ))
            # Dense features are the stage outputs before the stage's downsampling.
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f'layers.{i}'))

        self.proj = nn.Conv2d(embed_dims[-1], projection_dim, 1)
        self.norm = nn.BatchNorm2d(projection_dim)
        self.act = nn.SiLU()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Conv2d(projection_dim, num_classes, 1) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Conv2d):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @staticmethod
    def _check_pool(global_pool: str):
        if global_pool != 'avg':
            raise ValueError(f"RAVLT supports global_pool='avg' only, got {global_pool!r}")

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # Empty on purpose: the authors' recipe decays every parameter of two or more dims, the (1, C, 1, 1)
        # layer scales included; timm's optimizer factory already exempts 1-D norms and biases.
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r'^patch_embed',
            blocks=r'^layers\.(\d+)' if coarse else [
                (r'^layers\.(\d+)\.blocks\.(\d+)', None),
                (r'^layers\.(\d+)\.downsample', (99999,)),  # after its stage's blocks
                (r'^proj|^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        if global_pool is not None:
            self._check_pool(global_pool)
        self.num_classes = num_classes
        self.head = nn.Conv2d(self.num_features, num_classes, 1) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs before their downsampling (strides 4, 8, 16, 32).

        Args:
            indices: Take the last n stages if an int, all if None, else the stages listed.
            norm: Accepted for the timm API; RAVLT has no norm to apply to intermediates.
            stop_early: Stop after the last stage asked for.
            output_fmt: 'NCHW' only.
            intermediates_only: Return only the intermediates.
        """
        assert output_fmt == 'NCHW', 'Output format must be NCHW.'
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        intermediates = []
        x = self.patch_embed(x)
        stages = self.layers[:max_index + 1] if stop_early else self.layers
        for i, stage in enumerate(stages):
            x = stage.forward_blocks(x)
            if i in take_indices:
                intermediates.append(x)
            if stage.downsample is not None:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        return self.forward_neck(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages, downsampling and head not needed for the intermediates in `indices`."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        self.layers[-1].downsample = None
        if prune_head:
            self.proj, self.norm = nn.Identity(), nn.Identity()
            self.reset_classifier(0)
        return take_indices

    def forward_neck(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.forward_neck(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(F.adaptive_avg_pool2d(x, 1))
        return x.flatten(1) if pre_logits else self.head(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# The authors' four variants. Factories pass these as defaults; any keyword overrides them.
RAVLT_CONFIGS = {
    'ravlt_t': dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8),
                    drop_path_rate=0.1, layer_scale_init_value=1.0),
    'ravlt_s': dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 9, 3), num_heads=(1, 2, 5, 8),
                    drop_path_rate=0.15, layer_scale_init_value=1.0),
    'ravlt_b': dict(embed_dims=(96, 192, 384, 512), depths=(4, 6, 12, 6), num_heads=(1, 2, 6, 8),
                    drop_path_rate=0.4, layer_scale_init_value=(1.0, 1.0, 1e-6, 1e-6)),
    'ravlt_l': dict(embed_dims=(96, 192, 448, 640), depths=(4, 7, 19, 8), num_heads=(1, 2, 7, 10),
                    drop_path_rate=0.55, layer_scale_init_value=1e-6),
}


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Accept a raw state dict or a training checkpoint (`model`, `state_dict` or `model_ema` entry),
    with or without DistributedDataParallel's `module.` prefix.

    `model` comes first: it holds the weights the authors' DeiT-style `--eval` reports. (timm's loader for
    `pretrained_cfg_overlay=dict(file=...)` picks `model_ema` itself before calling this, by timm convention.)
    """
    for key in ('model', 'state_dict', 'model_ema', 'state_dict_ema'):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def _create_ravlt(variant: str, pretrained: bool = False, **kwargs) -> RAVLT:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        RAVLT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj.0', 'classifier': 'head',
        'hf_hub_id': 'aldjalkdf/RAVLT',
        'paper_ids': 'arXiv:2411.07635', 'paper_name': 'Breaking the Low-Rank Dilemma of Linear Attention',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'ravlt_t.in1k': _cfg(hf_hub_filename='RAVLT_T.pth'),
    'ravlt_s.in1k': _cfg(hf_hub_filename='RAVLT_S.pth'),
    'ravlt_b.in1k': _cfg(hf_hub_filename='RAVLT_B.pth'),
    'ravlt_l.in1k': _cfg(hf_hub_filename='RAVLT_L.pth'),
})


def _factory(variant: str, pretrained: bool, **kwargs) -> RAVLT:
    return _create_ravlt(variant, pretrained, **dict(RAVLT_CONFIGS[variant], **kwargs))


@register_model
def ravlt_t(pretrained: bool = False, **kwargs) -> RAVLT:
    """RAVLT-T: 14.9M params, 2.4 GFLOPs (224x224), 82.8% ImageNet-1k top-1 (paper)."""
    return _factory('ravlt_t', pretrained, **kwargs)


@register_model
def ravlt_s(pretrained: bool = False, **kwargs) -> RAVLT:
    """RAVLT-S: 25.6M params, 4.6 GFLOPs (224x224), 84.4% ImageNet-1k top-1 (paper)."""
    return _factory('ravlt_s', pretrained, **kwargs)


@register_model
def ravlt_b(pretrained: bool = False, **kwargs) -> RAVLT:
    """RAVLT-B: 48.2M params, 9.9 GFLOPs (224x224), 85.5% ImageNet-1k top-1 (paper)."""
    return _factory('ravlt_b', pretrained, **kwargs)


@register_model
def ravlt_l(pretrained: bool = False, **kwargs) -> RAVLT:
    """RAVLT-L: 95.2M params, 16.0 GFLOPs (224x224), 85.8% ImageNet-1k top-1 (paper)."""
    return _factory('ravlt_l', pretrained, **kwargs)
