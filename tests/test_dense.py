"""Dense prediction: the backbone and its checkpoints, the torchvision / smp models (boxes decoded in float32
under autocast), the COCO and ADE20K readers, the AP and mIoU evaluation, and main_det.py / main_seg.py on
tiny synthetic data sets."""

import json
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.scheduler import MultiStepLRScheduler
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

import checkpoints
import engine
import engine_dense
import main_det
import main_seg
from datasets_dense import IGNORE_INDEX, ADE20KSegmentation, CocoInstances, collate_lists
from errors import UsageError
from models.dense import (
    DENSE_PUBLISHED,
    FPN_CHANNELS,
    FlopsForward,
    RAVLTBackbone,
    SemanticSegmenter,
    UPerNetHead,
    build_dense_model,
    create_backbone,
    decode_in_float32,
)
from train_helpers import assert_one_line_error, run_here

# One torch thread: these tiny models gain nothing from more, and on a shared machine an oversubscribed thread pool
# makes a second's step take a minute.
pytestmark = pytest.mark.usefixtures('one_thread')

TINY = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4), drop_path_rate=0.0)
TINY_JSON = json.dumps(TINY)
CATEGORY_IDS = (3, 7)  # not contiguous on purpose
COLORS = {3: (220, 40, 40), 7: (40, 40, 220)}


# ----------------------------------------------------------------------------------------------------
# Synthetic data sets in the real formats
# ----------------------------------------------------------------------------------------------------


def write_coco(root, split, num_images=4, size=(64, 96), categories=CATEGORY_IDS):
    """Coloured rectangles (one colour per category) on grey, with boxes, polygons and one crowd region."""
    (root / split).mkdir(parents=True)
    (root / 'annotations').mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    height, width = size
    images, annotations = [], []
    for i in range(num_images):
        pixels = np.full((height, width, 3), 128, np.uint8)
        slot = width // len(categories)  # one column per category
        for j, category in enumerate(categories):
            offset = int(rng.integers(1, 8))
            x, y = j * slot + offset, int(rng.integers(2, height - 34))
            w, h = int(rng.integers(16, slot - offset)), int(rng.integers(16, 32))
            pixels[y : y + h, x : x + w] = COLORS.get(category, (0, 200, 0))
            annotations.append(
                {
                    'id': len(annotations) + 1,
                    'image_id': i + 1,
                    'category_id': category,
                    'bbox': [x, y, w, h],
                    'area': w * h,
                    'iscrowd': 0,
                    'segmentation': [[x, y, x + w, y, x + w, y + h, x, y + h]],
                }
            )
        Image.fromarray(pixels).save(root / split / f'{i:04d}.png')
        images.append({'id': i + 1, 'file_name': f'{i:04d}.png', 'height': height, 'width': width})
    # A crowd region: ignored in training (and by COCOeval).
    crowd = np.zeros((height, width), np.uint8)
    crowd[:6, :6] = 1
    counts = [int(c) for c in np.diff(np.r_[0, np.flatnonzero(np.diff(crowd.T.ravel())) + 1, crowd.size])]
    annotations.append(
        {
            'id': len(annotations) + 1,
            'image_id': 1,
            'category_id': categories[0],
            'bbox': [0, 0, 6, 6],
            'area': 36,
            'iscrowd': 1,
            'segmentation': {'size': [height, width], 'counts': counts},
        }
    )
    data = {
        'images': images,
        'annotations': annotations,
        'categories': [{'id': c, 'name': f'class{c}'} for c in categories],
    }
    (root / 'annotations' / f'instances_{split}.json').write_text(json.dumps(data))
    return data


def write_ade(root, split, num_images=4, size=(48, 64), max_label=3):
    """Label maps with 'other' (0) and classes 1..max_label as coloured horizontal bands."""
    (root / 'images' / split).mkdir(parents=True)
    (root / 'annotations' / split).mkdir(parents=True)
    rng = np.random.default_rng(1)
    height, width = size
    for i in range(num_images):
        labels = np.zeros(size, np.uint8)
        bounds = np.sort(rng.integers(4, height - 4, max_label))
        for label, top in enumerate(bounds, start=1):
            labels[top:] = label
        labels[:, :4] = 0
        palette = np.array(
            [[128, 128, 128], [200, 30, 30], [30, 200, 30], [30, 30, 200]] + [[90, 90, 0]] * 10, np.uint8
        )
        Image.fromarray(palette[labels]).save(root / 'images' / split / f'ADE_{i:04d}.jpg', quality=95)
        Image.fromarray(labels).save(root / 'annotations' / split / f'ADE_{i:04d}.png')


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('coco')
    write_coco(root, 'train2017')
    write_coco(root, 'val2017')
    return root


@pytest.fixture(scope='module')
def ade_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('ade')
    write_ade(root, 'training')
    write_ade(root, 'validation', num_images=2)
    return root


