#!/usr/bin/env python
"""Rank of the KV buffer and output features of every attention block, for each attention kind.

For every attention block of a RAVLT model, per head and per image, this computes the singular values of
  - linear kinds (rala and its ablations, see models/reference.py): the KV buffer RoPE(alpha * k) v^T (d x d)
    and the output features before `proj` (N x d), for the block's own kind and for every other linear kind
    its weights allow (with and without alpha; with and without LePE and gate if the block has them);
  - softmax blocks: the attention matrix (N x N) and the output features (out + lepe) * o (N x d).
The rank counts singular values above `--rtol` times the largest. Everything runs in float64 from the
block inputs captured with forward pre-hooks, through the literal formulas of models/reference.py, so the
model code stays untouched. Writes rank.json and rank.png (ranks per block, spectra of one block) to
--output_dir.

    python scripts/rank_analysis.py --model RAVLT_T [--checkpoint PATH] [--images DIR] --output_dir D
"""

import argparse
import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import FormatStrFormatter
from PIL import UnidentifiedImageError

from checkpoints import flags_of, load_checkpoint
from cli import COUNT, POSITIVE, ArgumentParser, json_object, run_cli
from datasets import build_dataset, build_transform, load_rgb_image
from errors import UsageError
from model_factory import create_model, model_from_checkpoint
from models import reference
from models.ravlt import RAVLTStage
from utils import atomic_file, check_output_file

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


def get_args_parser():
    parser = ArgumentParser('rank_analysis.py', description='RAVLT rank analysis', with_config=False)
    parser.add_argument(
        '--model', default=None, help="RAVLT_T/S/B/L or a RAVLT timm name (default: the checkpoint's, else RAVLT_T)"
    )
    parser.add_argument(
        '--model-kwargs',
        default=None,
        type=json_object,
        metavar='JSON',
        help="model keyword arguments as in main.py (default: the checkpoint's)",
    )
    parser.add_argument('--checkpoint', default='', help='checkpoint or state dict; random init if not given')
    parser.add_argument('--images', default='', help='folder of .jpg/.png images; DIGITS val images if not given')
    parser.add_argument('--num-images', default=4, type=COUNT, help='images to analyse')
    parser.add_argument(
        '--input-size',
        default=None,
        type=COUNT,
        help="image size (default: the checkpoint's training size, else the model's, 224)",
    )
    parser.add_argument(
        '--rtol', default=1e-3, type=POSITIVE, help='rank = number of singular values above rtol * the largest'
    )
    parser.add_argument(
        '--spectra-block',
        default='',
        help='block whose spectra are plotted, e.g. layers.0.blocks.1 (default: the first linear-attention block)',
    )
    parser.add_argument('--seed', default=0, type=int, help='seed of the random init')
    parser.add_argument('--output_dir', '--output-dir', required=True, help='where rank.json and rank.png go')
    return parser


# ---- ranks and spectra ----


def numerical_rank(singular_values, rtol):
    """Number of singular values (descending, last dim) above rtol times the largest."""
    return (singular_values > rtol * singular_values[..., :1]).sum(dim=-1)


def summarise(matrices, rtol):
    """Ranks [image][head] and normalised spectra sigma_i / sigma_1 [head][i] (mean over images) of (B, h, M, N)."""
    s = torch.linalg.svdvals(matrices)
    spectrum = s / s[..., :1].clamp_min(torch.finfo(s.dtype).tiny)
    rank = numerical_rank(s, rtol)
    return {
        'shape': list(matrices.shape[-2:]),
        'rank': rank.tolist(),
        'mean_rank': rank.double().mean().item(),
        'spectrum': spectrum.mean(dim=0).tolist(),
    }


def attention_modules(model):
    """(block name, attention module, its stage's RoPE angles) of every block of a RAVLT model."""
    return [
        (f'{name}.blocks.{i}', block.attn, stage.RoPE.angle)
        for name, stage in model.named_modules()
        if isinstance(stage, RAVLTStage)
        for i, block in enumerate(stage.blocks)
    ]


@torch.no_grad()
def analyse(model, images, rtol):
    """One entry per attention block of `model` (run in its own dtype on `images`): its kind and, under
    `computed_as`, the summaries of its matrices for each kind its weights feed (reference.computable_kinds)."""
    blocks = attention_modules(model)
    inputs = {}
    hooks = [
        attn.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
        for name, attn, _ in blocks
    ]
    try:
        model.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    report = []
    for name, attn, angle in blocks:
        x = inputs[name]
        entry = {
            'block': name,
            'attention': reference.kind_of(attn),
            'tokens': x.shape[2] * x.shape[3],
            'heads': attn.num_heads,
            'head_dim': attn.head_dim,
            'computed_as': {},
        }
        for kind in reference.computable_kinds(attn):
            terms = reference.attention_terms(attn, x, angle, kind)
            entry['computed_as'][kind] = {matrix: summarise(t, rtol) for matrix, t in terms.items()}
        report.append(entry)
    return report


