"""RAVLT for dense prediction: a backbone with the authors' per-stage LayerNorms, and detectors and
segmenters assembled from torchvision and segmentation_models_pytorch parts.

    model = build_dense_model('maskrcnn', 'RAVLT_S')           # torchvision MaskRCNN, 81 outputs
    # backbone weights from any checkpoint: checkpoints.load_backbone_weights

The tasks follow the authors' mmdet 2.11 / mmseg 0.13 configs:
    retinanet  RetinaNet: FPN over stages 2-4 (strides 8-32), P6/P7 from C5, 4x256 head convs
    maskrcnn   Mask R-CNN: FPN over stages 1-4, P6 by max-pooling P5
    semfpn     Semantic FPN: FPN (4 x 256) and a 128-channel FPN head
    upernet    UperNet: 512-channel UPerHead, auxiliary FCN head on stage 3 (loss weight 0.4)
"""

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from segmentation_models_pytorch.base.modules import Conv2dReLU
from segmentation_models_pytorch.decoders.fpn.decoder import MergeBlock, SegmentationBlock
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from .ravlt import RAVLT, RAVLT_CONFIGS, ChannelLayerNorm

__all__ = [
    'RAVLTBackbone',
    'SemanticSegmenter',
    'build_dense_model',
    'dense_backbone',
    'FlopsForward',
    'DENSE_TASKS',
    'DETECTION_TASKS',
    'SEGMENTATION_TASKS',
    'DENSE_INPUT_SIZE',
    'DENSE_PUBLISHED',
]

DETECTION_TASKS = ('retinanet', 'maskrcnn')
SEGMENTATION_TASKS = ('semfpn', 'upernet')
DENSE_TASKS = DETECTION_TASKS + SEGMENTATION_TASKS

# The input (H, W) at which the authors' README counts FLOPs: 1280x800 for COCO, 2048x512 for ADE20K.
DENSE_INPUT_SIZE = {'retinanet': (800, 1280), 'maskrcnn': (800, 1280), 'semfpn': (512, 2048), 'upernet': (512, 2048)}

# The authors' README: params (M), GFLOPs (None where not given) and results.
DENSE_PUBLISHED = {
    'retinanet': {
        'ravlt_t': dict(params=24, gflops=201, results='box AP 45.9 (1x)'),
        'ravlt_s': dict(params=34, gflops=244, results='box AP 48.3 (1x)'),
        'ravlt_b': dict(params=57, gflops=353, results='box AP 49.8 (1x)'),
        'ravlt_l': dict(params=104, gflops=482, results='box AP 50.9 (1x)'),
    },
    'maskrcnn': {
        'ravlt_t': dict(params=33, gflops=219, results='1x: box 47.3, mask 42.7'),
        'ravlt_s': dict(params=44, gflops=262, results='1x: box 49.8, mask 44.6; 3x: box 51.4, mask 45.5'),
        'ravlt_b': dict(params=67, gflops=372, results='1x: box 51.2, mask 45.7; 3x: box 52.7, mask 46.4'),
        'ravlt_l': dict(params=114, gflops=501, results='1x: box 52.3, mask 46.4; 3x: box 53.6, mask 47.3'),
    },
    'semfpn': {
        'ravlt_t': dict(params=18, gflops=136, results='mIoU 47.9'),
        'ravlt_s': dict(params=28, gflops=180, results='mIoU 49.5'),
        'ravlt_b': dict(params=51, gflops=292, results='mIoU 51.9'),
        'ravlt_l': dict(params=98, gflops=424, results='mIoU 52.6'),
    },
    'upernet': {
        'ravlt_s': dict(params=55, gflops=None, results='mIoU 50.7 (2x)'),
        'ravlt_b': dict(params=77, gflops=None, results='mIoU 52.5 (2x)'),
        'ravlt_l': dict(params=125, gflops=None, results='mIoU 53.2 (2x)'),
    },
}

FPN_CHANNELS = 256


