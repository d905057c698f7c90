"""Data sets for dense prediction: COCO-format detection / instance segmentation and ADE20K-format
semantic segmentation, with torchvision.transforms.v2 pipelines following the authors' mmdet / mmseg ones.

COCO layout:   DATA/annotations/instances_{split}.json and DATA/{split}/<images>  (split: train2017, val2017)
ADE20K layout: DATA/images/{split}/<name>.jpg and DATA/annotations/{split}/<name>.png  (split: training,
               validation), label 0 = "other" (ignored), 1..150 = the classes
"""

import contextlib
import io
import os
from typing import List

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from errors import UsageError

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


def collate_lists(batch):
    """Detection batches: (list of images, list of targets); the detector pads the images itself."""
    return [sample[0] for sample in batch], [sample[1] for sample in batch]


# ----------------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------------


def coco_paths(data_path: str, split: str):
    """(image folder, annotation file) of a COCO split, checked to exist."""
    images = os.path.join(data_path, split)
    annotations = os.path.join(data_path, 'annotations', f'instances_{split}.json')
    if not os.path.isfile(annotations):
        raise UsageError(
            f'annotation file {annotations} not found: the COCO layout is DATA/annotations/'
            f'instances_{split}.json with images in DATA/{split}/ (set --data-path and the split)'
        )
    if not os.path.isdir(images):
        raise UsageError(
            f'image folder {images} not found: the COCO layout is DATA/annotations/'
            f'instances_{split}.json with images in DATA/{split}/'
        )
    return images, annotations


class CocoInstances(torch.utils.data.Dataset):
    """A COCO-format split as (image float in [0, 1], target) for torchvision's detectors.

    Category ids map to contiguous labels from `first_label` in sorted id order (0 for RetinaNet,
    1 for Mask R-CNN, whose label 0 is the background). In training, crowd boxes are dropped and
    images left without a box are skipped (as mmdet does); the target has `boxes` (XYXY), `labels`,
    `image_id` and, with `with_masks`, `masks` (N, H, W). In evaluation the target is only the `image_id`.
    """

    def __init__(self, data_path: str, split: str, train: bool, with_masks: bool, first_label: int):
        image_folder, annotation_file = coco_paths(data_path, split)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' "loading annotations into memory..."
                self.coco_dataset = CocoDetection(image_folder, annotation_file)
        except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            raise UsageError(f'{annotation_file} is not a COCO annotation file ({type(e).__name__}: {e})') from None
        self.coco = self.coco_dataset.coco
        self.category_ids = sorted(self.coco.getCatIds())
        if not self.category_ids or not all(isinstance(c, int) and c >= 0 for c in self.category_ids):
            raise UsageError(
                f'{annotation_file}: its category ids must be integers, 0 or more (got {self.category_ids[:5]})'
            )
        used = {a['category_id'] for a in self.coco.dataset.get('annotations', [])}
        undefined = sorted(used - set(self.category_ids))
        if undefined:
            raise UsageError(
                f'{annotation_file}: annotations use category ids that its categories do not define '
                f'({", ".join(map(str, undefined[:5]))}): add them to categories or drop those '
                'annotations'
            )
        self.category_names = [self.coco.cats[c]['name'] for c in self.category_ids]
        self.first_label = first_label
        self.train = train
        self.indices = list(range(len(self.coco_dataset.ids)))
        if train:
            self.indices = [
                i
                for i in self.indices
                if any(not a.get('iscrowd', 0) for a in self.coco.imgToAnns[self.coco_dataset.ids[i]])
            ]
            keys = {'image_id', 'boxes', 'labels', 'iscrowd'} | ({'masks'} if with_masks else set())
            self.wrapped = wrap_dataset_for_transforms_v2(self.coco_dataset, target_keys=keys)
            self.label_of = torch.zeros(max(self.category_ids) + 1, dtype=torch.int64)
            self.label_of[self.category_ids] = torch.arange(len(self.category_ids)) + first_label
        else:  # evaluation comes after a training epoch: a missing image must show before it
            missing = [p for p in map(self.sample_path, range(len(self))) if not os.path.isfile(p)]
            if missing:
                raise UsageError(f'{len(missing)} images of {annotation_file} are missing, e.g. {missing[0]}')
        self.transform = build_detection_transform(train)

    def sample_path(self, index: int) -> str:
        image_id = self.coco_dataset.ids[self.indices[index]]
        return os.path.join(self.coco_dataset.root, self.coco.imgs[image_id]['file_name'])

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def category_of(self, label: int) -> int:
        return self.category_ids[label - self.first_label]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        index = self.indices[index]
        if not self.train:
            image, _ = self.coco_dataset[index]
            return self.transform(image), {'image_id': self.coco_dataset.ids[index]}
        image, target = self.wrapped[index]
        keep = ~torch.tensor(target.pop('iscrowd'), dtype=torch.bool)
        for key in ('boxes', 'masks'):
            if key in target:
                target[key] = tv_tensors.wrap(target[key][keep], like=target[key])
        target['labels'] = self.label_of[target['labels'][keep]]
        image, target = self.transform(image, target)
        return image, {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in target.items()}


