"""The timm model contract, for all four variants: creation and reset of the classifier and global pooling,
TorchScript, FX symbolic tracing (torchvision's feature extraction and timm's `feature_cls='fx'`), gradients,
and inference re-parameterization (`timm.utils.reparameterize_model`) computing the same function.

The variants are built with one block per stage (their widths, heads and layer scales): every module kind
and shape rule is exercised at a fraction of the cost; one full-size RAVLT-T goes through TorchScript and FX.
"""

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import get_notrace_functions, get_notrace_modules
from timm.utils import reparameterize_model
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import models  # noqa: F401  (registers the RAVLT models)
from helpers import VARIANTS, rel_err, tiny
from models.ravlt import ResidualDepthwiseConv

POOLS = {  # what each of timm's pool types makes of a (B, C, H, W) map
    'avg': lambda f: f.mean((2, 3)),
    'max': lambda f: f.amax((2, 3)),
    'avgmax': lambda f: 0.5 * (f.mean((2, 3)) + f.amax((2, 3))),
    'catavgmax': lambda f: torch.cat([f.mean((2, 3)), f.amax((2, 3))], dim=1),
}
# RAVLT-T in every tier; the other variants (the same modules, wider: 13 s more on one core) in the slow tier.
VARIANT_PARAMS = [pytest.param(v, marks=[] if v == 'ravlt_t' else pytest.mark.slow) for v in VARIANTS]
# torchvision notes that a model traced in train mode has more nodes (drop path) than in eval mode.
pytestmark = pytest.mark.filterwarnings('ignore:NOTE. The nodes obtained by tracing')
TIMM_TRACER = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())


def one_block_per_stage(variant, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(variant, depths=(1, 1, 1, 1), **kwargs)


def with_random_statistics_(model):
    """Non-trivial weights and BatchNorm statistics, so that folding them is tested."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not name.endswith('angle'):
                noise = torch.rand(t.shape, generator=gen, dtype=t.dtype)
                t.copy_(0.5 + noise if name.endswith('running_var') else t + 0.2 * (noise - 0.5))
    return model


# ---------------------------------------------------------------- classifier, pooling, default cfg


@pytest.mark.parametrize('variant', VARIANT_PARAMS)
def test_default_cfg_features_pre_logits_and_reset(variant):
    model = one_block_per_stage(variant).eval()
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert cfg['classifier'] + '.weight' in state and cfg['first_conv'] + '.weight' in state
    x = torch.randn(1, *cfg['input_size'])
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (1, model.num_features, *cfg['pool_size'])
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (1, model.head_hidden_size) == (1, model.num_features)
        assert model(x).shape == (1, 1000)
        model.reset_classifier(0)  # pooled features
        assert model.num_classes == 0 and torch.equal(model(x), pre_logits)
        model.reset_classifier(0, '')  # the map itself
        assert torch.equal(model(x), features)
        created = one_block_per_stage(variant, num_classes=0, global_pool='').eval()
        created.load_state_dict({k: v for k, v in state.items() if not k.startswith('head.')})
        assert torch.equal(created(x), features)


@pytest.mark.parametrize('pool', POOLS)
def test_global_pool_options_at_creation_and_at_reset(pool):
    x = torch.randn(2, 3, 64, 96)
    expected_mult = 2 if pool == 'catavgmax' else 1
    created = tiny(global_pool=pool).eval()
    reset = tiny().eval()
    reset.reset_classifier(5, global_pool=pool)
    for model, classes in [(created, 7), (reset, 5)]:
        assert model.head_hidden_size == expected_mult * model.num_features
        assert model.head.in_channels == model.head_hidden_size and model.head.out_channels == classes
        with torch.no_grad():
            features = model.forward_features(x)
            pre_logits = model.forward_head(features, pre_logits=True)
            torch.testing.assert_close(pre_logits, POOLS[pool](features), rtol=1e-6, atol=1e-6)
            expected = F.linear(pre_logits, model.head.weight.flatten(1), model.head.bias)
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    # Back to the authors' average pooling keeps the class count.
    reset.reset_classifier(3, global_pool='avg')
    assert reset.head_hidden_size == reset.num_features and reset(x).shape == (2, 3)


def test_no_pooling_applies_the_classifier_at_every_position():
    model = tiny(global_pool='').eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
        assert logits.shape == (2, 7, 2, 3)
        torch.testing.assert_close(logits, model.head(features))
        assert torch.equal(model.forward_head(features, pre_logits=True), features)
    model.reset_classifier(4, 'avg')
    assert model(x).shape == (2, 4)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize('variant', VARIANT_PARAMS)
def test_backward_reaches_every_parameter(variant):
    model = one_block_per_stage(variant, num_classes=42, drop_path_rate=0.2).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 42)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['linear', 'rala_no_alpha', 'rala_no_gate_lepe'])
def test_ablation_kinds_train_script_trace_and_reparameterize(kind):
    """The attention kinds of the ablation keep the contract: every parameter gets a gradient (so
    DistributedDataParallel needs no unused-parameter search), TorchScript, FX and inference folding."""
    model = tiny(attn_types=(kind, kind, 'softmax', 'softmax'), drop_path_rate=0.2).train()
    model(torch.randn(2, 3, 64, 64)).mean().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    model = with_random_statistics_(model).eval()
    x = torch.randn(1, 3, 64, 96)
    assert_scripts_and_traces(model, x)
    with torch.no_grad():
        torch.testing.assert_close(reparameterize_model(model)(x), model(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- TorchScript and FX


@pytest.mark.parametrize('variant', VARIANT_PARAMS)
def test_torchscript_equals_eager(variant):
    with timm.set_scriptable(True):
        model = one_block_per_stage(variant).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)


def last_node_extractor(model, train: bool = False, **tracer_kwargs):
    """An FX GraphModule of the whole model (its output node), as timm's FX tests build it."""
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs
    )