# ---- weights and images ----


def load_model(args, parser):
    """(model, checkpoint or {}): with --checkpoint, its model, --model-kwargs and class count unless given (as
    main.py --eval takes them, checked as `parser` checks the flags); without, --model (default RAVLT_T)
    initialised from --seed."""
    torch.manual_seed(args.seed)
    checkpoint = load_checkpoint(args.checkpoint) if args.checkpoint else {}
    if checkpoint:
        model, name = model_from_checkpoint(
            checkpoint, args.checkpoint, args.model, args.model_kwargs, default_name='RAVLT_T', parser=parser
        )
    else:
        name = args.model or 'RAVLT_T'
        model = create_model(name, args.model_kwargs)
    if not attention_modules(model):
        raise UsageError(f'{name} has no RAVLT attention blocks; use a RAVLT model (RAVLT_T ...)')
    return model, checkpoint


def load_images(args, parser, model, checkpoint):
    """(images (B, 3, H, W), description): DIGITS val images or a folder's images, through the evaluation
    transform of datasets.py."""
    saved = flags_of(checkpoint, args.checkpoint, parser, check=['input_size']).get('input_size')
    size = args.input_size or saved or model.pretrained_cfg['input_size'][-1]
    if not args.images:
        dataset, _ = build_dataset(False, argparse.Namespace(data_set='DIGITS', input_size=size))
        images = [dataset[i][0] for i in range(min(args.num_images, len(dataset)))]
        return torch.stack(images), f'{len(images)} DIGITS val images'
    if not Path(args.images).is_dir():
        raise UsageError(f'--images {args.images} is not a folder')
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[: args.num_images]
    if not paths:
        raise UsageError(
            f'no .jpg/.png images in {args.images}; pass a folder with images, or leave --images out for DIGITS'
        )
    transform = build_transform(False, argparse.Namespace(data_set='IMNET', input_size=size))
    try:
        images = [transform(load_rgb_image(p)) for p in paths]
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UsageError(f'cannot read an image in {args.images}: {e}') from None
    return torch.stack(images), f'{len(images)} images from {args.images}'


# ---- the figure ----

# (kind, matrix, label, style). The KV buffer does not depend on LePE and gate: with alpha it is rala's and
# rala_no_gate_lepe's, without alpha linear's and rala_no_alpha's; every linear block has the ungated kinds.
SERIES = [
    ('rala_no_gate_lepe', 'kv_buffer', 'KV buffer with alpha', dict(color='tab:red', marker='o')),
    ('linear', 'kv_buffer', 'KV buffer without alpha', dict(color='tab:blue', marker='o', ls='--')),
    ('rala', 'output', 'output, rala', dict(color='tab:red', marker='s')),
    ('rala_no_alpha', 'output', 'output, rala_no_alpha', dict(color='tab:purple', marker='s', ls='-.')),
    ('rala_no_gate_lepe', 'output', 'output, rala_no_gate_lepe', dict(color='tab:orange', marker='s', ls=':')),
    ('linear', 'output', 'output, linear', dict(color='tab:blue', marker='s', ls='--')),
    ('softmax', 'attention_matrix', 'softmax attention matrix', dict(color='tab:green', marker='^')),
    ('softmax', 'output', 'output, softmax', dict(color='tab:green', marker='s')),
]


def stage_kinds(blocks) -> str:
    """'rala, rala, softmax, softmax': the attention kind of each stage's first block."""
    kinds = {}
    for b in blocks:
        kinds.setdefault(b['block'].split('.blocks.')[0], b['attention'])
    return ', '.join(kinds.values())


