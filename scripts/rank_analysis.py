#!/usr/bin/env python
"""Rank of RALA's KV buffer and output features, next to plain linear attention and softmax attention.

For every attention block of a RAVLT model, per head and per image, this computes the singular values of
  - RALA blocks: the KV buffer RoPE(alpha * k) v^T (d x d) and the output features (out + lepe) * o (N x d),
    and the same block as plain linear attention (no alpha re-weighting, no LePE, no gate);
  - softmax blocks: the attention matrix (N x N) and the output features (out + lepe) * o (N x d).
The rank counts singular values above `--rtol` times the largest. Everything runs in float64 from the
block inputs captured with forward pre-hooks, so the model code stays untouched. Writes rank.json and
rank.png (ranks per block, spectra of one block) to --output_dir.

    python scripts/rank_analysis.py --model RAVLT_T [--checkpoint PATH] [--images DIR] --output_dir D
"""
import argparse
import json
import os
import sys
from pathlib import Path

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import UnidentifiedImageError  # noqa: E402

from checkpoints import flags_of, load_checkpoint, load_weights, state_dict_of  # noqa: E402
from cli import COUNT, POSITIVE, ArgumentParser, json_object, run_cli  # noqa: E402
from errors import UsageError  # noqa: E402
from datasets import build_dataset, build_transform, load_rgb_image  # noqa: E402
from models.ravlt import RankAugmentedLinearAttention, SoftmaxAttention, apply_rope  # noqa: E402
from model_factory import create_model  # noqa: E402
from utils import atomic_file, check_output_file  # noqa: E402

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
DENOM_EPS = 1e-6  # the linear-attention denominator's epsilon, as in RankAugmentedLinearAttention


def get_args_parser():
    parser = ArgumentParser('rank_analysis.py', description='RAVLT rank analysis', with_config=False)
    parser.add_argument('--model', default=None,
                        help="RAVLT_T/S/B/L or a RAVLT timm name (default: the checkpoint's, else RAVLT_T)")
    parser.add_argument('--model-kwargs', default=None, type=json_object, metavar='JSON',
                        help="model keyword arguments as in main.py (default: the checkpoint's)")
    parser.add_argument('--checkpoint', default='', help='checkpoint or state dict; random init if not given')
    parser.add_argument('--images', default='', help='folder of .jpg/.png images; DIGITS val images if not given')
    parser.add_argument('--num-images', default=4, type=COUNT, help='images to analyse')
    parser.add_argument('--input-size', default=None, type=COUNT,
                        help="image size (default: the checkpoint's training size, else the model's, 224)")
    parser.add_argument('--rtol', default=1e-3, type=POSITIVE,
                        help='rank = number of singular values above rtol * the largest')
    parser.add_argument('--spectra-block', default='',
                        help='block whose spectra are plotted, e.g. layers.0.blocks.1 (default: the first RALA block)')
    parser.add_argument('--seed', default=0, type=int, help='seed of the random init')
    parser.add_argument('--output_dir', '--output-dir', required=True, help='where rank.json and rank.png go')
    return parser


# ---- the attention paths, in the model's (B, heads, head_dim, N) layout ----

def block_tensors(attn, x):
    """q, k, v, the gate o and LePE(v) of one attention module for its input x (B, C, H, W), each (B, h, d, N)."""
    B, C, H, W = x.shape
    q, k, v, o = attn.qkvo(x).chunk(4, dim=1)
    lepe = attn.lepe(v)
    return tuple(t.reshape(B, attn.num_heads, attn.head_dim, H * W) for t in (q, k, v, o, lepe))


def rope(x, sin, cos):
    """The model's RoPE on a channel-major (B, h, d, N) tensor (the model's tables are token-major)."""
    return apply_rope(x.transpose(-1, -2).contiguous(), sin, cos).transpose(-1, -2)


def rala_path(q, k, v, o, lepe, sin, cos, scale, alpha=None, gated=True):
    """RALA keeping its KV buffer: returns kv (B, h, d_k, d_v) and the output features (B, h, d, N),
    (out + lepe) * o. `alpha` (B, h, 1, N) replaces the computed key weights; gated=False drops LePE and o."""
    q = F.elu(q) + 1.0
    k = F.elu(k) + 1.0
    if alpha is None:
        alpha = torch.softmax(scale * (q.mean(dim=-1, keepdim=True).transpose(-1, -2) @ k), dim=-1)
    k = k * alpha
    kv = rope(k, sin, cos) @ v.transpose(-1, -2)
    denom = k.sum(dim=-1, keepdim=True).transpose(-1, -2) @ q + DENOM_EPS
    out = (kv.transpose(-1, -2) @ rope(q, sin, cos)) / denom
    return kv, (out + lepe) * o if gated else out