class RAVLTBackbone(RAVLT):
    """RAVLT's stage outputs before their downsampling (strides 4, 8, 16, 32), each through a channel
    LayerNorm (eps 1e-6), without the classification projection and head.

    State-dict keys are the authors' dense backbone's (`patch_embed.*`, `layers.*`, `extra_norms.{i}.norm.*`),
    so their detection and segmentation checkpoints load after dropping the `backbone.` prefix.
    Stages not in `out_indices` keep their norm (for those keys) but it is frozen: it gets no gradient.
    """

    def __init__(self, out_indices: Sequence[int] = (0, 1, 2, 3), **kwargs):
        super().__init__(num_classes=0, **kwargs)
        self.prune_intermediate_layers(len(self.layers), prune_head=True)
        self.out_indices = tuple(out_indices)
        self.extra_norms = nn.ModuleList(ChannelLayerNorm(dim) for dim in self.embed_dims)
        for i, norm in enumerate(self.extra_norms):
            norm.requires_grad_(i in self.out_indices)

    @property
    def out_channels(self) -> List[int]:
        return [self.embed_dims[i] for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features = self.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
        return [self.extra_norms[i](f) for i, f in zip(self.out_indices, features)]


def create_backbone(model_name: str, out_indices: Sequence[int] = (0, 1, 2, 3), **kwargs) -> RAVLTBackbone:
    """A RAVLTBackbone with the named variant's configuration (drop path included); kwargs override it."""
    if model_name not in RAVLT_CONFIGS:
        raise ValueError(f'unknown RAVLT variant {model_name!r}; choose from {", ".join(RAVLT_CONFIGS)}')
    return RAVLTBackbone(out_indices, **dict(RAVLT_CONFIGS[model_name], **kwargs))


class BackboneWithFPN(nn.Module):
    """The `backbone` torchvision's detectors take: RAVLT features through a FeaturePyramidNetwork,
    returned as an OrderedDict, with `out_channels`."""

    def __init__(self, body: RAVLTBackbone, extra_blocks: nn.Module):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, FPN_CHANNELS, extra_blocks=extra_blocks)
        self.out_channels = FPN_CHANNELS

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def _to_float32(value):
    if isinstance(value, torch.Tensor):
        return value.float()
    if isinstance(value, dict):
        return type(value)((k, _to_float32(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v) for v in value)
    return value


def decode_in_float32(*modules: nn.Module):
    """Return these modules' outputs in float32. Under autocast the convs and linears of a detector run in
    half precision, and torchvision builds anchors in the features' dtype and decodes boxes in the
    regression's: in bfloat16, boxes on an 800x1333 image move by up to 15 px. With the backbone's features
    and the heads' outputs in float32, anchors, box decoding, scores and mask pasting stay in float32, as in
    mmdet's fp16 training."""
    for module in modules:
        module.register_forward_hook(lambda module, inputs, output: _to_float32(output))


def build_retinanet(body_kwargs: dict, model_name: str, num_classes: int, **kwargs) -> RetinaNet:
    """RetinaNet with labels 0..num_classes-1 (sigmoid classifier, no background class)."""
    body = create_backbone(model_name, out_indices=(1, 2, 3), **body_kwargs)
    p6p7 = LastLevelP6P7(body.out_channels[-1], FPN_CHANNELS)
    p6p7.use_P5 = False  # P6 from C5 (mmdet add_extra_convs='on_input'), whatever the widths
    # Octave base scale 4, 3 scales per octave, ratios 0.5/1/2 on strides 8-128.
    sizes = tuple(tuple(4 * stride * 2 ** (i / 3) for i in range(3)) for stride in (8, 16, 32, 64, 128))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    kwargs.setdefault('detections_per_img', 100)
    model = RetinaNet(BackboneWithFPN(body, p6p7), num_classes, anchor_generator=anchors, **kwargs)
    decode_in_float32(model.backbone, model.head)
    return model


def build_maskrcnn(body_kwargs: dict, model_name: str, num_classes: int, **kwargs) -> MaskRCNN:
    """Mask R-CNN with labels 1..num_classes (0 is the background of torchvision's softmax heads)."""
    body = create_backbone(model_name, out_indices=(0, 1, 2, 3), **body_kwargs)
    levels = ['0', '1', '2', '3']
    kwargs.setdefault('rpn_post_nms_top_n_train', 1000)  # mmdet's rpn_proposal max_per_img
    model = MaskRCNN(
        BackboneWithFPN(body, LastLevelMaxPool()),
        num_classes + 1,
        # sampling_ratio=0: adaptive sampling points, as mmdet's RoIAlign configs
        box_roi_pool=MultiScaleRoIAlign(levels, 7, sampling_ratio=0),
        mask_roi_pool=MultiScaleRoIAlign(levels, 14, sampling_ratio=0),
        **kwargs,
    )
    decode_in_float32(model.backbone, model.rpn.head, model.roi_heads.box_predictor, model.roi_heads.mask_predictor)
    return model


class SemanticFPNDecoder(nn.Module):
    """Semantic FPN: an FPN (4 x 256) over the four stages, then per level 1-3 conv-norm-ReLU blocks
    (x2 upsampling after each, to stride 4) of 128 channels, summed."""

    def __init__(self, in_channels: Sequence[int], channels: int = 128):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(list(in_channels), FPN_CHANNELS)
        self.scale_heads = nn.ModuleList(
            SegmentationBlock(FPN_CHANNELS, channels, n_upsamples=i) for i in range(len(in_channels))
        )
        self.merge = MergeBlock('add')
        self.out_channels = channels

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        pyramid = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features))).values()
        outputs = [head(p) for head, p in zip(self.scale_heads, pyramid)]
        # Sizes not divisible by 32 leave the upsampled coarse levels off by a few pixels (as mmseg, resize).
        size = outputs[0].shape[-2:]
        return self.merge(
            [
                o if o.shape[-2:] == size else F.interpolate(o, size, mode='bilinear', align_corners=False)
                for o in outputs
            ]
        )