@pytest.mark.parametrize('variant', VARIANT_PARAMS)
# timm's tracer wraps torchvision's: torchvision's alone in the slow tier.
@pytest.mark.parametrize('tracer', [pytest.param('torchvision', marks=pytest.mark.slow), 'timm'])
def test_fx_trace_equals_eager_and_scripts(variant, tracer):
    """Symbolic tracing needs no leaf modules or wrapped functions (torchvision's defaults); with timm's
    (its FX tests and `feature_cls='fx'`) the graph is the same. The graph scripts with TorchScript."""
    tracer_kwargs = TIMM_TRACER if tracer == 'timm' else {}
    model = one_block_per_stage(variant).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        expected = model(x)
        graph = last_node_extractor(model, **tracer_kwargs)
        (out,) = graph(x).values()
        assert torch.equal(out, expected)
        (scripted,) = torch.jit.script(graph)(x).values()
    torch.testing.assert_close(scripted, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('variant', VARIANT_PARAMS)
def test_fx_graph_trains(variant):
    model = one_block_per_stage(variant, num_classes=42).train()
    graph = last_node_extractor(model, train=True, **TIMM_TRACER)
    (out,) = graph(torch.randn(2, 3, 64, 64)).values()
    assert out.shape == (2, 42)
    out.mean().backward()
    assert all(p.grad is not None for p in graph.parameters())
    assert sum(p.numel() for p in graph.parameters()) == sum(p.numel() for p in model.parameters())


def assert_scripts_and_traces(model, x):
    """FX (the last node's output) equals eager exactly; TorchScript to float32 rounding."""
    with torch.inference_mode():
        expected = model(x)
        (traced,) = last_node_extractor(model)(x).values()
        assert torch.equal(traced, expected)
        torch.testing.assert_close(torch.jit.script(model)(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_full_size_model_scripts_and_traces():
    torch.manual_seed(0)
    assert_scripts_and_traces(timm.create_model('ravlt_t').eval(), torch.randn(1, 3, 128, 128))


def test_stage_outputs_by_fx_feature_extraction():
    """feature_info names the module whose output is each stage's feature map (before its downsampling):
    torchvision's create_feature_extractor and timm's features_only=True, feature_cls='fx' return the
    four maps forward_intermediates returns."""
    model = tiny().eval()
    x = torch.randn(2, 3, 97, 131)
    nodes = {info['module']: f'stage{i}' for i, info in enumerate(model.feature_info)}
    extractor = create_feature_extractor(model, return_nodes=nodes)
    fx_backbone = tiny(features_only=True, feature_cls='fx').eval()  # the same seed: the same weights
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        extracted = list(extractor(x).values())
        from_timm = fx_backbone(x)
    assert [tuple(t.shape) for t in expected] == [(2, 16, 25, 33), (2, 32, 13, 17), (2, 48, 7, 9), (2, 64, 4, 5)]
    assert [info['num_chs'] for info in model.feature_info] == [t.shape[1] for t in expected]
    assert len(extracted) == len(from_timm) == 4
    for a, b, c in zip(expected, extracted, from_timm):
        assert torch.equal(a, b) and torch.equal(a, c)


# ---------------------------------------------------------------- inference re-parameterization


@pytest.mark.parametrize('variant', VARIANT_PARAMS)
def test_reparameterized_model_computes_the_same_function(variant):
    model = with_random_statistics_(one_block_per_stage(variant).double()).eval()
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        expected_stages = model.forward_intermediates(x, intermediates_only=True)
        fused = reparameterize_model(model)  # a copy: the model itself is left as it is
        assert rel_err(fused(x), expected) < 1e-12
        for a, b in zip(fused.forward_intermediates(x, intermediates_only=True), expected_stages):
            assert rel_err(a, b) < 1e-12
        assert torch.equal(model(x), expected)
    # Left: the neck's BatchNorm (on the 7x7 map; timm's reparameterize_model does not fuse at the root).
    assert [n for n, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)] == ['norm']
    assert not any(isinstance(m, ResidualDepthwiseConv) for m in fused.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 8  # stem 4, downsampling 3, neck 1
    assert sum(isinstance(m, ResidualDepthwiseConv) for m in model.modules()) == 8  # position encoding and FFN
    # Idempotent: a second pass (e.g. from a parent model's reparameterize_model) changes nothing.
    again = reparameterize_model(fused)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), fused.state_dict().values()))


