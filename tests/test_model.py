"""RAVLT is the authors' function with the authors' checkpoint layout, and a well-behaved timm model."""

import argparse
import json
import os

import pytest
import timm
import torch
from timm.utils import reparameterize_model

import models
from hash_fill import fill_value, hash_fill_, hash_input
from helpers import ROOT, TINY_KWARGS, VARIANTS, rel_err, tiny
from models.ravlt import RALA, SoftmaxAttention

FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')


def load_fixture(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


MANIFEST = load_fixture('state_dict_manifest.json')
GOLDEN = load_fixture('golden_RAVLT_T.json')


@pytest.fixture(scope='module')
def golden_model():
    model = hash_fill_(timm.create_model('ravlt_t')).eval()
    return model


@pytest.fixture(scope='module')
def golden_fused(golden_model):
    """The golden model after inference re-parameterization (BatchNorm and skip connections folded)."""
    return reparameterize_model(golden_model)


# ---------------------------------------------------------------- registration and layout


def test_registered_with_timm_and_author_names_resolve():
    assert sorted(timm.list_models('ravlt_*')) == sorted(VARIANTS)
    assert [models.resolve_model_name(n) for n in ('RAVLT_T', 'RAVLT_S', 'ravlt_b', 'RAVLT_L')] == [
        'ravlt_t',
        'ravlt_s',
        'ravlt_b',
        'ravlt_l',
    ]
    assert models.resolve_model_name('convnext_tiny') == 'convnext_tiny'


@pytest.mark.parametrize('variant', VARIANTS)
def test_state_dict_matches_authors_manifest(variant):
    with torch.device('meta'):
        model = timm.create_model(variant)
    ours = [(k, list(v.shape), str(v.dtype).replace('torch.', '')) for k, v in model.state_dict().items()]
    assert ours == [tuple(entry) for entry in MANIFEST[variant.upper()]]


@pytest.mark.parametrize(
    'variant, params',
    [('ravlt_t', 14_897_768), ('ravlt_s', 25_591_208), ('ravlt_b', 48_241_288), ('ravlt_l', 95_242_440)],
)
def test_parameter_counts(variant, params):
    with torch.device('meta'):
        model = timm.create_model(variant)
    assert sum(p.numel() for p in model.parameters()) == params


def test_authors_layout_checkpoint_loads_strict():
    model = timm.create_model('ravlt_t')
    state = {k: torch.zeros(shape, dtype=getattr(torch, dtype)) for k, shape, dtype in MANIFEST['RAVLT_T']}
    state.update({k: torch.tensor(v) for k, v in GOLDEN['rope_angle'].items()})
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize('variant', VARIANTS)
def test_rope_buffers_and_block_kinds(variant):
    with torch.device('meta'):
        model = timm.create_model(variant)
    kinds = [{type(b.attn) for b in stage.blocks} for stage in model.layers]
    assert kinds == [
        {RALA},
        {RALA},
        {SoftmaxAttention},
        {SoftmaxAttention},
    ]
    if variant == 'ravlt_t':
        model = timm.create_model(variant)
        for key, values in GOLDEN['rope_angle'].items():
            assert torch.equal(model.state_dict()[key], torch.tensor(values, dtype=torch.float32))


# RAVLT-T's attention in stages 1-2 without the gate o and LePE: per block C * C + C (o) and 25 * C + C (LePE)
# fewer, for two blocks of C = 64 and two of C = 128.
RAVLT_T_UNGATED_PARAMS = 14_897_768 - 2 * (64 * 64 + 27 * 64) - 2 * (128 * 128 + 27 * 128)


@pytest.mark.parametrize(
    'kind, params',
    [
        ('linear', RAVLT_T_UNGATED_PARAMS),
        ('rala_no_gate_lepe', RAVLT_T_UNGATED_PARAMS),
        ('rala_no_alpha', 14_897_768),
        ('softmax', 14_897_768),
    ],
)
def test_ablation_kinds_layouts(kind, params):
    """Kinds with the gate and LePE have RALA's state dict (an authors' checkpoint loads strict=True); kinds
    without them have one `qkv` conv and no LePE, so no parameter goes unused."""
    model = timm.create_model('ravlt_t', attn_types=(kind, kind, 'softmax', 'softmax'))
    assert sum(p.numel() for p in model.parameters()) == params
    authors = {k: torch.zeros(shape, dtype=getattr(torch, dtype)) for k, shape, dtype in MANIFEST['RAVLT_T']}
    state = model.state_dict()
    if params == 14_897_768:
        assert [(k, list(v.shape)) for k, v in state.items()] == [(k, shape) for k, shape, _ in MANIFEST['RAVLT_T']]
        model.load_state_dict(authors, strict=True)
        return
    assert list(state['layers.1.blocks.0.attn.qkv.weight'].shape) == [3 * 128, 128, 1, 1]
    assert not [k for k in state if k.startswith(('layers.0.', 'layers.1.')) and ('.lepe.' in k or '.qkvo.' in k)]
    assert 'layers.2.blocks.0.attn.qkvo.weight' in state and 'layers.2.blocks.0.attn.lepe.weight' in state
    with pytest.raises(RuntimeError, match='Unexpected key.*layers.0.blocks.0.attn.qkvo.weight'):
        model.load_state_dict(authors, strict=True)


# ---------------------------------------------------------------- function (float64 golden outputs)


def test_hash_fill_matches_recipe_checksums(golden_model):
    state = golden_model.state_dict()
    assert set(GOLDEN['fill_checksums']) <= set(state)
    for key, sums in GOLDEN['fill_checksums'].items():
        value = state[key].double()
        assert value.sum().item() == pytest.approx(sums['sum'], rel=1e-12, abs=1e-12), key
        assert value.square().sum().item() == pytest.approx(sums['sq_sum'], rel=1e-12), key


def run_with_probes(model, x):
    probes, hooks = {}, []
    for name in ['patch_embed'] + [f'layers.{i}' for i in range(4)] + [f'layers.{i}.blocks.0.attn' for i in range(4)]:
        hooks.append(
            model.get_submodule(name).register_forward_hook(
                lambda m, i, o, name=name: probes.__setitem__(name, o.detach())
            )
        )
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return logits, probes


# The first case in every tier; the second (another batch and a non-square input) in the slow tier.
SLOW_CASES = [pytest.param(i, marks=pytest.mark.slow) for i in range(1, len(GOLDEN['cases']))]


@pytest.mark.parametrize('fused', [False, True], ids=['model', 'reparameterized'])
@pytest.mark.parametrize('case', [0] + SLOW_CASES)
def test_golden_logits_and_probes(golden_model, golden_fused, case, fused):
    case = GOLDEN['cases'][case]
    logits, probes = run_with_probes(golden_fused if fused else golden_model, hash_input(case['input_shape']))
    expected = torch.tensor(case['logits'], dtype=torch.float64)
    # Probes first: a mismatch names the first module that differs.
    for name, ref in case['probes'].items():
        out = probes[name]
        assert list(out.shape) == ref['shape'], name
        scale = ref['abs_sum']
        assert abs(out.sum().item() - ref['sum']) <= 1e-10 * scale, name
        assert out.abs().sum().item() == pytest.approx(ref['abs_sum'], rel=1e-10), name
        assert out.square().sum().item() == pytest.approx(ref['sq_sum'], rel=1e-10), name
    assert logits.shape == expected.shape
    assert rel_err(logits, expected) < 1e-9


def test_golden_detects_a_softmax_block_computed_as_rala(golden_model):
    """The trap: both block kinds have the same parameters, so a wrong kind loads strict=True. The
    fixture must catch it."""
    with torch.device('meta'):
        model = timm.create_model('ravlt_t', attn_types=('rala', 'rala', 'rala', 'softmax'))
    model.load_state_dict(golden_model.state_dict(), strict=True, assign=True)
    model.eval()
    case = GOLDEN['cases'][0]
    logits, probes = run_with_probes(model, hash_input(case['input_shape']))
    assert rel_err(logits, torch.tensor(case['logits'], dtype=torch.float64)) > 1e-3
    assert (
        abs(probes['layers.2.blocks.0.attn'].abs().sum().item() - case['probes']['layers.2.blocks.0.attn']['abs_sum'])
        > 1e-6 * case['probes']['layers.2.blocks.0.attn']['abs_sum']
    )


# ---------------------------------------------------------------- shapes, modes, gradients


@pytest.mark.parametrize('size', [(97, 131), (64, 33), (32, 32), (13, 200)])
def test_any_input_size(size):
    model = tiny().eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 7) and torch.isfinite(y).all()