class UPerNetHead(nn.Module):
    """segmentation_models_pytorch's UPerNetDecoder (PSP on stage 4, FPN fusion) at 512 channels.

    Its per-feature LayerNorms (eps 1e-6) are what the backbone's `extra_norms` already apply, so they
    are replaced by identities.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 512):
        super().__init__()
        # smp decoders take [input, stride 2, stride 4, ...]; transformer-style encoders have no stride 2.
        self.decoder = UPerNetDecoder(
            [3, 0, *in_channels], encoder_depth=len(in_channels) + 1, decoder_channels=channels
        )
        self.decoder.feature_norms = nn.ModuleList(nn.Identity() for _ in in_channels)
        self.out_channels = channels

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        return self.decoder([None, None, *features])


class SemanticSegmenter(nn.Module):
    """backbone -> decoder -> dropout -> 1x1 classifier, logits bilinearly resized to the input.

    `model(images)` returns logits (B, classes, H, W); `model(images, masks)` in training mode returns
    the losses {'loss_seg', and 'loss_aux' with an auxiliary head}, cross-entropy ignoring `ignore_index`.
    """

    def __init__(
        self,
        backbone: RAVLTBackbone,
        decoder: nn.Module,
        num_classes: int,
        aux_stage: Optional[int] = None,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
    ):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(decoder.out_channels, num_classes, 1)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.aux_stage = aux_stage
        self.aux_weight = aux_weight
        # mmseg's FCNHead (one 3x3 conv-BN-ReLU of 256, dropout, 1x1 classifier), used in training only.
        self.aux_head = (
            None
            if aux_stage is None
            else nn.Sequential(
                Conv2dReLU(backbone.embed_dims[aux_stage], 256, kernel_size=3, padding=1),
                nn.Dropout2d(0.1),
                nn.Conv2d(256, num_classes, 1),
            )
        )

    def _loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(logits, size=masks.shape[-2:], mode='bilinear', align_corners=False)
        return F.cross_entropy(logits, masks.long(), ignore_index=self.ignore_index)

    def forward(self, images: torch.Tensor, masks: Optional[torch.Tensor] = None):
        features = self.backbone(images)
        logits = self.classifier(self.dropout(self.decoder(features)))
        if masks is None:
            return F.interpolate(logits, size=images.shape[-2:], mode='bilinear', align_corners=False)
        losses = {'loss_seg': self._loss(logits, masks)}
        if self.aux_head is not None:
            losses['loss_aux'] = self.aux_weight * self._loss(self.aux_head(features[self.aux_stage]), masks)
        return losses


def build_semfpn(body_kwargs: dict, model_name: str, num_classes: int) -> SemanticSegmenter:
    body = create_backbone(model_name, **body_kwargs)
    return SemanticSegmenter(body, SemanticFPNDecoder(body.out_channels), num_classes)


def build_upernet(body_kwargs: dict, model_name: str, num_classes: int) -> SemanticSegmenter:
    body = create_backbone(model_name, **body_kwargs)
    return SemanticSegmenter(body, UPerNetHead(body.out_channels), num_classes, aux_stage=2)


BUILDERS = {'retinanet': build_retinanet, 'maskrcnn': build_maskrcnn, 'semfpn': build_semfpn, 'upernet': build_upernet}
DEFAULT_NUM_CLASSES = {'retinanet': 80, 'maskrcnn': 80, 'semfpn': 150, 'upernet': 150}


def build_dense_model(
    task: str,
    model_name: str,
    num_classes: Optional[int] = None,
    backbone_kwargs: Optional[dict] = None,
    **detector_kwargs,
) -> nn.Module:
    """A RAVLT dense model. `model_name` is a RAVLT variant ('ravlt_t' ... or 'RAVLT_T' ...);
    `num_classes` counts object / stuff classes without background (80 for COCO, 150 for ADE20K);
    `backbone_kwargs` override the variant's RAVLT arguments (e.g. drop_path_rate); `detector_kwargs`
    go to torchvision's RetinaNet / MaskRCNN (e.g. min_size, max_size)."""
    if task not in BUILDERS:
        raise ValueError(f'unknown task {task!r}; choose from {", ".join(DENSE_TASKS)}')
    if detector_kwargs and task not in DETECTION_TASKS:
        raise ValueError(f'{task} takes no detector arguments, got {sorted(detector_kwargs)}')
    name = model_name.lower()
    return BUILDERS[task](
        dict(backbone_kwargs or {}), name, num_classes or DEFAULT_NUM_CLASSES[task], **detector_kwargs
    )