# ----------------------------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------------------------

CLASSIFIER_KEYS = {
    'proj.weight',
    'proj.bias',
    'norm.weight',
    'norm.bias',
    'norm.running_mean',
    'norm.running_var',
    'norm.num_batches_tracked',
    'head.weight',
    'head.bias',
}
EXTRA_NORM_KEYS = {f'extra_norms.{i}.norm.{p}' for i in range(4) for p in ('weight', 'bias')}


def test_backbone_keys_are_the_authors_dense_backbone_keys():
    """The authors' GLTA backbone = their classification keys without the classifier, plus extra_norms."""
    with open('tests/fixtures/state_dict_manifest.json') as f:
        manifest = {k: tuple(s) for k, s, _ in json.load(f)['RAVLT_T']}
    expected = {k: s for k, s in manifest.items() if k not in CLASSIFIER_KEYS}
    expected.update({k: (dim,) for k in EXTRA_NORM_KEYS for dim in [(64, 128, 256, 512)[int(k.split('.')[1])]]})
    backbone = create_backbone('ravlt_t')
    assert {k: tuple(v.shape) for k, v in backbone.state_dict().items()} == expected
    assert [n.norm.eps for n in backbone.extra_norms] == [1e-6] * 4


def test_backbone_outputs_are_normed_timm_features():
    torch.manual_seed(0)
    backbone = RAVLTBackbone(**TINY).eval()
    for norm in backbone.extra_norms:  # non-trivial affine parameters
        torch.nn.init.normal_(norm.norm.weight)
        torch.nn.init.normal_(norm.norm.bias)
    features_only = timm.create_model('ravlt_t', features_only=True, **TINY).eval()
    missing, unexpected = features_only.model.load_state_dict(backbone.state_dict(), strict=False)
    assert set(unexpected) == EXTRA_NORM_KEYS and not missing
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outputs, reference = backbone(x), features_only(x)
    assert [tuple(o.shape) for o in outputs] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 64, 4, 6), (2, 128, 2, 3)]
    for i, (out, ref) in enumerate(zip(outputs, reference)):
        norm = backbone.extra_norms[i].norm
        expected = torch.nn.functional.layer_norm(
            ref.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, 1e-6
        ).permute(0, 3, 1, 2)
        torch.testing.assert_close(out, expected)


def load_backbone(model, checkpoint):
    return checkpoints.load_backbone_weights(model, checkpoint, 'test.pth', 'ravlt_t')


def test_backbone_loads_imagenet_and_authors_dense_checkpoints():
    torch.manual_seed(0)
    classifier = timm.create_model('ravlt_t', num_classes=10, **TINY)
    imagenet = {'model': classifier.state_dict(), 'epoch': 3}
    model = build_dense_model('maskrcnn', 'RAVLT_T', 2, TINY, min_size=64, max_size=96)
    missing, unexpected = load_backbone(model, imagenet)
    assert set(missing) == EXTRA_NORM_KEYS and set(unexpected) == CLASSIFIER_KEYS
    backbone = model.backbone.body.state_dict()
    for key, value in classifier.state_dict().items():
        if key not in CLASSIFIER_KEYS:
            assert torch.equal(backbone[key], value), key

    # The authors' mmdet checkpoint: `state_dict` with `backbone.*`, `neck.*`, `rpn_head.*` ...
    authors = {
        'meta': {'epoch': 12, 'CLASSES': ('a', 'b')},
        'state_dict': {
            **{f'backbone.{k}': v + 1 for k, v in backbone.items()},
            'neck.lateral_convs.0.conv.weight': torch.zeros(256, 16, 1, 1),
        },
    }
    other = build_dense_model('semfpn', 'ravlt_t', 2, TINY)
    assert load_backbone(other, authors) == ([], [])
    assert all(torch.equal(other.backbone.state_dict()[k], v + 1) for k, v in backbone.items())

    # Our own dense checkpoint (`model`, keys `backbone.body.*`) feeds another task's backbone too.
    assert load_backbone(other, {'model': model.state_dict()}) == ([], [])
    with pytest.raises(UsageError, match='differ in shape'):
        load_backbone(build_dense_model('semfpn', 'ravlt_t', 2, dict(TINY, embed_dims=(16, 32, 64, 96))), imagenet)
    with pytest.raises(UsageError, match='no RAVLT weights'):
        load_backbone(other, {'model': {'fc.weight': torch.zeros(2, 2)}})


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