def build_detection_transform(train: bool):
    """Training: horizontal flip (p 0.5); boxes clipped to the image (an annotation that overruns it by a
    fraction of a pixel is kept, as mmdet keeps it), then boxes under 1 px dropped. Resizing (short side 800,
    long side at most 1333, or multi-scale), normalization and padding happen inside torchvision's detectors."""
    steps = [v2.ToImage()]
    if train:
        steps.append(v2.RandomHorizontalFlip(0.5))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if train:
        steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1)]
    return v2.Compose(steps)


def check_same_categories(train: CocoInstances, val: CocoInstances):
    if train.category_ids != val.category_ids:
        raise UsageError(
            f'the train and val annotation files define different categories ({train.num_classes} '
            f'vs {val.num_classes} classes, ids {train.category_ids[:5]}... vs {val.category_ids[:5]}...)'
            ': they must define the same ones'
        )


# ----------------------------------------------------------------------------------------------------
# ADE20K
# ----------------------------------------------------------------------------------------------------


class RescaleToFit(v2.Transform):
    """Resize keeping the aspect ratio so that the long side is at most `ratio * scale[0]` and the short
    side at most `ratio * scale[1]`, one side reaching its bound; `ratio` uniform in `ratio_range`
    (mmseg's Resize with img_scale and ratio_range). Masks are resized with nearest neighbours."""

    def __init__(self, scale=(2048, 512), ratio_range=(1.0, 1.0)):
        super().__init__()
        self.scale = scale
        self.ratio_range = ratio_range

    def make_params(self, flat_inputs: List) -> dict:
        height, width = v2.query_size(flat_inputs)
        ratio = float(torch.empty(()).uniform_(*self.ratio_range))
        factor = ratio * min(self.scale[0] / max(height, width), self.scale[1] / min(height, width))
        return {'size': [int(height * factor + 0.5), int(width * factor + 0.5)]}

    def transform(self, inpt, params: dict):
        return TF.resize(inpt, params['size'], antialias=True)


class CategoryBalancedCrop(v2.RandomCrop):
    """A random crop, padded to `size` when smaller (images with 0, masks with IGNORE_INDEX), redrawn up
    to 10 times until no class covers `cat_max_ratio` or more of its labelled pixels (mmseg's RandomCrop)."""

    def __init__(self, size: int, cat_max_ratio: float = 0.75):
        super().__init__(size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX})
        self.cat_max_ratio = cat_max_ratio

    def make_params(self, flat_inputs: List) -> dict:
        mask = next(x for x in flat_inputs if isinstance(x, tv_tensors.Mask))
        for _ in range(10):
            params = super().make_params(flat_inputs)
            labels, counts = torch.unique(self.transform(mask, params), return_counts=True)
            counts = counts[labels != IGNORE_INDEX]
            if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
        return params