def test_batch_elements_are_independent_in_eval():
    model = tiny().double().eval()
    x = torch.randn(3, 3, 45, 61, dtype=torch.float64)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    assert rel_err(together, alone) < 1e-12


def test_loaded_rope_angles_take_effect():
    """The RoPE tables come from the `angle` buffers of the weights loaded, not from those the model was built with."""
    model = tiny().double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        state = model.state_dict()
        state['layers.0.RoPE.angle'] = state['layers.0.RoPE.angle'] * 2
        model.load_state_dict(state)
        after = model(x)
        rebuilt = tiny().double().eval()
        rebuilt.load_state_dict(state)
        fresh = rebuilt(x)
    assert rel_err(after, before) > 1e-6
    assert rel_err(after, fresh) < 1e-13


def test_drop_path_rate_is_honoured_and_linear():
    model = timm.create_model('ravlt_t', drop_path_rate=0.3)
    rates = [float(getattr(b.drop_path, 'drop_prob', 0.0)) for s in model.layers for b in s.blocks]
    expected = torch.linspace(0, 0.3, 12).tolist()
    assert rates == pytest.approx(expected)
    default = timm.create_model('ravlt_s')
    assert float(default.layers[-1].blocks[-1].drop_path.drop_prob) == pytest.approx(0.15)


