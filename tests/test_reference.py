"""The model's attention (every kind of `attn_types`), RoPE and block code equals the literal reference
(models/reference.py), forward and backward, also after inference re-parameterization; the ablation kinds
differ from one another and relate to RALA as the paper defines them; the model compiles with
torch.compile(fullgraph=True), exports with torch.export, runs under bf16 autocast (and under CUDA's autocast
policy, simulated, with the authors' low-precision tensors) and takes channels-last input and weights."""

import pytest
import timm
import torch
from timm.utils import reparameterize_model

import models  # noqa: F401  (registers the RAVLT models)
from cuda_autocast import CudaAutocast
from helpers import rel_err
from models import ravlt, reference
from models.ravlt import ATTENTION_TYPES, RALA, RAVLTBlock, RotaryEmbedding2d, apply_rope


def randomize_(module, seed=0):
    """Non-trivial float64 weights everywhere (layer scales and norm affines included)."""
    gen = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(
                torch.randn(p.shape, generator=gen, dtype=p.dtype) * (0.3 if p.dim() > 1 else 0.5)
                + (1.0 if name.endswith('norm.weight') else 0.0)
            )
    return module


def make_block(kind, heads, head_dim, seed=0):
    block = randomize_(RAVLTBlock(heads * head_dim, heads, attn_type=kind, mlp_ratio=2.5), seed)
    rope = RotaryEmbedding2d(head_dim).double()
    return block, rope


CASES = [  # kind, heads, head_dim, (H, W), batch
    ('rala', 1, 8, (7, 5), 2),
    ('rala', 2, 4, (13, 9), 1),
    ('rala', 3, 8, (4, 11), 2),
    ('softmax', 1, 8, (7, 5), 2),
    ('softmax', 2, 12, (13, 9), 1),
    ('softmax', 5, 4, (3, 6), 3),
    ('linear', 1, 8, (7, 5), 2),
    ('linear', 3, 8, (4, 11), 2),
    ('rala_no_alpha', 1, 8, (7, 5), 2),
    ('rala_no_alpha', 2, 4, (13, 9), 1),
    ('rala_no_gate_lepe', 1, 8, (7, 5), 2),
    ('rala_no_gate_lepe', 3, 8, (4, 11), 2),
]