def test_retinanet_follows_the_authors_config():
    torch.manual_seed(0)
    # C5 of 256 channels = the FPN width: P6 must still come from C5, not from P5.
    model = build_dense_model(
        'retinanet', 'ravlt_t', 3, dict(TINY, embed_dims=(32, 64, 128, 256)), min_size=64, max_size=96
    ).eval()
    body, fpn = model.backbone.body, model.backbone.fpn
    assert body.out_indices == (1, 2, 3) and len(fpn.inner_blocks) == 3
    assert not any(p.requires_grad for p in body.extra_norms[0].parameters())  # unused: frozen
    seen = {}
    fpn.extra_blocks.p6.register_forward_hook(lambda m, inputs, out: seen.update(p6_input=inputs[0]))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = model.backbone(x)
        c5 = body(x)[-1]
    torch.testing.assert_close(seen['p6_input'], c5)
    assert list(features) == ['0', '1', '2', 'p6', 'p7']
    assert [f.shape[-1] for f in features.values()] == [12, 6, 3, 2, 1]  # strides 8 ... 128
    sizes = model.anchor_generator.sizes
    assert len(sizes) == 5 and all(len(s) == 3 for s in sizes)
    np.testing.assert_allclose(sizes[0], [32, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)])
    assert model.anchor_generator.aspect_ratios[0] == (0.5, 1.0, 2.0)
    assert model.head.classification_head.num_classes == 3  # no background column
    assert len(model.head.classification_head.conv) == 4


def test_param_counts_near_the_papers():
    """Full-size models built from the library parts are within 2.5% of the README's (rounded) counts."""
    for task, variant in (('maskrcnn', 'ravlt_t'), ('upernet', 'ravlt_s')):
        with torch.device('meta'):
            model = build_dense_model(task, variant)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        published = DENSE_PUBLISHED[task][variant]['params']
        assert abs(params - published) / published < 0.025, (task, variant, params)


def test_segmenter_losses_and_logits():
    torch.manual_seed(0)
    for task in ('semfpn', 'upernet'):
        model = small_model(task, 5)
        images, masks = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
        masks[:, :8] = IGNORE_INDEX
        losses = model.train()(images, masks)
        assert set(losses) == ({'loss_seg', 'loss_aux'} if task == 'upernet' else {'loss_seg'})
        with torch.no_grad():
            logits = model.eval()(images[:, :, :48])
        assert logits.shape == (2, 5, 48, 64)


# ----------------------------------------------------------------------------------------------------
# Data sets
# ----------------------------------------------------------------------------------------------------


def test_coco_reader_maps_categories_and_drops_crowds(coco_root):
    train = CocoInstances(str(coco_root), 'train2017', True, with_masks=True, first_label=1)
    assert train.num_classes == 2 and train.category_of(1) == 3 and train.category_of(2) == 7
    image, target = train[0]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 96) and 0 <= image.min() <= image.max() <= 1
    assert target['labels'].tolist() == [1, 2]  # the crowd region of image 1 is gone
    assert target['masks'].shape == (2, 64, 96) and target['boxes'].shape == (2, 4)
    box = target['boxes'][0].round().int().tolist()
    assert target['masks'][0, box[1] : box[3], box[0] : box[2]].float().mean() > 0.9
    retina = CocoInstances(str(coco_root), 'train2017', True, with_masks=False, first_label=0)
    assert retina[0][1]['labels'].tolist() == [0, 1] and 'masks' not in retina[0][1]
    val = CocoInstances(str(coco_root), 'val2017', False, with_masks=True, first_label=1)
    assert len(val) == 4 and val[2][1] == {'image_id': 3}


def test_ade_reader_and_transforms(ade_root):
    train = ADE20KSegmentation(str(ade_root), 'training', True, num_classes=3, img_scale=(128, 32), crop_size=40)
    val = ADE20KSegmentation(str(ade_root), 'validation', False, num_classes=3, img_scale=(128, 32))
    raw = np.array(Image.open(ade_root / 'annotations' / 'validation' / 'ADE_0000.png'))
    image, mask = val[0]
    assert image.shape == (3, 32, 43) and mask.shape == raw.shape  # labels keep their size
    assert torch.equal(mask, torch.from_numpy(np.where(raw == 0, IGNORE_INDEX, raw.astype(np.int64) - 1)))
    torch.manual_seed(0)
    shapes, padded = set(), False
    for i in range(8):
        image, mask = train[i % len(train)]
        shapes.add((tuple(image.shape), tuple(mask.shape)))
        assert set(mask.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
        padded |= bool((image.abs().sum(0) == 0).any())
    assert shapes == {((3, 40, 40), (40, 40))} and padded  # rescaled 0.5-2x of 32 px: some crops need padding


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------


def _ground_truth_outputs(dataset, keep_categories):
    """Detections equal to the ground truth (non-crowd annotations) of every image."""
    outputs = []
    for image_id in dataset.coco_dataset.ids:
        anns = [a for a in dataset.coco.imgToAnns[image_id] if not a['iscrowd'] and a['category_id'] in keep_categories]
        boxes = torch.tensor(
            [[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2], a['bbox'][1] + a['bbox'][3]] for a in anns],
            dtype=torch.float32,
        ).reshape(-1, 4)
        masks = (
            torch.stack([torch.from_numpy(dataset.coco.annToMask(a)).float() for a in anns])[:, None]
            if anns
            else torch.zeros(0, 1, 64, 96)
        )
        labels = torch.tensor([dataset.category_ids.index(a['category_id']) + dataset.first_label for a in anns])
        outputs.append((image_id, {'boxes': boxes, 'labels': labels, 'scores': torch.ones(len(anns)), 'masks': masks}))
    return outputs


