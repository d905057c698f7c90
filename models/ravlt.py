"""RAVLT: Rank-Augmented Vision Linear Transformer

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

For the paper's ablation, `attn_types` also takes RALA with either or both of its rank augmentations switched
off (`RALA(dim, heads, alpha=..., gate_lepe=...)`; the names are `ATTENTION_TYPES`). Kinds that keep LePE and
the gate have RALA's parameters (their checkpoints load into one another); those without them have no `o`
projection and no LePE, so nothing unused is trained, counted or synchronised.

Module attribute names follow the authors' code, so their checkpoints (`RAVLT_T.pth` ...) load with
`strict=True`.

Inference: `timm.utils.reparameterize_model(model)` folds the BatchNorms of the stem and the downsampling
layers into their convs and the skip connection of each FFN's depthwise conv into its kernel. The result
computes the same function with fewer passes over memory and fewer large temporaries; its state dict no
longer has the authors' layout.
"""

import errno
import os
from functools import partial
from typing import Dict, Final, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, SelectAdaptivePool2d, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = [
    'RAVLT',
    'RALA',
    'SoftmaxAttention',
    'ATTENTION_TYPES',
    'RAVLT_CONFIGS',
    'PAPER_RESULTS',
]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (the authors' `LayerNorm2d`, key `.norm`).

    The network runs channels-last, where both permutes below are free views.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class RotaryEmbedding2d(nn.Module):
    """2-D rotary position embedding tables for one stage.

    The persistent buffer `angle` (head_dim / 2 values, each frequency twice, interleaved) is part of
    the authors' checkpoints. Channels (2i, 2i + 1) of a head are a pair that turns by one angle: a
    token at row h, column w turns the pairs of the first half of the head dim by h * angle and those
    of the second half by w * angle. The tables are (H * W, head_dim / 2): row-major tokens by pairs.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 4))
        self.register_buffer('angle', angle.repeat_interleave(2), persistent=True)

    def forward(self, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
        angle = self.angle[0::2]  # one angle per pair (the buffer holds each twice)
        rows = torch.arange(height, device=angle.device, dtype=angle.dtype)
        cols = torch.arange(width, device=angle.device, dtype=angle.dtype)
        pos_h = (rows[:, None] * angle)[:, None, :].expand(-1, width, -1)  # (H, W, d/4)
        pos_w = (cols[:, None] * angle)[None, :, :].expand(height, -1, -1)
        pos = torch.cat([pos_h, pos_w], dim=-1).flatten(0, 1)  # (H*W, d/2)
        return torch.sin(pos), torch.cos(pos)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """RoPE of token-major x (B, N, heads, head_dim) with the (N, head_dim / 2) tables: each channel pair
    (x0, x1) turns to (x0 cos - x1 sin, x1 cos + x0 sin), in the tables' precision (float32 under autocast, as
    the authors'); the result has x's dtype. x's last dim must be contiguous."""
    # One complex multiply; against x cos + rotate(x) sin: RALA training 1.2-1.4x, RAVLT-S 1024^2 peak 192 vs 209 MiB.
    # (The tables broadcast over heads before they become complex: ONNX export has no complex unsqueeze.)
    pairs = torch.view_as_complex(x.to(cos.dtype).unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.complex(cos[:, None], sin[:, None])).flatten(-2).to(x.dtype)


def projection(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], i: int) -> torch.Tensor:
    """Projection i (q, k, v, o: 0, 1, 2, 3) of x, C channels of the 1x1 conv `qkvo` (`qkv`), computed alone."""
    C = weight.shape[1]
    return F.conv2d(x, weight[i * C : (i + 1) * C], None if bias is None else bias[i * C : (i + 1) * C])