def plain_linear_attention(q, k, v, sin, cos):
    """Linear attention with RALA's feature map (ELU + 1) and RoPE but no key re-weighting, LePE or gate:
    kv = mean_n RoPE(k_n) v_n^T, out_n = kv^T RoPE(q_n) / (q_n . mean_n k_n). Returns kv and out (B, h, d, N)."""
    q = F.elu(q) + 1.0
    k = F.elu(k) + 1.0
    kv = torch.einsum('bhdn,bhen->bhde', rope(k, sin, cos), v) / k.shape[-1]
    denom = torch.einsum('bhdn,bhd->bhn', q, k.mean(dim=-1)) + DENOM_EPS
    out = torch.einsum('bhde,bhdn->bhen', kv, rope(q, sin, cos)) / denom[:, :, None, :]
    return kv, out


def softmax_path(q, k, v, o, lepe, sin, cos, scale):
    """Softmax attention with RoPE: returns the attention matrix (B, h, N, N) and the output features
    (B, h, d, N), (out + lepe) * o."""
    q, k = rope(q, sin, cos), rope(k, sin, cos)
    attn = torch.softmax(scale * (q.transpose(-1, -2) @ k), dim=-1)
    out = v @ attn.transpose(-1, -2)
    return attn, (out + lepe) * o


# ---- ranks and spectra ----

def numerical_rank(singular_values, rtol):
    """Number of singular values (descending, last dim) above rtol times the largest."""
    return (singular_values > rtol * singular_values[..., :1]).sum(dim=-1)


def summarise(matrices, rtol):
    """Ranks [image][head] and normalised spectra sigma_i / sigma_1 [head][i] (mean over images) of (B, h, M, N)."""
    s = torch.linalg.svdvals(matrices)
    spectrum = s / s[..., :1].clamp_min(torch.finfo(s.dtype).tiny)
    rank = numerical_rank(s, rtol)
    return {'shape': list(matrices.shape[-2:]), 'rank': rank.tolist(), 'mean_rank': rank.double().mean().item(),
            'spectrum': spectrum.mean(dim=0).tolist()}


def attention_modules(model):
    return [(name[:-len('.attn')], m) for name, m in model.named_modules()
            if isinstance(m, (RankAugmentedLinearAttention, SoftmaxAttention))]


@torch.no_grad()
def analyse(model, images, rtol):
    """One entry per attention block of `model` (run in its own dtype on `images`)."""
    blocks = attention_modules(model)
    inputs = {}
    hooks = [attn.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args))
             for name, attn in blocks]
    try:
        model.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    report = []
    for name, attn in blocks:
        x, sin, cos = inputs[name]
        q, k, v, o, lepe = block_tensors(attn, x)
        entry = {'block': name, 'tokens': q.shape[-1], 'heads': attn.num_heads, 'head_dim': attn.head_dim}
        if isinstance(attn, RankAugmentedLinearAttention):
            entry['attention'] = 'rala'
            kv, out = rala_path(q, k, v, o, lepe, sin, cos, attn.scale)
            _, ungated = rala_path(q, k, v, o, lepe, sin, cos, attn.scale, gated=False)
            plain_kv, plain_out = plain_linear_attention(q, k, v, sin, cos)
            entry['rala'] = {'kv_buffer': summarise(kv, rtol), 'output': summarise(out.transpose(-1, -2), rtol),
                             'output_ungated': summarise(ungated.transpose(-1, -2), rtol)}
            entry['plain_linear'] = {'kv_buffer': summarise(plain_kv, rtol),
                                     'output': summarise(plain_out.transpose(-1, -2), rtol)}
        else:
            entry['attention'] = 'softmax'
            attn_matrix, out = softmax_path(q, k, v, o, lepe, sin, cos, attn.scale)
            entry['softmax'] = {'attention_matrix': summarise(attn_matrix, rtol),
                                'output': summarise(out.transpose(-1, -2), rtol)}
        report.append(entry)
    return report


# ---- weights and images ----

def training_flag(checkpoint, flag, source='', parser=None):
    """A flag's value from a checkpoint's `args` (main.py stores {flag name: value}, the authors' script an
    argparse.Namespace), checked as `parser` checks that flag on the command line."""
    dest = flag.replace('-', '_')
    return flags_of(checkpoint, source, parser, check=[dest] if parser is not None else ()).get(dest)