@pytest.mark.parametrize('kind, heads, head_dim, size, batch', CASES)
def test_attention_and_block_equal_reference_forward_and_backward(kind, heads, head_dim, size, batch):
    block, rope = make_block(kind, heads, head_dim)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, heads * head_dim, *size, generator=gen, dtype=torch.float64)
    sin, cos = rope(*size)
    angle = rope.angle
    for fast, slow, module in [
        (lambda t: block.attn(t, sin, cos), lambda t: reference.attention(block.attn, t, angle), block.attn),
        (lambda t: block(t, sin, cos), lambda t: reference.block(block, t, angle), block),
    ]:
        outs, grads = [], []
        for fn in (fast, slow):
            module.zero_grad()
            xi = x.clone().requires_grad_()
            y = fn(xi)
            (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
            outs.append(y.detach())
            grads.append([xi.grad] + [p.grad.clone() for p in module.parameters()])
        assert rel_err(outs[0], outs[1]) < 1e-12
        for g_fast, g_ref in zip(*grads):
            assert rel_err(g_fast, g_ref) < 1e-11
    with torch.no_grad():  # the FFN's skip connection folded into its depthwise kernel
        fused = reparameterize_model(block.eval())
        assert rel_err(fused(x, sin, cos), reference.block(block, x, angle)) < 1e-12


def test_cases_cover_every_attention_kind():
    assert {case[0] for case in CASES} == set(ATTENTION_TYPES)


def test_ablation_kinds_compute_different_functions():
    """Each rank augmentation changes the output: no two kinds agree on the same weights and input."""
    block, rope = make_block('rala', 2, 8)
    x = torch.randn(2, 16, 7, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        outputs = {
            kind: reference.attention_terms(block.attn, x, rope.angle, kind)['output']
            for kind in reference.computable_kinds(block.attn)
        }
    assert sorted(outputs) == sorted(reference.LINEAR_KINDS)
    kinds = sorted(outputs)
    for i, a in enumerate(kinds):
        for b in kinds[i + 1 :]:
            assert rel_err(outputs[a], outputs[b]) > 1e-2, (a, b)


def test_rala_with_uniform_key_weights_is_plain_linear_attention():
    """alpha = softmax(scale * mean(q') . k') is uniform at scale 0: RALA then is plain linear attention, in
    the reference (output and KV buffer) and in the model's module."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 35, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    rope = RotaryEmbedding2d(8).double()
    sin, cos = reference.rope_tables(rope.angle, 7, 5)
    for got, expected in zip(
        reference.rala(q, k, v, sin, cos, scale=0.0), reference.linear_attention(q, k, v, sin, cos)
    ):
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15)
    assert (
        rel_err(reference.rala(q, k, v, sin, cos, scale=8**-0.5)[1], reference.linear_attention(q, k, v, sin, cos)[1])
        > 1e-2
    )
    rala = randomize_(RALA(24, 3))
    rala.scale = 0.0
    linear = RALA(24, 3, alpha=False).double()
    linear.load_state_dict(rala.state_dict())
    x = torch.randn(2, 24, 7, 5, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(rala(x, *rope(7, 5)), linear(x, *rope(7, 5)), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize('kind', ['linear', 'rala_no_gate_lepe'])
def test_gated_weights_computed_without_gate_equal_the_ungated_module(kind):
    """A block with RALA's parameters computed as an ungated kind (what the rank analysis reports as
    `computed_as`) is that kind's module holding the q, k, v slices of `qkvo` and the same `proj`."""
    block, rope = make_block('rala', 2, 8)
    ungated = ATTENTION_TYPES[kind](16, 2).double()
    with torch.no_grad():
        ungated.qkv.weight.copy_(block.attn.qkvo.weight[:48])
        ungated.qkv.bias.copy_(block.attn.qkvo.bias[:48])
        ungated.proj.load_state_dict(block.attn.proj.state_dict())
        x = torch.randn(2, 16, 7, 5, dtype=torch.float64)
        out = reference.attention_terms(block.attn, x, rope.angle, kind)['output']
        expected = block.attn.proj(out.transpose(-1, -2).reshape(2, 16, 7, 5))
        assert rel_err(ungated(x, *rope(7, 5)), expected) < 1e-12
    with pytest.raises(ValueError, match="cannot be computed as 'rala'"):
        reference.attention_terms(ungated, x, rope.angle, 'rala')
    assert reference.computable_kinds(ungated) == [kind] + [k for k in ('linear', 'rala_no_gate_lepe') if k != kind]


@pytest.mark.parametrize('grad', [False, True], ids=['no_grad', 'grad'])
def test_block_and_attention_leave_their_channels_last_input_unchanged(grad):
    block, rope = make_block('rala', 2, 8)
    x = torch.randn(2, 16, 9, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    kept = x.clone()
    with torch.set_grad_enabled(grad):
        block(x, *rope(9, 7))
        block.attn(x, *rope(9, 7))
    assert torch.equal(x, kept)


def test_rala_under_cudas_autocast_keeps_the_authors_low_precision_tensors():
    """CUDA's autocast runs `exp`, `softmax` and `sum` in float32 (the CPU's has other lists, so the CPU bf16 tests
    cannot see it). Under a simulation of CUDA's policy (tests/cuda_autocast.py): q' and k' and the scores stay
    float16 where the authors' code has them so; every product's operands are at most as wide as the authors'
    (RoPE in float32 as theirs, then cast: q'k'v's first operand is float16 here, float32 there)."""
    attn = ravlt.RALA(32, 2).to(memory_format=torch.channels_last)
    rope = RotaryEmbedding2d(16)
    x = torch.randn(2, 32, 12, 10).contiguous(memory_format=torch.channels_last).requires_grad_()
    sin, cos = rope(12, 10)

    def products(fn):
        with CudaAutocast(torch.float16) as policy:
            out = fn()
        return [dtypes for name, dtypes in policy.products if name in ('einsum', 'matmul', '__matmul__')], out

    half, single = torch.float16, torch.float32
    ours, out = products(lambda: attn(x, sin, cos))
    theirs, _ = products(lambda: reference.attention(attn, x, rope.angle))
    # scores (k', mean q'), kv (RoPE(alpha k'), v), normaliser (q', sum alpha k'), output (RoPE(q'), kv)
    assert ours == [(half, half), (single, half), (half, single), (half, half)]
    # the reference: scores, normaliser, kv, output
    assert theirs == [(half, half), (half, single), (single, half), (single, half)]
    assert out.dtype == half


def test_rope_tables_follow_the_buffer():
    """The tables are the reference's, one column per channel pair, in the angle buffer's dtype and device."""
    rope = RotaryEmbedding2d(16)
    sin, cos = rope(7, 5)
    assert sin.shape == cos.shape == (35, 8) and rope(5, 7)[0].shape == (35, 8)
    ref_sin, ref_cos = reference.rope_tables(rope.angle, 7, 5)
    torch.testing.assert_close(sin, ref_sin[:, 0::2], rtol=0, atol=0)
    torch.testing.assert_close(cos, ref_cos[:, 1::2], rtol=0, atol=0)
    assert rope.double()(7, 5)[0].dtype == torch.float64


def test_rope_equals_reference_in_the_tables_precision():
    """RoPE as one complex multiply equals the reference's real form; float16 input is turned in float32
    (the tables' dtype, as under autocast) and returned as float16."""
    rope = RotaryEmbedding2d(8)
    sin, cos = rope(3, 4)
    x = torch.randn(2, 12, 3, 8)  # (B, N, heads, head_dim)
    expected = reference.rope(x.double(), *(t.double().repeat_interleave(2, -1)[:, None] for t in (sin, cos)))
    torch.testing.assert_close(apply_rope(x, sin, cos).double(), expected, rtol=1e-6, atol=1e-6)
    strided = torch.randn(2, 12, 3, 16)[..., 4:12]  # a channel slice: rows strided, pairs adjacent
    torch.testing.assert_close(apply_rope(strided, sin, cos), apply_rope(strided.contiguous(), sin, cos))
    half = apply_rope(x.half(), sin, cos)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), apply_rope(x.half().float(), sin, cos), rtol=1e-3, atol=1e-3)