class RALA(nn.Module):
    """Rank-augmented linear attention (`rala`) and the paper's ablations of its two rank augmentations:
    `alpha=False` weights every key alike (1 / N) instead of by alpha, `gate_lepe=False` drops LePE and the
    gate o with their parameters (one `qkv` conv instead of `qkvo`, no `lepe`). Both off: plain linear
    attention (`linear`), the paper's baseline.
    """

    alpha: Final[bool]
    gate_lepe: Final[bool]

    def __init__(self, dim: int, num_heads: int, alpha: bool = True, gate_lepe: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.alpha = alpha
        self.gate_lepe = gate_lepe
        if gate_lepe:
            self.qkvo = nn.Conv2d(dim, dim * 4, 1)
            self.lepe = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        else:
            self.qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x.contiguous(memory_format=torch.channels_last)  # a no-op in RAVLT; RoPE needs the token views below
        tokens = [B, H * W, self.num_heads, self.head_dim]  # token-major heads, views of a channels-last map
        if self.gate_lepe:
            weight, bias = self.qkvo.weight, self.qkvo.bias
        else:
            weight, bias = self.qkv.weight, self.qkv.bias
        # Projections q, k, v (o comes last), each its own conv, so that q and k die early. Against views of one
        # conv: RAVLT-S stage 1 eval 1.3-1.5x, training 1.1-1.25x; RAVLT-S 1024^2 peak 192 vs 209 MiB.
        q = projection(x, weight, bias, 0).permute(0, 2, 3, 1).reshape(tokens)
        k = projection(x, weight, bias, 1).permute(0, 2, 3, 1).reshape(tokens)
        v = projection(x, weight, bias, 2)
        # Positive features phi(x) = elu(x) + 1.
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
        if self.alpha:
            # alpha = softmax over tokens of scale * mean(phi(q)) . phi(k_n), re-weighting the keys.
            alpha = torch.softmax(self.scale * torch.einsum('bnhd,bhd->bnh', k, q.mean(dim=1)), dim=1)
            k = k * alpha.unsqueeze(-1)
        else:
            k = k / (H * W)  # every key weighted alike
        # 2-D RoPE on k, and the KV buffer sum_n RoPE(k_n) v_n^T (head_dim x head_dim per head).
        # (Products as einsum: fvcore counts them as the authors' matmuls.)
        kv = torch.einsum('bnhd,bnhe->bhde', apply_rope(k, sin, cos), v.permute(0, 2, 3, 1).reshape(tokens))
        # Normaliser z_n = 1 / (phi(q_n) . sum_m k_m + 1e-6).
        z = 1.0 / (torch.einsum('bnhd,bhd->bnh', q, k.sum(dim=1)) + 1e-6)
        del k
        # Output z_n RoPE(q_n) kv, RoPE on q.
        out = torch.einsum('bnhd,bhde->bnhe', apply_rope(q, sin, cos), kv) * z.unsqueeze(-1)
        del q
        out = out.reshape(B, H, W, C).permute(0, 3, 1, 2)
        if self.gate_lepe:
            # LePE (5x5 depthwise conv of v) and the gate o.
            out = (out + self.lepe(v)) * projection(x, weight, bias, 3)
        return self.proj(out)


class SoftmaxAttention(nn.Module):
    """Softmax attention with 2-D RoPE on q and k, LePE and the gate o (`softmax`, stages 3-4); RALA's
    parameters (`qkvo`, `lepe`, `proj`)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkvo = nn.Conv2d(dim, dim * 4, 1)
        self.lepe = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x.contiguous(memory_format=torch.channels_last)  # a no-op in RAVLT; RoPE needs the token views below
        tokens = [B, H * W, self.num_heads, self.head_dim]  # token-major heads, views of a channels-last map
        weight, bias = self.qkvo.weight, self.qkvo.bias
        # Projections q, k, v (o comes last), each its own conv as in RALA. Against views of one conv: stages 3-4
        # eval 1.05-1.2x, training 1.0x.
        q = projection(x, weight, bias, 0).permute(0, 2, 3, 1).reshape(tokens)
        k = projection(x, weight, bias, 1).permute(0, 2, 3, 1).reshape(tokens)
        v = projection(x, weight, bias, 2)
        # 2-D RoPE on q and k, heads first (B, heads, N, head_dim).
        q, k = apply_rope(q, sin, cos).transpose(1, 2), apply_rope(k, sin, cos).transpose(1, 2)
        # softmax(q k^T / sqrt(head_dim)) v, never forming the N x N scores. Against softmax(q k^T) v written out:
        # stage 3 eval 1.1-1.3x, training 1.1-1.2x; RAVLT-S 1024^2 peak 192 vs 691 MiB.
        out = F.scaled_dot_product_attention(q, k, v.permute(0, 2, 3, 1).reshape(tokens).transpose(1, 2))
        del q, k
        out = out.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)
        # LePE (5x5 depthwise conv of v) and the gate o.
        return self.proj((out + self.lepe(v)) * projection(x, weight, bias, 3))


# `attn_types` names: RALA, its ablations and softmax attention.
ATTENTION_TYPES = {
    'linear': partial(RALA, alpha=False, gate_lepe=False),
    'rala_no_alpha': partial(RALA, alpha=False),
    'rala_no_gate_lepe': partial(RALA, gate_lepe=False),
    'rala': RALA,
    'softmax': SoftmaxAttention,
}


class ResidualDepthwiseConv(nn.Conv2d):
    """y + dwconv(y), a 'same' depthwise conv with its skip connection (keys `pos` in a block, `dwconv` in the
    FFN)."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self._conv_forward(x, self.weight, self.bias)

    @torch.no_grad()
    def folded(self) -> nn.Conv2d:
        """For inference: the skip joins the kernel's centre tap, one plain conv for both."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            padding=self.padding,
            groups=self.groups,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        conv.weight.copy_(self.weight)
        conv.weight[:, :, self.kernel_size[0] // 2, self.kernel_size[1] // 2] += 1
        conv.bias.copy_(self.bias)
        return conv


class ConvFeedForward(nn.Module):
    """1x1 conv, GELU, residual 3x3 depthwise conv, 1x1 conv."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        self.dwconv = ResidualDepthwiseConv(hidden_dim, 3)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dwconv(self.act(self.fc1(x))))

    def reparameterize(self):
        """For inference: the depthwise conv's skip joins its kernel's centre tap, one plain conv for both."""
        if isinstance(self.dwconv, ResidualDepthwiseConv):
            self.dwconv = self.dwconv.folded()


class RAVLTBlock(nn.Module):
    """A residual conv position encoding (3x3 depthwise), then pre-norm attention and FFN, each with layer scale
    and drop path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attn_type: str = 'rala',
        mlp_ratio: float = 3.5,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1.0,
    ):
        super().__init__()
        # Registration order reproduces the authors' state-dict order.
        self.norm1 = ChannelLayerNorm(dim)
        self.attn = ATTENTION_TYPES[attn_type](dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = ChannelLayerNorm(dim)
        self.ffn = ConvFeedForward(dim, int(mlp_ratio * dim))
        self.pos = ResidualDepthwiseConv(dim, 3)  # x + dwconv(x), the conditional position encoding
        self.gamma_1 = nn.Parameter(torch.full((1, dim, 1, 1), float(layer_scale_init_value)))
        self.gamma_2 = nn.Parameter(torch.full((1, dim, 1, 1), float(layer_scale_init_value)))

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        x = self.pos(x)
        # x + gamma * drop_path(y) in one pass (addcmul): drop path scales whole samples, so it commutes with gamma
        x = torch.addcmul(x, self.gamma_1, self.drop_path(self.attn(self.norm1(x), sin, cos)))
        return torch.addcmul(x, self.gamma_2, self.drop_path(self.ffn(self.norm2(x))))

    def reparameterize(self):
        """For inference: the position encoding's skip joins its kernel (the FFN's folds in ConvFeedForward)."""
        if isinstance(self.pos, ResidualDepthwiseConv):
            self.pos = self.pos.folded()


class Downsample(nn.Module):
    """3x3 stride-2 conv + BatchNorm at the end of stages 1-3."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x))

    def reparameterize(self):
        """Fold the BatchNorm's inference statistics into the conv (eval mode only)."""
        if isinstance(self.norm, _BatchNorm):
            self.reduction, self.norm = fuse_conv_bn_eval(self.reduction, self.norm), nn.Identity()