def dense_backbone(model: nn.Module) -> RAVLTBackbone:
    """The RAVLTBackbone inside a model from build_dense_model (or the backbone itself)."""
    if isinstance(model, RAVLTBackbone):
        return model
    if isinstance(model, SemanticSegmenter):
        return model.backbone
    return model.backbone.body


class FlopsForward(nn.Module):
    """The forward pass the authors' FLOPs count (mmdet / mmseg `forward_dummy`): backbone, neck and
    heads on the image; for Mask R-CNN, also the box head on 1000 proposals and the mask head on 100.
    Image resizing and normalization (torchvision's transform), anchors and NMS are not counted."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        if isinstance(self.model, SemanticSegmenter):
            return self.model(images)
        features = self.model.backbone(images)
        if isinstance(self.model, RetinaNet):
            return self.model.head(list(features.values()))
        rpn_outputs = self.model.rpn.head(list(features.values()))
        height, width = images.shape[-2:]
        generator = torch.Generator().manual_seed(0)
        half = torch.tensor([width / 2, height / 2])
        corner = torch.rand(1000, 2, generator=generator) * half
        proposals = torch.cat([corner, corner + torch.rand(1000, 2, generator=generator) * half + 1], dim=1)
        heads, shapes = self.model.roi_heads, [(height, width)]
        boxes = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, [proposals], shapes)))
        masks = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, [proposals[:100]], shapes)))
        return rpn_outputs, boxes, masks