def load_model(args, parser):
    """(model, checkpoint or {}): built as main.py builds it, with the checkpoint's model settings where
    the command line gives none."""
    checkpoint = load_checkpoint(args.checkpoint) if args.checkpoint else {}
    name = args.model or training_flag(checkpoint, 'model', args.checkpoint, parser) or 'RAVLT_T'
    kwargs = args.model_kwargs if args.model_kwargs is not None else \
        training_flag(checkpoint, 'model-kwargs', args.checkpoint, parser)
    state_dict = state_dict_of(checkpoint, source=args.checkpoint) if checkpoint else {}
    num_classes = state_dict['head.weight'].shape[0] if 'head.weight' in state_dict else 1000
    torch.manual_seed(args.seed)
    model = create_model(name, kwargs, num_classes=num_classes)
    if not attention_modules(model):
        raise UsageError(f'{name} has no RALA or softmax attention blocks; use a RAVLT model (RAVLT_T ...)')
    if checkpoint:
        load_weights(model, checkpoint, args.checkpoint, name)
    return model, checkpoint


def load_images(args, parser, model, checkpoint):
    """(images (B, 3, H, W), description): DIGITS val images or a folder's images, through the evaluation
    transform of datasets.py."""
    size = args.input_size or training_flag(checkpoint, 'input-size', args.checkpoint, parser) or \
        model.pretrained_cfg['input_size'][-1]
    if not args.images:
        dataset, _ = build_dataset(False, argparse.Namespace(data_set='DIGITS', input_size=size))
        images = [dataset[i][0] for i in range(min(args.num_images, len(dataset)))]
        return torch.stack(images), f'{len(images)} DIGITS val images'
    if not Path(args.images).is_dir():
        raise UsageError(f'--images {args.images} is not a folder')
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:args.num_images]
    if not paths:
        raise UsageError(f'no .jpg/.png images in {args.images}; pass a folder with images, or leave --images '
                         'out for DIGITS')
    transform = build_transform(False, argparse.Namespace(data_set='IMNET', input_size=size))
    try:
        images = [transform(load_rgb_image(p)) for p in paths]
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UsageError(f'cannot read an image in {args.images}: {e}') from None
    return torch.stack(images), f'{len(images)} images from {args.images}'


# ---- the figure ----

SERIES = [  # (path, matrix, label, style)
    ('rala', 'kv_buffer', 'RALA KV buffer', dict(color='tab:red', marker='o')),
    ('plain_linear', 'kv_buffer', 'linear attn. KV buffer', dict(color='tab:blue', marker='o', ls='--')),
    ('rala', 'output', 'RALA output', dict(color='tab:red', marker='s')),
    ('rala', 'output_ungated', 'RALA output w/o LePE and gate', dict(color='tab:orange', marker='s', ls=':')),
    ('plain_linear', 'output', 'linear attn. output', dict(color='tab:blue', marker='s', ls='--')),
    ('softmax', 'attention_matrix', 'softmax attn. matrix', dict(color='tab:green', marker='^')),
    ('softmax', 'output', 'softmax output', dict(color='tab:green', marker='s')),
]