class RAVLTStage(nn.Module):
    """A stage: its RoPE tables, its blocks, then (except the last stage) a downsampling layer."""

    def __init__(
        self,
        dim: int,
        out_dim: Optional[int],
        depth: int,
        num_heads: int,
        attn_type: str,
        mlp_ratio: float,
        drop_path: Sequence[float],
        layer_scale_init_value: float,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.RoPE = RotaryEmbedding2d(dim // num_heads)
        self.blocks = nn.ModuleList(
            [
                RAVLTBlock(dim, num_heads, attn_type, mlp_ratio, drop_path[i], layer_scale_init_value)
                for i in range(depth)
            ]
        )
        self.downsample = Downsample(dim, out_dim) if out_dim is not None else nn.Identity()

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        sin, cos = self.RoPE(x.shape[2], x.shape[3])
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, sin, cos)
            else:
                x = block(x, sin, cos)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.forward_blocks(x))


class PatchEmbed(nn.Module):
    """The convolutional stem (key `patch_embed.proj`): four 3x3 convs (stride 2, 1, 1, 2) with BatchNorm,
    GELU between; stride 4 overall."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        half = dim // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, 2, 1),
            nn.BatchNorm2d(half),
            nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1),
            nn.BatchNorm2d(half),
            nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1),
            nn.BatchNorm2d(half),
            nn.GELU(),
            nn.Conv2d(half, dim, 3, 2, 1),
            nn.BatchNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The network runs channels-last from here on (faster convs, copy-free LayerNorm and attention).
        return self.proj(x.contiguous(memory_format=torch.channels_last))

    def reparameterize(self):
        """Fold each BatchNorm's inference statistics into the conv before it (eval mode only)."""
        layers = []
        for layer in self.proj:
            if isinstance(layer, _BatchNorm):  # SyncBatchNorm too (a multi-GPU run's evaluations)
                layers[-1] = fuse_conv_bn_eval(layers[-1], layer)
            else:
                layers.append(layer)
        self.proj = nn.Sequential(*layers)