def test_reparameterized_model_scripts_and_traces():
    assert_scripts_and_traces(reparameterize_model(with_random_statistics_(tiny()).eval()), torch.randn(1, 3, 64, 96))


def test_reparameterize_needs_eval_mode():
    """BatchNorm folding uses the running statistics, which a training-mode model does not compute with."""
    with pytest.raises(AssertionError, match='eval'):
        reparameterize_model(tiny().train())


def test_reparameterize_within_a_parent_model():
    """timm's reparameterize_model walks any module tree: a RAVLT inside another module is fused too."""
    parent = nn.Sequential(with_random_statistics_(tiny().double()), nn.Identity()).eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = parent(x)
        fused = reparameterize_model(parent)
        assert rel_err(fused(x), expected) < 1e-12
    assert not any(isinstance(m, ResidualDepthwiseConv) for m in fused.modules())


def test_a_multi_gpu_models_sync_batchnorms_fold_too():
    """A run with several GPUs converts the BatchNorms to SyncBatchNorm; its evaluations fold them all the same."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(with_random_statistics_(tiny().double())).eval()
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == 8
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        fused = reparameterize_model(model)
        assert rel_err(fused(x), expected) < 1e-12
    assert [n for n, m in fused.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == ['norm']


def test_every_fold_is_timms_in_place_reparameterize():
    """One convention: the modules that fold define `reparameterize()` (in place), none `fuse()`."""
    model = tiny()
    folding = {type(m).__name__ for m in model.modules() if hasattr(m, 'reparameterize')}
    assert folding == {'PatchEmbed', 'RAVLTBlock', 'ConvFeedForward', 'Downsample'}
    assert not any(hasattr(m, 'fuse') or hasattr(m, 'switch_to_deploy') for m in model.modules())