def small_model(**kwargs):
    torch.manual_seed(0)
    return timm.create_model(
        'ravlt_t',
        embed_dims=(16, 32, 48, 64),
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 3, 4),
        projection_dim=64,
        num_classes=10,
        **kwargs,
    )


@pytest.mark.slow
def test_torch_compile_fullgraph_whole_model_matches_eager():
    """Dynamo captures the whole network, forward and backward, as one graph (any graph break raises).
    aot_eager keeps this fast; Inductor's code generation is tested on blocks below and the whole network
    compiles in `scripts/benchmark.py --backend compile`."""
    model = small_model().eval()
    x = torch.randn(2, 3, 56, 40)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(model, fullgraph=True, backend='aot_eager')(x), model(x), rtol=1e-5, atol=1e-6
        )
    model.train()
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        torch.manual_seed(3)  # the same drop path draws
        fn(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['rala', 'softmax'])
def test_inductor_compiled_block_matches_eager(kind):
    torch.manual_seed(0)
    block, rope = RAVLTBlock(16, 2, attn_type=kind).eval(), RotaryEmbedding2d(8)
    x = torch.randn(2, 16, 9, 7)
    sin, cos = rope(9, 7)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(block, fullgraph=True)(x, sin, cos), block(x, sin, cos), rtol=1e-4, atol=1e-5
        )


@pytest.mark.slow
def test_torch_export_ravlt_t_matches_eager():
    torch.manual_seed(0)
    model = timm.create_model('ravlt_t').eval()
    x = torch.randn(1, 3, 96, 64)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-4, atol=1e-5)
    other = torch.randn(1, 3, 96, 64)  # the exported program is not tied to its example input
    torch.testing.assert_close(program.module()(other), model(other), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_runs_and_is_close_to_fp32():
    model = small_model().eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert rel_err(low.float(), expected) < 0.05
    model.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        model(x).float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_channels_last_input_and_weights_give_the_same_output_and_gradients():
    model = small_model()
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        nchw = model.eval()(x)
        channels_last = model(x.contiguous(memory_format=torch.channels_last))
        weights_channels_last = model.to(memory_format=torch.channels_last)(x)
    torch.testing.assert_close(channels_last, nchw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights_channels_last, nchw, rtol=1e-5, atol=1e-6)
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=fmt).train().zero_grad()
        torch.manual_seed(3)
        model(x).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[1].items():
        torch.testing.assert_close(grad, grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
        # A channels-last weight gets a channels-last gradient (what DistributedDataParallel's buckets expect).
        param = model.get_parameter(name)
        if param.dim() == 4:  # every conv weight is channels-last here
            assert param.is_contiguous(memory_format=torch.channels_last), name
            assert grad.is_contiguous(memory_format=torch.channels_last), name