def _per_stage(value, num_stages: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * num_stages


def _check_stages(embed_dims, depths, num_heads, attn_types):
    """A ValueError for the plausible mistakes in the per-stage settings."""
    if not len(embed_dims) == len(depths) == len(num_heads) == len(attn_types):
        raise ValueError(
            f'embed_dims, depths, num_heads and attn_types must have one value per stage, got '
            f'{len(embed_dims)}, {len(depths)}, {len(num_heads)} and {len(attn_types)}'
        )
    for name, values in (('depths', depths), ('embed_dims', embed_dims), ('num_heads', num_heads)):
        if not all(v > 0 for v in values):
            raise ValueError(f'{name} must be a list of positive integers, one per stage, got {values!r}')
    unknown = sorted(set(attn_types) - set(ATTENTION_TYPES))
    if unknown:
        raise ValueError(f'unknown attention type(s) {unknown}; choose from {sorted(ATTENTION_TYPES)}')
    for dim, heads in zip(embed_dims, num_heads):
        if dim % heads or dim // heads % 4:
            raise ValueError(f'head_dim (embed_dim / num_heads) must be a multiple of 4, got {dim} / {heads}')


class RAVLT(nn.Module):
    """RAVLT: conv stem, four stages (RALA, RALA, softmax, softmax by default), then a 1x1 conv
    projection to `projection_dim` with BatchNorm and SiLU, global pooling and a 1x1 conv classifier.

    Args:
        in_chans: Number of input image channels.
        num_classes: Number of classes for the classifier (0 for none).
        embed_dims: Channels per stage.
        depths: Blocks per stage.
        num_heads: Attention heads per stage.
        attn_types: Attention per stage, a name of `ATTENTION_TYPES`: 'rala', 'softmax', or for ablations
            'linear', 'rala_no_alpha', 'rala_no_gate_lepe'. A model without 'softmax' is linear in the token
            count.
        mlp_ratio: FFN hidden width as a multiple of the stage width (int() of the product).
        projection_dim: Channels of the pre-classifier projection (= num_features).
        layer_scale_init_value: Initial layer scale, one value or one per stage.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth, rising linearly from 0 over all blocks.
        global_pool: A pool type of timm's SelectAdaptivePool2d ('avg', the authors', 'max', 'avgmax',
            'catavgmax'), or '' for none: the classifier then applies to every position of the map.
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
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = 'avg',
    ):
        super().__init__()
        num_stages = len(depths)
        attn_types = _per_stage(attn_types, num_stages)
        _check_stages(embed_dims, depths, num_heads, attn_types)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dims = list(embed_dims)
        self.attn_types = attn_types
        self.num_features = projection_dim
        self.drop_rate = drop_rate
        layer_scale = _per_stage(layer_scale_init_value, num_stages)

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i in range(num_stages):
            first = sum(depths[:i])
            self.layers.append(
                RAVLTStage(
                    dim=embed_dims[i],
                    out_dim=embed_dims[i + 1] if i < num_stages - 1 else None,
                    depth=depths[i],
                    num_heads=num_heads[i],
                    attn_type=attn_types[i],
                    mlp_ratio=mlp_ratio,
                    drop_path=dpr[first : first + depths[i]],
                    layer_scale_init_value=layer_scale[i],
                )
            )
            # Dense features are the stage outputs before the stage's downsampling: its last block's output.
            self.feature_info.append(
                dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f'layers.{i}.blocks.{depths[i] - 1}')
            )

        self.proj = nn.Conv2d(embed_dims[-1], projection_dim, 1)
        self.norm = nn.BatchNorm2d(projection_dim)
        self.act = nn.SiLU()
        self.head_drop = nn.Dropout(drop_rate)
        self._build_head(num_classes, global_pool)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        # Shape-only models (meta device: counting, checking checkpoints) skip the random draw, which on meta
        # runs through torch's slow Python decompositions (about 2 s for RAVLT-L).
        if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _build_head(self, num_classes: int, global_pool: str):
        """Global pooling, the 1x1 conv classifier on the pooled (B, C, 1, 1) features, and the flatten to
        (B, classes); without pooling, the classifier applies to every position and the map stays 4-D."""
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.head = nn.Conv2d(self.head_hidden_size, num_classes, 1) if num_classes > 0 else nn.Identity()
        self.flatten = nn.Flatten(1) if global_pool else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # Empty on purpose: the authors' recipe decays every parameter of two or more dims, the (1, C, 1, 1)
        # layer scales included; timm's optimizer factory already exempts 1-D norms and biases.
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r'^patch_embed',
            blocks=r'^layers\.(\d+)'
            if coarse
            else [
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
        self.num_classes = num_classes
        self._build_head(num_classes, self.global_pool.pool_type if global_pool is None else global_pool)

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
        stages = self.layers[: max_index + 1] if stop_early else self.layers
        for i, stage in enumerate(stages):
            x = stage.forward_blocks(x)
            if i in take_indices:
                intermediates.append(x)
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
        self.layers = self.layers[: max_index + 1]
        self.layers[-1].downsample = nn.Identity()
        if prune_head:
            self.proj, self.norm = nn.Identity(), nn.Identity()
            self.reset_classifier(0, '')
        return take_indices

    def forward_neck(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.forward_neck(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return self.flatten(x if pre_logits else self.head(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# The authors' four variants. Factories pass these as defaults; any keyword overrides them.
RAVLT_CONFIGS = {
    'ravlt_t': dict(
        embed_dims=(64, 128, 256, 512),
        depths=(2, 2, 6, 2),
        num_heads=(1, 2, 4, 8),
        drop_path_rate=0.1,
        layer_scale_init_value=1.0,
    ),
    'ravlt_s': dict(
        embed_dims=(64, 128, 320, 512),
        depths=(3, 5, 9, 3),
        num_heads=(1, 2, 5, 8),
        drop_path_rate=0.15,
        layer_scale_init_value=1.0,
    ),
    'ravlt_b': dict(
        embed_dims=(96, 192, 384, 512),
        depths=(4, 6, 12, 6),
        num_heads=(1, 2, 6, 8),
        drop_path_rate=0.4,
        layer_scale_init_value=(1.0, 1.0, 1e-6, 1e-6),
    ),
    'ravlt_l': dict(
        embed_dims=(96, 192, 448, 640),
        depths=(4, 7, 19, 8),
        num_heads=(1, 2, 7, 10),
        drop_path_rate=0.55,
        layer_scale_init_value=1e-6,
    ),
}


# The paper's ImageNet-1k results at 224x224: params (M), GFLOPs (its convention: scripts/flops.py) and top-1 (%).
PAPER_RESULTS = {
    'ravlt_t': dict(params=15, gflops=2.4, top1=82.8),
    'ravlt_s': dict(params=26, gflops=4.6, top1=84.4),
    'ravlt_b': dict(params=48, gflops=9.9, top1=85.5),
    'ravlt_l': dict(params=95, gflops=16.0, top1=85.8),
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
    return {k[len('module.') :] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def _check_pretrained_file(variant: str, pretrained_cfg=None, pretrained_cfg_overlay=None):
    """A local weights file (`pretrained_cfg_overlay=dict(file=...)`) must exist: timm's loader raises a bare
    FileNotFoundError without the file's name."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    if cfg.file and cfg.source in (None, '', 'timm') and cfg.state_dict is None and not os.path.isfile(cfg.file):
        raise FileNotFoundError(
            errno.ENOENT,
            f'pretrained weights file {cfg.file} not found: download '
            f'{cfg.hf_hub_filename} from Hugging Face {cfg.hf_hub_id} to that path, or leave out '
            'the file to let timm download it',
            cfg.file,
        )


def _create_ravlt(variant: str, pretrained: bool = False, **kwargs) -> RAVLT:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    if pretrained:
        _check_pretrained_file(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    return build_model_with_cfg(
        RAVLT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return {
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj.0',
        'classifier': 'head',
        'hf_hub_id': 'aldjalkdf/RAVLT',
        # The authors published the weights without a licence.
        'license': 'unknown',
        'origin_url': 'https://github.com/qhfan/RALA',
        'paper_ids': 'arXiv:2411.07635',
        'paper_name': 'Breaking the Low-Rank Dilemma of Linear Attention',
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        'ravlt_t.in1k': _cfg(hf_hub_filename='RAVLT_T.pth'),
        'ravlt_s.in1k': _cfg(hf_hub_filename='RAVLT_S.pth'),
        'ravlt_b.in1k': _cfg(hf_hub_filename='RAVLT_B.pth'),
        'ravlt_l.in1k': _cfg(hf_hub_filename='RAVLT_L.pth'),
    }
)


def _factory(variant: str, pretrained: bool, **kwargs) -> RAVLT:
    return _create_ravlt(variant, pretrained, **dict(RAVLT_CONFIGS[variant], **kwargs))


@register_model
def ravlt_t(pretrained: bool = False, **kwargs) -> RAVLT:
    """RAVLT-T, the smallest of the paper's variants (PAPER_RESULTS['ravlt_t'])."""
    return _factory('ravlt_t', pretrained, **kwargs)


@register_model
def ravlt_s(pretrained: bool = False, **kwargs) -> RAVLT:
    """RAVLT-S (PAPER_RESULTS['ravlt_s'])."""
    return _factory('ravlt_s', pretrained, **kwargs)


@register_model
def ravlt_b(pretrained: bool = False, **kwargs) -> RAVLT:
    """RAVLT-B (PAPER_RESULTS['ravlt_b'])."""
    return _factory('ravlt_b', pretrained, **kwargs)


@register_model
def ravlt_l(pretrained: bool = False, **kwargs) -> RAVLT:
    """RAVLT-L, the largest of the paper's variants (PAPER_RESULTS['ravlt_l'])."""
    return _factory('ravlt_l', pretrained, **kwargs)