def test_layer_scale_init_per_variant():
    narrow = dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))  # fast to build
    for variant, expected in [('ravlt_t', [1] * 4), ('ravlt_b', [1, 1, 1e-6, 1e-6]), ('ravlt_l', [1e-6] * 4)]:
        model = timm.create_model(variant, **narrow)
        for stage, value in zip(model.layers, expected):
            for gamma in (stage.blocks[0].gamma_1, stage.blocks[0].gamma_2):
                assert torch.equal(gamma.detach(), torch.full_like(gamma, value)), variant


def test_training_drop_path_is_per_sample_on_each_branch():
    """In training, timm's DropPath drops a residual branch for whole samples: a block whose two branches are
    both dropped is the identity plus its position encoding for that sample."""
    stage = tiny(drop_path_rate=0.5).layers[3]
    block = stage.blocks[0].train()
    torch.manual_seed(0)
    x = torch.randn(64, 64, 3, 2)
    sin, cos = stage.RoPE(3, 2)
    with torch.no_grad():
        out = block(x, sin, cos)
        base = block.pos(x)  # x + its depthwise position encoding
    untouched = (out - base).flatten(1).abs().amax(1) == 0
    assert 0 < int(untouched.sum()) < 64  # about a quarter of the samples lose both branches


def test_grad_checkpointing_same_outputs_and_gradients():
    torch.manual_seed(0)
    model = tiny(drop_path_rate=0.2).train()
    x = torch.randn(2, 3, 48, 40)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(1)
        y = model(x)
        y.square().mean().backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (y0, g0), (y1, g1) = results
    assert torch.equal(y0, y1)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_all_linear_model_for_large_inputs():
    model = tiny(attn_types=('rala',) * 4).eval()
    assert all(isinstance(b.attn, RALA) for s in model.layers for b in s.blocks)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 80)).shape == (1, 7)
    with pytest.raises(
        ValueError,
        match=r"unknown attention type\(s\) \['window'\]; choose from \['linear', 'rala', "
        r"'rala_no_alpha', 'rala_no_gate_lepe', 'softmax'\]",
    ):
        tiny(attn_types=('rala', 'rala', 'window', 'softmax'))