def plot(report, path):
    blocks = report['blocks']
    chosen = next(b for b in blocks if b['block'] == report['spectra_block'])
    fig, (ax_rank, ax_spec1, ax_spec2) = plt.subplots(1, 3, figsize=(18, 6))
    x = list(range(len(blocks)))
    for kind, matrix, label, style in SERIES:
        points = [
            (i, b['computed_as'][kind][matrix]['mean_rank']) for i, b in enumerate(blocks) if kind in b['computed_as']
        ]
        if points:
            ax_rank.plot(*zip(*points), label=label, **style)
    ax_rank.plot(
        x,
        [min(b['tokens'], b['head_dim']) for b in blocks],
        color='gray',
        lw=0,
        marker='_',
        ms=16,
        label='max. rank of output, min(N, d)',
    )
    ax_rank.set_xticks(x, [b['block'].replace('layers.', '').replace('.blocks.', '.') for b in blocks])
    for i, b in enumerate(blocks):  # a separator and the token count at the start of each stage
        if i == 0 or b['tokens'] != blocks[i - 1]['tokens']:
            ax_rank.axvline(i - 0.5, color='lightgray', lw=0.8)
            ax_rank.text(i - 0.4, 0.02, f'N={b["tokens"]}', transform=ax_rank.get_xaxis_transform(), fontsize=8)
    ax_rank.set_yscale('log', base=2)
    ax_rank.yaxis.set_major_formatter(FormatStrFormatter('%g'))
    ax_rank.set_xlabel('block i.j = layers.i.blocks.j')
    ax_rank.set_ylabel('rank (mean over heads and images)')
    ax_rank.set_title(
        f'ranks per block, each computed as the kinds its weights allow (head dim d = {blocks[0]["head_dim"]})',
        fontsize=10,
    )
    ax_rank.legend(fontsize=8, ncol=2, loc='upper center', bbox_to_anchor=(0.5, -0.16))
    if chosen['attention'] == 'softmax':
        panels = [('attention_matrix', 'attention matrix'), ('output', 'output features')]
    else:
        panels = [('kv_buffer', 'KV buffer'), ('output', 'output features')]
    for ax, (matrix, title) in zip((ax_spec1, ax_spec2), panels):
        for kind, series_matrix, label, style in SERIES:
            if kind not in chosen['computed_as'] or series_matrix != matrix:
                continue
            summary = chosen['computed_as'][kind][matrix]
            for h, spectrum in enumerate(summary['spectrum']):
                ax.plot(
                    range(1, len(spectrum) + 1),
                    spectrum,
                    color=style['color'],
                    ls=style.get('ls', '-'),
                    label=None
                    if h
                    else f'{label} ({"x".join(map(str, summary["shape"]))}), rank {summary["mean_rank"]:.1f}',
                )
        ax.axhline(report['rtol'], color='gray', lw=0.8, ls=':', label=f'rank tolerance {report["rtol"]:g}')
        ax.set_yscale('log')
        ax.set_xlabel('singular value index i')
        ax.set_ylabel('sigma_i / sigma_1 (mean over images)')
        ax.set_title(f'{chosen["block"]} ({chosen["attention"]}): {title} spectrum, {chosen["heads"]} head(s)')
        ax.legend(fontsize=8)
    fig.suptitle(
        f'{report["model"]} (stages: {stage_kinds(blocks)}), {report["weights"]}; {report["images"]} at '
        f'{report["input_size"][1]}x{report["input_size"][2]}, float64; rank = #singular values > '
        f'{report["rtol"]:g} x the largest'
    )
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, dpi=100, format='png')
    plt.close(fig)


def check_output_dir(path: Path):
    """--output_dir is a folder, or can become one, and rank.json and rank.png can be written into it."""
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise UsageError(
            f'--output_dir {path} is a file, not a folder'
            if existing == path
            else f'--output_dir {path} lies under a file ({existing})'
        )
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
    spectra_block = args.spectra_block or next((b['block'] for b in blocks if b['attention'] != 'softmax'), names[0])
    if spectra_block not in names:
        raise UsageError(f'--spectra-block {spectra_block} is not an attention block; choose from {", ".join(names)}')
    report = {
        'model': model.pretrained_cfg['architecture'],
        'weights': (
            f'checkpoint {Path(args.checkpoint).parent.name}/{Path(args.checkpoint).name}'
            if args.checkpoint
            else 'random init (no checkpoint)'
        ),
        'images': image_source,
        'input_size': list(images.shape[1:]),
        'dtype': 'float64',
        'rtol': args.rtol,
        'rank_definition': 'number of singular values above rtol * the largest singular value',
        'layouts': {
            'kv_buffer': 'd_k x d_v per head, sum over tokens of RoPE(weighted k) v^T',
            'output': 'N x d per head, before proj: (out + lepe) * o for kinds with gate and LePE, else out',
            'attention_matrix': 'N x N per head',
            'computed_as': "the block's own kind (`attention`) and the other kinds its weights allow",
        },
        'spectra_block': spectra_block,
        'blocks': blocks,
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(output_dir / 'rank.json', 'w') as f:
        f.write(json.dumps(report, indent=1))
    plot(report, output_dir / 'rank.png')
    for b in blocks:
        ranks = '  '.join(
            f'{k}.{m} {b["computed_as"][k][m]["mean_rank"]:.1f}' for k, m, _, _ in SERIES if k in b['computed_as']
        )
        print(f'{b["block"]:<18} N={b["tokens"]:<5} {ranks}')
    print(f'wrote {output_dir / "rank.json"} and {output_dir / "rank.png"}')


if __name__ == '__main__':
    run_cli(lambda argv: main(get_args_parser().parse(argv)), sys.argv[1:])