def test_coco_ap_of_ground_truth_is_100_and_of_half_the_classes_50(coco_root):
    dataset = CocoInstances(str(coco_root), 'val2017', False, with_masks=True, first_label=1)
    for keep, expected in ((CATEGORY_IDS, 100.0), (CATEGORY_IDS[:1], 50.0)):
        results = [
            r
            for image_id, output in _ground_truth_outputs(dataset, keep)
            for r in engine_dense.coco_results(output, image_id, dataset.category_of)
        ]
        stats = engine_dense.coco_metrics(dataset.coco, results, ('bbox', 'segm'))
        assert stats['bbox_AP'] == pytest.approx(expected) and stats['segm_AP'] == pytest.approx(expected)
    # No detections at all: AP 0 where there are objects to find, null (COCO's -1) where there are none.
    nothing = engine_dense.coco_metrics(dataset.coco, [], ('bbox',))
    assert nothing['bbox_AP'] == nothing['bbox_APs'] == 0.0 and nothing['bbox_APl'] is None


class FixedPrediction(torch.nn.Module):
    def __init__(self, prediction, num_classes):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(prediction, num_classes).permute(2, 0, 1)[None].float()

    def forward(self, images):
        return self.logits


def test_miou_by_hand():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE_INDEX, 1]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 3, fp 1 -> 3/4; class 2: tp 1, fn 1 (the ignored pixel
    # does not count) -> 1/2; class 3 is absent from labels and predictions and left out.
    loader = [(torch.zeros(1, 3, 2, 4), labels[None])]
    stats = engine_dense.evaluate_segmentation(
        FixedPrediction(prediction, 4), loader, num_classes=4, ignore_index=IGNORE_INDEX
    )
    assert stats['mIoU'] == pytest.approx(100 * (1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert stats['aAcc'] == pytest.approx(100 * 5 / 7)
    assert stats['mAcc'] == pytest.approx(100 * (1 / 2 + 1 + 1 / 2) / 3)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def small_model(task, num_classes):
    """The task's model from the same classes, with narrower heads (the full ones take seconds per CPU step)."""
    if task == 'maskrcnn':
        model = build_dense_model(
            task,
            'ravlt_t',
            num_classes,
            TINY,
            min_size=64,
            max_size=96,
            rpn_batch_size_per_image=64,
            rpn_post_nms_top_n_train=100,
            rpn_post_nms_top_n_test=50,
            box_batch_size_per_image=64,
        )
        model.roi_heads.box_head = TwoMLPHead(FPN_CHANNELS * 7 * 7, 64)
        model.roi_heads.box_predictor = FastRCNNPredictor(64, num_classes + 1)
        model.roi_heads.mask_head = MaskRCNNHeads(FPN_CHANNELS, [32, 32], 1)
        model.roi_heads.mask_predictor = MaskRCNNPredictor(32, 32, num_classes + 1)
        decode_in_float32(model.roi_heads.box_predictor, model.roi_heads.mask_predictor)  # as build_maskrcnn does
        return model
    if task == 'upernet':
        body = create_backbone('ravlt_t', **TINY)
        return SemanticSegmenter(body, UPerNetHead(body.out_channels, channels=64), num_classes, aux_stage=2)
    kwargs = dict(min_size=64, max_size=96) if task == 'retinanet' else {}
    return build_dense_model(task, 'ravlt_t', num_classes, TINY, **kwargs)


@pytest.mark.parametrize(
    'task',
    [
        pytest.param('retinanet', marks=pytest.mark.slow),
        pytest.param('maskrcnn', marks=pytest.mark.slow),
        'semfpn',
        'upernet',
    ],
)
def test_training_steps_lower_the_loss(task, coco_root, ade_root):
    torch.manual_seed(0)
    if task in ('retinanet', 'maskrcnn'):
        dataset = CocoInstances(str(coco_root), 'train2017', True, task == 'maskrcnn', main_det.FIRST_LABEL[task])
        batch = collate_lists([dataset[0], dataset[1]])
        num_classes = 2
    else:
        dataset = ADE20KSegmentation(str(ade_root), 'training', True, 3, img_scale=(64, 48), crop_size=48)
        batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
        num_classes = 3
    model = small_model(task, num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = MultiStepLRScheduler(optimizer, decay_t=[1000], t_in_epochs=False)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    losses = []
    for epoch in range(2):
        result = engine.train_one_epoch(
            model,
            None,  # the model returns its losses
            [batch] * 4,
            optimizer,
            scaler,
            torch.device('cpu'),
            epoch,
            lr_scheduler=scheduler,
            print_freq=100,
        )
        losses.append(result.stats['loss'])
    assert losses[1] < 0.9 * losses[0], losses


def test_mask_rcnn_evaluation_reports_box_and_mask_ap(coco_root):
    torch.manual_seed(0)
    dataset = CocoInstances(str(coco_root), 'val2017', False, with_masks=True, first_label=1)
    model = small_model('maskrcnn', 2)
    model.roi_heads.score_thresh = 0.0  # an untrained model: keep its low-scoring detections
    stats = engine_dense.evaluate_coco(
        model,
        torch.utils.data.DataLoader(dataset, 2, collate_fn=collate_lists),
        dataset=dataset,
        iou_types=('bbox', 'segm'),
    )
    assert {'bbox_AP', 'bbox_AP50', 'segm_AP', 'segm_APl'} <= set(stats)
    assert all(0.0 <= stats[k] <= 100.0 for k in ('bbox_AP', 'bbox_AP50', 'segm_AP', 'segm_AP50'))


def test_flops_count_the_authors_dummy_forward():
    """As mmdet's get_flops: Mask R-CNN's box head on 1000 proposals, its mask head on 100."""
    from fvcore.nn import FlopCountAnalysis

    torch.manual_seed(0)
    model = small_model('maskrcnn', 2).eval()  # box head 12544 -> 64 -> 64, 3 classes (with background)
    analysis = FlopCountAnalysis(FlopsForward(model), torch.randn(1, 3, 64, 96))
    with torch.no_grad():
        counted = analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).by_operator()
    assert counted['linear'] == 1000 * (FPN_CHANNELS * 49 * 64 + 64 * 64 + 64 * 3 + 64 * 3 * 4)
    mask_head_convs = 100 * 14 * 14 * 9 * (FPN_CHANNELS * 32 + 32 * 32)
    assert counted['conv'] > mask_head_convs


def test_optimizer_groups_follow_the_authors_norm_rule():
    upernet, semfpn = small_model('upernet', 3), small_model('semfpn', 3)
    decay, no_decay = engine_dense.param_groups(upernet, 0.01, norm_no_decay=True)
    names = {id(p): n for n, p in upernet.named_parameters()}
    assert {names[id(p)] for p in no_decay['params']} == {
        n for n, _ in upernet.named_parameters() if n.startswith('backbone.') and 'norm' in n
    }
    assert any('conv_norm_relu' in names[id(p)] for p in decay['params'])  # smp's name; the authors' 'bn' decays
    assert (decay['weight_decay'], no_decay['weight_decay']) == (0.01, 0.0)
    decay, no_decay = engine_dense.param_groups(semfpn, 1e-4, norm_no_decay=False)
    assert not no_decay['params'] and len(decay['params']) == len(list(semfpn.parameters()))


def det_args(coco_root, out, task, *extra):
    return [
        '--task',
        task,
        '--model',
        'RAVLT_T',
        '--model-kwargs',
        TINY_JSON,
        '--data-path',
        str(coco_root),
        '--img-scale',
        '96',
        '64',
        '--device',
        'cpu',
        '--num_workers',
        '0',
        '--batch-size',
        '2',
        '--lr',
        '1e-3',
        '--warmup-iters',
        '2',
        '--print-freq',
        '100',
        '--output_dir',
        str(out),
        *extra,
    ]


def run(entry_point, argv) -> dict:
    """An entry point's command line run in this process; returns its metrics (a mistake raises its UsageError)."""
    return entry_point.main(entry_point.get_args_parser().parse_args([str(a) for a in argv]))


@pytest.mark.slow
def test_main_det_trains_evaluates_and_resumes(coco_root, tmp_path, capsys):
    task = 'retinanet'  # Mask R-CNN's full heads are slow on the CPU; the run is the same
    stats = run(main_det, det_args(coco_root, tmp_path, task, '--epochs', '2', '--lr-steps', '1'))
    printed = capsys.readouterr().out
    # The metrics as the files hold them (null where COCO gives -1), not pycocotools' own prints.
    assert len([line for line in printed.splitlines() if line.startswith('* Weights: bbox_AP ')]) == 2
    assert 'bbox_APl null' in printed
    for noise in (
        '-1.000',
        'index created',
        'loading annotations',
        'Running per image evaluation',
        'Accumulating evaluation results',
        'Average Precision',
    ):
        assert noise not in printed
    assert set(stats) == {f'bbox_{n}' for n in ['AP', 'AP50', 'AP75', 'APs', 'APm', 'APl']}
    assert all(v is None or 0.0 <= v <= 100.0 for v in stats.values()) and stats['bbox_APl'] is None  # no large objects
    log = [json.loads(line) for line in (tmp_path / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in log] == [0, 1] and log[-1]['step'] == 4 and 'test_bbox_AP' in log[-1]
    assert log[-1]['train_lr'] == pytest.approx(1e-4)  # x0.1 after epoch 1
    assert log[-1]['test_bbox_APl'] is None
    checkpoint = checkpoints.load_checkpoint(tmp_path / 'checkpoint.pth')
    assert checkpoint['epoch'] == 1 and checkpoint['meta']['classes'] == ['class3', 'class7']

    # The checkpoint evaluates to the same numbers, with its own --task, --model-kwargs and --img-scale.
    evaluated = run(
        main_det,
        [
            '--data-path',
            coco_root,
            '--device',
            'cpu',
            '--num_workers',
            '0',
            '--eval',
            '--resume',
            tmp_path / 'checkpoint.pth',
            '--output_dir',
            tmp_path / 'eval',
        ],
    )
    assert evaluated == stats
    assert json.loads((tmp_path / 'eval' / 'eval_results.json').read_text()) == stats
    # Training continues where it stopped; a warning says the warm-up now covers the whole run.
    capsys.readouterr()
    run(main_det, det_args(coco_root, tmp_path, task, '--epochs', '3', '--lr-steps', '1', '--warmup-iters', '100'))
    log = [json.loads(line) for line in (tmp_path / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in log] == [0, 1, 2] and log[-1]['step'] == 6
    assert 'warning: the warm-up covers the whole run' in capsys.readouterr().out


def test_main_det_checks_its_flags_before_loading_anything(tmp_path):
    """--lr-steps beyond --epochs is refused before the data is read (here there is none) and before the output
    folder is made."""
    argv = ['--epochs', '1', '--data-path', tmp_path / 'nowhere', '--device', 'cpu', '--output_dir', tmp_path / 'new']
    result = run_here(main_det, argv)
    assert_one_line_error(
        result.returncode, result.stdout, result.stderr, 2, 'error: --lr-steps 8 11 go beyond --epochs 1'
    )
    assert os.listdir(tmp_path) == []


def seg_args(ade_root, out, task, *extra):
    return [
        '--task',
        task,
        '--model',
        'RAVLT_T',
        '--model-kwargs',
        TINY_JSON,
        '--data-path',
        str(ade_root),
        '--num-classes',
        '3',
        '--img-scale',
        '64',
        '48',
        '--crop-size',
        '48',
        '--device',
        'cpu',
        '--num_workers',
        '0',
        '--batch-size',
        '2',
        '--lr',
        '1e-3',
        '--print-freq',
        '100',
        '--output_dir',
        str(out),
        *extra,
    ]


@pytest.mark.slow
def test_main_seg_trains_evaluates_and_resumes(ade_root, tmp_path):
    schedule = ('--min-lr', '0', '--poly-power', '1')
    stats = run(main_seg, seg_args(ade_root, tmp_path, 'semfpn', '--iters', '3', '--eval-interval', '2', *schedule))
    assert set(stats) == {'mIoU', 'mAcc', 'aAcc'} and 0 <= stats['mIoU'] <= 100
    log = [json.loads(line) for line in (tmp_path / 'log.txt').read_text().splitlines()]
    # 2 steps per epoch, 3 steps in all: evaluated after epoch 0 (step 2) and at the end (step 3).
    assert [(r['epoch'], r['step'], 'test_mIoU' in r) for r in log] == [(0, 2, True), (1, 3, True)]
    assert log[-1]['train_lr'] == pytest.approx(1e-3 * (1 - 2 / 3))  # poly, power 1, step 2 of 3
    evaluated = run(
        main_seg, seg_args(ade_root, tmp_path / 'eval', 'semfpn', '--eval', '--resume', tmp_path / 'checkpoint.pth')
    )
    assert evaluated == stats
    assert json.loads((tmp_path / 'eval' / 'eval_results.json').read_text()) == stats
    run(main_seg, seg_args(ade_root, tmp_path, 'semfpn', '--iters', '5', '--eval-interval', '100', *schedule))
    log = [json.loads(line) for line in (tmp_path / 'log.txt').read_text().splitlines()]
    assert [(r['epoch'], r['step']) for r in log][2:] == [(2, 5)]


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


def assert_refused(entry_point, argv, *fragments):
    """One line, exit code 2, and no output folder made."""
    out = argv[argv.index('--output_dir') + 1]
    result = run_here(entry_point, argv)
    assert_one_line_error(result.returncode, result.stdout, result.stderr, 2, *fragments)
    assert not os.path.exists(out)


def test_missing_files_and_class_mismatches_are_one_line_errors(coco_root, ade_root, tmp_path):
    assert_refused(
        main_det, det_args(tmp_path, tmp_path / 'a', 'retinanet'), 'instances_val2017.json not found', 'COCO layout'
    )
    assert_refused(main_seg, seg_args(tmp_path, tmp_path / 'a', 'semfpn'), 'not found: the ADE20K layout')
    other = tmp_path / 'other'
    write_coco(other, 'train2017', categories=(3, 7, 9))
    write_coco(other, 'val2017')
    assert_refused(
        main_det, det_args(other, tmp_path / 'b', 'retinanet'), 'define different categories (3 vs 2 classes'
    )
    assert_refused(
        main_seg,
        seg_args(ade_root, tmp_path / 'c', 'semfpn', '--num-classes', '2'),
        'holds label 3, outside 0..2',
    )
    # A checkpoint trained on 2 classes evaluated on 3.
    write_coco(tmp_path / 'three', 'val2017', categories=(3, 7, 9))
    model = build_dense_model('retinanet', 'ravlt_t', 2, TINY)
    checkpoints.save_checkpoint(
        {
            'model': model.state_dict(),
            'meta': {'task': 'retinanet', 'model': 'ravlt_t', 'classes': ['class3', 'class7']},
        },
        tmp_path / 'two.pth',
    )
    assert_refused(
        main_det,
        det_args(tmp_path / 'three', tmp_path / 'd', 'retinanet', '--eval', '--resume', tmp_path / 'two.pth'),
        'two.pth was trained on other classes (2: class3, class7 ...) than this data set has (3: class3, class7',
    )
    checkpoints.save_checkpoint({'model': {'fc.weight': torch.zeros(1)}}, tmp_path / 'fc.pth')
    assert_refused(
        main_seg,
        seg_args(ade_root, tmp_path / 'e', 'semfpn', '--eval', '--pretrained', tmp_path / 'fc.pth'),
        'fc.pth holds no RAVLT weights',
    )
    # An ImageNet checkpoint given to --resume instead of --pretrained.
    classifier = timm.create_model('ravlt_t', num_classes=10, **TINY)
    checkpoints.save_checkpoint({'model': classifier.state_dict(), 'epoch': 3}, tmp_path / 'in1k.pth')
    assert_refused(
        main_seg,
        seg_args(ade_root, tmp_path / 'g', 'semfpn', '--eval', '--resume', tmp_path / 'in1k.pth'),
        'in1k.pth is not a main_det.py / main_seg.py checkpoint',
        'go to --pretrained',
    )


@pytest.mark.parametrize(
    'trained, entry_point, tasks',
    [
        ('semfpn', main_det, 'retinanet, maskrcnn'),
        ('retinanet', main_seg, 'semfpn, upernet'),
    ],
)
def test_a_checkpoint_of_the_other_dense_entry_point_is_one_line(
    trained, entry_point, tasks, coco_root, ade_root, tmp_path
):
    """Its --task, taken from its flags, is one the entry point does not run: said before anything is built."""
    model = build_dense_model(trained, 'ravlt_t', 2, TINY)
    flags = {'task': trained, 'model': 'RAVLT_T', 'model-kwargs': json.loads(TINY_JSON), 'img-scale': [96, 64]}
    checkpoints.save_checkpoint(
        {'model': model.state_dict(), 'args': flags, 'meta': {'task': trained}}, tmp_path / 'other.pth'
    )
    data = coco_root if entry_point is main_det else ade_root
    argv = ['--data-path', data, '--device', 'cpu', '--num_workers', '0', '--eval', '--resume', tmp_path / 'other.pth']
    result = run_here(entry_point, argv + ['--output_dir', tmp_path / 'out'])
    script = f'{entry_point.__name__}.py'
    assert_one_line_error(
        result.returncode,
        result.stdout,
        result.stderr,
        2,
        f'error: {tmp_path / "other.pth"} was trained with --task {trained}, which {script} does not take '
        f'(it takes {tasks})',
    )
    assert not (tmp_path / 'out').exists()


# ----------------------------------------------------------------------------------------------------
# Precision, data problems, several processes
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('task', ['retinanet', 'maskrcnn'])
def test_boxes_are_decoded_and_scored_in_float32_under_autocast(task, monkeypatch):
    """Under bf16 autocast the convs run in bf16, but anchors, proposals and boxes stay float32: in bf16 a box
    on an 800x1333 image would move by up to 15 px."""
    torch.manual_seed(0)
    model = small_model(task, 2).eval()
    if task == 'retinanet':
        model.score_thresh = 0.0
    coders = [model.box_coder] if task == 'retinanet' else [model.rpn.box_coder, model.roi_heads.box_coder]
    seen = []
    for coder in coders:
        monkeypatch.setattr(
            coder,
            'decode_single',
            lambda codes, boxes, original=coder.decode_single: (
                seen.append((codes.dtype, boxes.dtype)),
                original(codes, boxes),
            )[1],
        )
    features = []
    model.backbone.fpn.layer_blocks[0].register_forward_hook(lambda m, i, o: features.append(o.dtype))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        (output,) = model([torch.rand(3, 64, 96)])
    assert features == [torch.bfloat16]  # the network itself runs in bf16
    assert seen and set(seen) == {(torch.float32, torch.float32)}
    assert output['boxes'].dtype == output['scores'].dtype == torch.float32


def test_coco_annotations_are_checked_against_their_categories_and_images(tmp_path):
    root = tmp_path / 'coco'
    data = write_coco(root, 'train2017')
    data['annotations'][0]['category_id'] = 5  # inside the id range 3..7, but not a defined category
    data['annotations'][1]['bbox'][0] -= 0.5  # overruns the image by half a pixel: kept, clipped
    data['annotations'][1]['bbox'][2] += 0.5
    (root / 'annotations' / 'instances_train2017.json').write_text(json.dumps(data))
    with pytest.raises(UsageError, match='annotations use category ids that its categories do not define .5.'):
        CocoInstances(str(root), 'train2017', True, with_masks=False, first_label=0)
    data['annotations'][0]['category_id'] = 3
    data['annotations'][1]['bbox'] = [-0.5, 10, 20.5, 20]
    (root / 'annotations' / 'instances_train2017.json').write_text(json.dumps(data))
    dataset = CocoInstances(str(root), 'train2017', True, with_masks=False, first_label=0)
    image_id = data['annotations'][1]['image_id']
    index = dataset.coco_dataset.ids.index(image_id)
    torch.manual_seed(0)
    counts = {len(dataset[index][1]['boxes']) for _ in range(4)}  # whichever way it is flipped
    expected = sum(1 for a in data['annotations'] if a['image_id'] == image_id and not a['iscrowd'])
    assert counts == {expected}

    write_coco(root, 'val2017')
    (root / 'val2017' / '0002.png').unlink()  # evaluation comes after a training epoch: found at the start
    with pytest.raises(UsageError, match=r'1 images of .*instances_val2017.json are missing, e.g. .*0002.png'):
        CocoInstances(str(root), 'val2017', False, with_masks=False, first_label=0)


@pytest.mark.parametrize('split, train', [('training', True), ('validation', False)])
def test_a_label_map_of_the_wrong_size_names_its_file(split, train, tmp_path):
    write_ade(tmp_path, split)
    label = tmp_path / 'annotations' / split / 'ADE_0002.png'
    Image.fromarray(np.zeros((40, 64), np.uint8)).save(label)
    dataset = ADE20KSegmentation(str(tmp_path), split, train, num_classes=3, img_scale=(64, 48), crop_size=32)
    with pytest.raises(UsageError, match=f'{label} is 64x40 but its image is 64x48'):
        dataset[2]


@pytest.mark.parametrize('entry_point', [main_det, main_seg])
def test_img_scale_is_long_then_short_and_the_reverse_is_refused(entry_point, coco_root, ade_root, tmp_path):
    argv = det_args(coco_root, tmp_path / 'out', 'retinanet') if entry_point is main_det else None
    argv = argv or seg_args(ade_root, tmp_path / 'out', 'semfpn')
    assert_refused(
        entry_point,
        argv + ['--eval', '--img-scale', '800', '1333'],
        'error: --img-scale takes LONG SHORT (e.g. 1333 800 for COCO, 2048 512 for ADE20K), got 800 1333: '
        'did you mean 1333 800?',
    )


def _coco_in_two_processes(rank, port, root, folder):
    import torch.distributed as dist

    import distributed

    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), WORLD_SIZE='2', RANK=str(rank))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    dataset = CocoInstances(root, 'val2017', False, with_masks=True, first_label=1)
    outputs = dict(_ground_truth_outputs(dataset, CATEGORY_IDS))
    share = torch.utils.data.Subset(dataset, range(rank, len(dataset), 2))
    ids = iter([dataset.coco_dataset.ids[dataset.indices[i]] for i in share.indices])

    class GroundTruth(torch.nn.Module):  # answers each image with its ground truth
        def forward(self, images):
            return [outputs[next(ids)] for _ in images]

    stats = engine_dense.evaluate_coco(
        GroundTruth(),
        torch.utils.data.DataLoader(share, 1, collate_fn=collate_lists),
        dataset=dataset,
        iou_types=('bbox', 'segm'),
    )
    torch.save({'stats': stats, 'gathered': distributed.gather_objects([rank])}, os.path.join(folder, f'{rank}.pt'))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_coco_evaluation_in_two_processes_is_scored_once_on_rank_0(coco_root, tmp_path):
    from train_helpers import free_port

    torch.multiprocessing.spawn(_coco_in_two_processes, args=(free_port(), str(coco_root), str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f'{r}.pt') for r in (0, 1))
    assert rank0['stats'] == rank1['stats'] and rank0['stats']['bbox_AP'] == rank0['stats']['segm_AP'] == 100.0
    assert rank0['gathered'] == [[0], [1]] and rank1['gathered'] is None  # results go to rank 0 only