def plot(report, path):
    blocks = report['blocks']
    chosen = next(b for b in blocks if b['block'] == report['spectra_block'])
    fig, (ax_rank, ax_spec1, ax_spec2) = plt.subplots(1, 3, figsize=(18, 6))
    x = list(range(len(blocks)))
    for attn_path, matrix, label, style in SERIES:
        points = [(i, b[attn_path][matrix]['mean_rank']) for i, b in enumerate(blocks) if attn_path in b]
        if points:
            ax_rank.plot(*zip(*points), label=label, **style)
    ax_rank.plot(x, [min(b['tokens'], b['head_dim']) for b in blocks], color='gray', lw=0, marker='_', ms=16,
                 label='max. rank of output, min(N, d)')
    ax_rank.set_xticks(x, [b['block'].replace('layers.', '').replace('.blocks.', '.') for b in blocks])
    for i, b in enumerate(blocks):  # a separator and the token count at the start of each stage
        if i == 0 or b['tokens'] != blocks[i - 1]['tokens']:
            ax_rank.axvline(i - 0.5, color='lightgray', lw=0.8)
            ax_rank.text(i - 0.4, 0.02, f"N={b['tokens']}", transform=ax_rank.get_xaxis_transform(), fontsize=8)
    ax_rank.set_yscale('log', base=2)
    ax_rank.yaxis.set_major_formatter(FormatStrFormatter('%g'))
    ax_rank.set_xlabel('block i.j = layers.i.blocks.j')
    ax_rank.set_ylabel('rank (mean over heads and images)')
    ax_rank.set_title(f"ranks per block (head dim d = {blocks[0]['head_dim']})")
    ax_rank.legend(fontsize=8, ncol=2, loc='upper center', bbox_to_anchor=(0.5, -0.16))
    if chosen['attention'] == 'rala':
        panels = [(('kv_buffer',), 'KV buffer'), (('output', 'output_ungated'), 'output features')]
    else:
        panels = [(('attention_matrix',), 'attention matrix'), (('output',), 'output features')]
    for ax, (matrices, title) in zip((ax_spec1, ax_spec2), panels):
        for attn_path, matrix, label, style in SERIES:
            if attn_path not in chosen or matrix not in matrices:
                continue
            summary = chosen[attn_path][matrix]
            for h, spectrum in enumerate(summary['spectrum']):
                ax.plot(range(1, len(spectrum) + 1), spectrum, color=style['color'], ls=style.get('ls', '-'),
                        label=None if h else f"{label} ({'x'.join(map(str, summary['shape']))}), "
                                             f"rank {summary['mean_rank']:.1f}")
        ax.axhline(report['rtol'], color='gray', lw=0.8, ls=':', label=f"rank tolerance {report['rtol']:g}")
        ax.set_yscale('log')
        ax.set_xlabel('singular value index i')
        ax.set_ylabel('sigma_i / sigma_1 (mean over images)')
        ax.set_title(f"{chosen['block']}: {title} spectrum, {chosen['heads']} head(s)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['model']}, {report['weights']}; {report['images']} at {report['input_size'][1]}x"
                 f"{report['input_size'][2]}, float64; rank = #singular values > {report['rtol']:g} x the largest")
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, dpi=100, format='png')
    plt.close(fig)


def check_output_dir(path: Path):
    """--output_dir is a folder, or can become one, and rank.json and rank.png can be written into it."""
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise UsageError(f'--output_dir {path} is a file, not a folder' if existing == path else
                         f'--output_dir {path} lies under a file ({existing})')
    if not os.access(existing, os.W_OK):
        raise UsageError(f'--output_dir {path}: {existing} is not writable')
    if existing == path:
        for name in ('rank.json', 'rank.png'):
            check_output_file(path / name, '--output_dir')


def main(args, parser=None):
    parser = parser or get_args_parser()
    check_output_dir(Path(args.output_dir))  # before the analysis
    model, checkpoint = load_model(args, parser)
    images, image_source = load_images(args, parser, model, checkpoint)
    # float64 so that the spectra are not cut off at float32 round-off (about 1e-7 of the largest).
    model = model.double().eval()
    blocks = analyse(model, images.double(), args.rtol)
    names = [b['block'] for b in blocks]
    spectra_block = args.spectra_block or next((b['block'] for b in blocks if b['attention'] == 'rala'), names[0])
    if spectra_block not in names:
        raise UsageError(f'--spectra-block {spectra_block} is not an attention block; choose from {", ".join(names)}')
    report = {
        'model': model.pretrained_cfg['architecture'],
        'weights': (f'checkpoint {Path(args.checkpoint).parent.name}/{Path(args.checkpoint).name}' if args.checkpoint
                    else 'random init (no checkpoint)'),
        'images': image_source, 'input_size': list(images.shape[1:]), 'dtype': 'float64',
        'rtol': args.rtol, 'rank_definition': 'number of singular values above rtol * the largest singular value',
        'layouts': {'kv_buffer': 'd_k x d_v per head', 'output': '(out + lepe) * o, N x d per head, before proj',
                    'output_ungated': 'RALA out without LePE and gate, N x d per head',
                    'attention_matrix': 'N x N per head'},
        'spectra_block': spectra_block, 'blocks': blocks,
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(output_dir / 'rank.json', 'w') as f:
        f.write(json.dumps(report, indent=1))
    plot(report, output_dir / 'rank.png')
    for b in blocks:
        ranks = '  '.join(f"{p}.{m} {b[p][m]['mean_rank']:.1f}" for p, m, _, _ in SERIES if p in b)
        print(f"{b['block']:<18} N={b['tokens']:<5} {ranks}")
    print(f'wrote {output_dir / "rank.json"} and {output_dir / "rank.png"}')


if __name__ == '__main__':
    run_cli(lambda argv: main(get_args_parser().parse(argv)), sys.argv[1:])