# ---------------------------------------------------------------- memory

# The authors' RAVLT-S at 1024x1024, batch 1, eval: the peak of live tensor memory of one forward, measured
# with `peak_live_mib` below on their classfication/RALA.py (their softmax stages keep the N x N scores).
AUTHORS_RAVLT_S_PEAK_LIVE_MIB_1024 = 697


def peak_live_mib(fn) -> float:
    """The peak of live CPU tensor memory while fn() runs, from the profiler's allocation and free events
    (allocator level: independent of the C allocator's page reuse, unlike the process's peak RSS)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return peak / 2**20


@pytest.mark.slow
def test_inference_memory_at_1024_is_under_a_third_of_the_authors():
    model = reparameterize_model(timm.create_model('ravlt_s').eval())
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        peak = peak_live_mib(lambda: model(x))
    stage1_map_mib = 64 * 256 * 256 * 4 / 2**20  # one stage-1 activation (64 channels at 256x256)
    assert 4 * stage1_map_mib < peak < 0.3 * AUTHORS_RAVLT_S_PEAK_LIVE_MIB_1024


# ---------------------------------------------------------------- timm contract


def test_classifier_api_and_features():
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 96)
    assert model.num_features == 64 and model.get_classifier() is model.head
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 64, 2, 3)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
        torch.testing.assert_close(model.forward_head(feats), model(x))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)


def test_forward_intermediates_and_features_only():
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[1] for t in inter] == [16, 32, 48, 64]
        assert [tuple(t.shape[2:]) for t in inter] == [(25, 33), (13, 17), (7, 9), (4, 5)]
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(last_two) == 2
        for a, b in zip(last_two, inter[2:]):
            torch.testing.assert_close(a, b)
    assert [f['reduction'] for f in model.feature_info] == [4, 8, 16, 32]

    backbone = timm.create_model('ravlt_t', features_only=True, **TINY_KWARGS)
    backbone.model.load_state_dict(model.state_dict(), strict=False)
    backbone.eval()
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    assert backbone.feature_info.channels() == [16, 32, 48, 64]
    with torch.no_grad():
        features = backbone(x)
    assert len(features) == len(inter) == 4
    for a, b in zip(features, inter):
        torch.testing.assert_close(a, b)
    early = timm.create_model('ravlt_t', features_only=True, out_indices=(0, 1), **TINY_KWARGS)
    assert len(early.model.layers) == 2 and isinstance(early.model.layers[1].downsample, torch.nn.Identity)


def test_group_matcher_and_no_weight_decay():
    from timm.models import group_parameters

    model = tiny()
    groups = group_parameters(model, model.group_matcher(coarse=False))
    names = [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    first_group = groups[min(groups)]
    assert all(n.startswith('patch_embed') for n in first_group)
    order = {n: gid for gid, g in groups.items() for n in g}
    # A stage's downsampling joins the group of the stage's last block.
    assert (
        order['layers.0.blocks.0.pos.weight']
        == order['layers.0.downsample.reduction.weight']
        < order['layers.1.blocks.0.pos.weight']
    )
    assert model.no_weight_decay() == set()


def test_pretrained_cfgs_name_authors_hub_files():
    for variant in VARIANTS:
        cfg = timm.models.get_pretrained_cfg(f'{variant}.in1k').to_dict()
        assert cfg['hf_hub_id'] == 'aldjalkdf/RAVLT'
        assert cfg['hf_hub_filename'] == f'{variant.upper()}.pth'
        assert cfg['crop_pct'] == 0.875 and cfg['interpolation'] == 'bicubic'
        assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN and cfg['std'] == timm.data.IMAGENET_DEFAULT_STD


@pytest.fixture(scope='module')
def authors_checkpoint(tmp_path_factory):
    """A checkpoint in the authors' training layout (`args` an argparse.Namespace)."""
    torch.manual_seed(0)
    source = timm.create_model('ravlt_t')
    for p in source.parameters():
        p.data.normal_(0, 0.02)
    ema = {k: v + 1 if v.is_floating_point() and not k.endswith('angle') else v for k, v in source.state_dict().items()}
    path = tmp_path_factory.mktemp('ckpt') / 'RAVLT_T.pth'
    torch.save(
        {
            'model': source.state_dict(),
            'model_ema': ema,
            'optimizer': {},
            'lr_scheduler': {},
            'epoch': 299,
            'scaler': {},
            'args': argparse.Namespace(model='RAVLT_T', lr=5e-4),
            'max_accuracy': 82.8,
        },
        path,
    )
    return path, source.state_dict()