def build_segmentation_transform(train: bool, img_scale=(2048, 512), crop_size: int = 512):
    """mmseg's ADE20K pipeline. Training: rescale with ratio 0.5-2, flip, photometric distortion,
    normalize, 512x512 crop. Evaluation (image only; the labels keep their size): rescale, normalize."""
    steps = [RescaleToFit(img_scale, (0.5, 2.0) if train else (1.0, 1.0))]
    if train:
        # Hue +-18 of OpenCV's 180 degrees, as mmseg's PhotoMetricDistortion.
        steps += [v2.RandomHorizontalFlip(0.5), v2.RandomPhotometricDistort(hue=(-0.1, 0.1))]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    if train:
        steps.append(CategoryBalancedCrop(crop_size))
    return v2.Compose(steps)


class ADE20KSegmentation(torch.utils.data.Dataset):
    """An ADE20K-format split as (image, mask). Masks hold labels 0..num_classes-1 and IGNORE_INDEX:
    with `reduce_zero_label` (ADE20K), file label 0 becomes IGNORE_INDEX and the others shift down by 1."""

    def __init__(
        self,
        data_path: str,
        split: str,
        train: bool,
        num_classes: int,
        img_scale=(2048, 512),
        crop_size: int = 512,
        reduce_zero_label: bool = True,
    ):
        image_dir = os.path.join(data_path, 'images', split)
        label_dir = os.path.join(data_path, 'annotations', split)
        for folder in (image_dir, label_dir):
            if not os.path.isdir(folder):
                raise UsageError(
                    f'{folder} not found: the ADE20K layout is DATA/images/{split}/<name>.jpg with '
                    f'labels in DATA/annotations/{split}/<name>.png (set --data-path and the split)'
                )
        names = sorted(os.path.splitext(f)[0] for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise UsageError(f'{image_dir} holds no images (.jpg, .jpeg, .png)')
        images = {os.path.splitext(f)[0]: f for f in os.listdir(image_dir)}
        self.images = [os.path.join(image_dir, images[n]) for n in names]
        self.labels = [os.path.join(label_dir, n + '.png') for n in names]
        missing = [p for p in self.labels if not os.path.isfile(p)]
        if missing:
            raise UsageError(f'{len(missing)} images of {image_dir} have no label file, e.g. {missing[0]}')
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.train = train
        self.transform = build_segmentation_transform(train, img_scale, crop_size)
        self.load_mask(0)  # a class-count mismatch shows at once

    def __len__(self) -> int:
        return len(self.images)

    def load_mask(self, index: int) -> torch.Tensor:
        mask = np.array(Image.open(self.labels[index]), dtype=np.int64)
        if mask.ndim != 2:
            raise UsageError(f'{self.labels[index]} is not a single-channel label image (shape {mask.shape})')
        # File labels: the classes (from 1 with --reduce-zero-label, whose 0 is ignored) and 255, ignored.
        labels = np.unique(mask)
        wrong = labels[
            ((labels < 0) | (labels >= self.num_classes + self.reduce_zero_label)) & (labels != IGNORE_INDEX)
        ]
        if len(wrong):
            top = self.num_classes - 1 + self.reduce_zero_label
            raise UsageError(
                f'{self.labels[index]} holds label {wrong[-1]}, outside 0..{top} and 255 (ignored) for --num-classes '
                f"{self.num_classes}: set --num-classes to the data set's class count"
            )
        if self.reduce_zero_label:
            mask = np.where((mask == 0) | (mask == IGNORE_INDEX), IGNORE_INDEX, mask - 1)
        return torch.from_numpy(mask)

    def sample_path(self, index: int) -> str:
        return f'{self.images[index]} (labels {self.labels[index]})'

    def __getitem__(self, index: int):
        image = tv_tensors.Image(TF.pil_to_tensor(Image.open(self.images[index]).convert('RGB')))
        mask = tv_tensors.Mask(self.load_mask(index))
        if mask.shape != image.shape[-2:]:
            raise UsageError(
                f'{self.labels[index]} is {mask.shape[1]}x{mask.shape[0]} but its image is '
                f"{image.shape[-1]}x{image.shape[-2]}: a label map must have its image's size"
            )
        if self.train:
            image, mask = self.transform(image, mask)
        else:
            image = self.transform(image)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