def test_timm_pretrained_loads_authors_checkpoint_offline(authors_checkpoint):
    path, model_weights = authors_checkpoint
    with torch.serialization.safe_globals([argparse.Namespace]):  # nothing else may need unpickling
        checkpoint = torch.load(path, weights_only=True)
    expected = checkpoint['model_ema']  # timm's file loader takes `model_ema` when present
    model = timm.create_model('ravlt_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    # Without an EMA entry, the `model` weights load; so does a raw state dict.
    for i, content in enumerate([{'model': model_weights, 'epoch': 1}, model_weights]):
        single = path.parent / f'single{i}.pth'
        torch.save(content, single)
        model = timm.create_model('ravlt_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(single)))
        assert all(torch.equal(v, model_weights[k]) for k, v in model.state_dict().items())
    # Another class count keeps the backbone and drops the classifier; another in_chans adapts the stem.
    model = timm.create_model(
        'ravlt_t', pretrained=True, num_classes=10, in_chans=1, pretrained_cfg_overlay=dict(file=str(single))
    )
    assert model.head.weight.shape == (10, 1024, 1, 1)
    assert torch.equal(model.layers[2].blocks[0].attn.qkvo.weight, model_weights['layers.2.blocks.0.attn.qkvo.weight'])
    assert model.patch_embed.proj[0].weight.shape[1] == 1


def test_a_missing_pretrained_file_is_named(tmp_path):
    """timm's own loader raises a bare FileNotFoundError; the message names the file and where to get it."""
    missing = tmp_path / 'RAVLT_S.pth'
    with pytest.raises(FileNotFoundError) as error:
        timm.create_model('ravlt_s', pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))
    assert error.value.filename == str(missing)
    assert f'pretrained weights file {missing} not found' in str(error.value)
    assert 'RAVLT_S.pth from Hugging Face aldjalkdf/RAVLT' in str(error.value)


@pytest.mark.parametrize('wrap', ['raw', 'state_dict', 'module_prefix', 'ema_only'])
def test_checkpoint_filter_fn_layouts(wrap):
    model = tiny()
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    checkpoint = {
        'raw': state,
        'state_dict': {'state_dict': state, 'epoch': 3},
        'module_prefix': {'model': {f'module.{k}': v for k, v in state.items()}},
        'ema_only': {'model_ema': state},
    }[wrap]
    filtered = models.checkpoint_filter_fn(checkpoint, model)
    if wrap == 'module_prefix':  # `model` wins over `model_ema` when both are present
        both = dict(checkpoint, model_ema={k: v + 1 for k, v in state.items()})
        assert all(torch.equal(models.checkpoint_filter_fn(both, model)[k], v) for k, v in filtered.items())
    model.load_state_dict(filtered, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_fill_value_rules():
    assert fill_value('x.num_batches_tracked', ()).item() == 0
    assert fill_value('layers.0.RoPE.angle', (4,)) is None
    assert (fill_value('a.running_var', (100,)) >= 1).all()
    gamma = fill_value('layers.0.blocks.0.gamma_1', (1, 8, 1, 1))
    assert ((gamma - 0.5).abs() <= 0.1 * 3**0.5 + 1e-12).all()
