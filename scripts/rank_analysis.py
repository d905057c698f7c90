"""Rank of the KV buffer and output features of every attention block, for each attention kind.

Per attention block, head and image: the singular values of the KV buffer RoPE(alpha * k) v^T (d x d) and the
output features before `proj` (N x d) for the block's own kind and every other linear kind its weights allow; of
the attention matrix (N x N) and the output features for softmax blocks. The rank counts singular values above
--rtol times the largest, in float64, on the block inputs (forward pre-hooks) through the literal formulas of
models/reference.py. Weights: any checkpoint (its model, --model-kwargs and training size apply unless given),
else random; images: a folder's .jpg/.png (the ImageNet evaluation transform), else DIGITS validation images;
--input-size is one number (square, as main.py's). Writes rank.json and rank.png into --output_dir.

    python scripts/rank_analysis.py --model RAVLT_T [--checkpoint PATH] [--images DIR] --output_dir D
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import torch
from PIL import Image, UnidentifiedImageError

import figures
from checkpoints import flags_of, load_checkpoint
from cli import COUNT, POSITIVE, ArgumentParser, json_object, one_line_errors
from datasets import build_dataset, build_transform
from errors import UsageError
from model_factory import create_model, model_from_checkpoint
from models import reference
from models.ravlt import RAVLTStage
from utils import atomic_file, check_output_file

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


def get_args_parser():
    parser = ArgumentParser('rank_analysis.py', description=__doc__.split('\n\n')[0], with_config=False)
    parser.add_argument('--model', default=None, help="RAVLT_T ... RAVLT_L (default: the checkpoint's, else RAVLT_T)")
    parser.add_argument('--model-kwargs', default=None, type=json_object, metavar='JSON', help='as in main.py')
    parser.add_argument('--checkpoint', default='', help='checkpoint or state dict (default: random weights)')
    parser.add_argument('--images', default='', help='folder of .jpg/.png images (default: DIGITS val images)')
    parser.add_argument('--num-images', default=4, type=COUNT, help='images to analyse')
    parser.add_argument('--input-size', default=None, type=COUNT, help="default: the checkpoint's, else the model's")
    parser.add_argument('--rtol', default=1e-3, type=POSITIVE, help='rank: singular values above rtol x the largest')
    parser.add_argument('--spectra-block', default='', help='e.g. layers.0.blocks.1 (default: the first linear one)')
    parser.add_argument('--seed', default=0, type=int, help='seed of the random weights')
    parser.add_argument('--output_dir', '--output-dir', required=True, help='where rank.json and rank.png go')
    return parser


# ---- ranks and spectra ----
def summarise(matrices, rtol):
    """Ranks [image][head] and normalised spectra sigma_i / sigma_1 [head][i] (mean over images) of (B, h, M, N)."""
    s = torch.linalg.svdvals(matrices)
    spectrum = s / s[..., :1].clamp_min(torch.finfo(s.dtype).tiny)
    rank = (s > rtol * s[..., :1]).sum(dim=-1)  # singular values above rtol times the largest
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
def load_model(args):
    """(model, checkpoint or {}): with --checkpoint, its model (--model and --model-kwargs override it); without,
    --model (default RAVLT_T) initialised from --seed."""
    torch.manual_seed(args.seed)
    checkpoint = load_checkpoint(args.checkpoint) if args.checkpoint else {}
    if checkpoint:
        model, name = model_from_checkpoint(checkpoint, args.checkpoint, args.model, args.model_kwargs)
    else:
        name = args.model or 'RAVLT_T'
        model = create_model(name, args.model_kwargs)
    if not attention_modules(model):
        raise UsageError(f'{name} has no RAVLT attention blocks; use a RAVLT model (RAVLT_T ...)')
    return model, checkpoint


def load_images(args, model, checkpoint):
    """(images (B, 3, H, W), description): DIGITS val images or a folder's images, through the evaluation
    transform of datasets.py."""
    size = args.input_size or flags_of(checkpoint).get('input_size') or model.pretrained_cfg['input_size'][-1]
    if not args.images:
        dataset, _ = build_dataset(False, argparse.Namespace(data_set='DIGITS', input_size=size))
        images = [dataset[i][0] for i in range(min(args.num_images, len(dataset)))]
        return torch.stack(images), f'{len(images)} DIGITS val images'
    if not Path(args.images).is_dir():
        raise UsageError(f'--images {args.images} is not a folder')
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[: args.num_images]
    if not paths:
        raise UsageError(f'no .jpg/.png images in {args.images}; give a folder of images, or no --images for DIGITS')
    transform = build_transform(False, argparse.Namespace(data_set='IMNET', input_size=size))
    try:
        images = [transform(Image.open(p).convert('RGB')) for p in paths]
    except (OSError, UnidentifiedImageError) as e:
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


def draw(path, blocks, ranks, spectra, rtol: float, title: str):
    """The figure of the rank analysis and of the ablation: on the left `ranks` [(label, {block index: rank}, style)]
    with the output's bound min(N, d); on the right two panels of `spectra` [(title, [(label, sigma_i / sigma_1,
    style)])] with the rank tolerance `rtol`."""
    fig, (ax, *spectra_axes) = figures.pyplot().subplots(1, 3, figsize=(18, 6))
    for label, points, style in ranks:
        ax.plot(list(points), list(points.values()), label=label, **style)
    bounds = [min(b['tokens'], b['head_dim']) for b in blocks]
    ax.plot(bounds, color='gray', lw=0, marker='_', ms=16, label='max. rank of output, min(N, d)')
    ax.set_xticks(range(len(blocks)), [b['block'].replace('layers.', '').replace('.blocks.', '.') for b in blocks])
    for i, b in enumerate(blocks):  # a separator and the token count at the start of each stage
        if i == 0 or b['tokens'] != blocks[i - 1]['tokens']:
            ax.axvline(i - 0.5, color='lightgray', lw=0.8)
            ax.text(i - 0.4, 0.02, f'N={b["tokens"]}', transform=ax.get_xaxis_transform(), fontsize=8)
    ax.set_yscale('log', base=2)
    ax.yaxis.set_major_formatter('{x:g}')
    ax.set(xlabel='block i.j = layers.i.blocks.j', ylabel='rank (mean over heads and images)')
    ax.set_title(f'ranks per block (head dim d = {blocks[0]["head_dim"]})', fontsize=10)
    ax.legend(fontsize=8, ncol=2, loc='upper center', bbox_to_anchor=(0.5, -0.16))
    for ax, (panel, curves) in zip(spectra_axes, spectra):
        for label, spectrum, style in curves:
            ax.plot(range(1, len(spectrum) + 1), spectrum, label=label, **style)
        ax.axhline(rtol, color='gray', lw=0.8, ls=':', label=f'rank tolerance {rtol:g}')
        ax.set(yscale='log', xlabel='singular value index i', ylabel='sigma_i / sigma_1 (mean over images)')
        ax.set_title(panel, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9, wrap=True)
    fig.tight_layout()
    figures.save(fig, path)


def plot(report, path):
    """Each series' ranks per block; the spectra of the chosen block, a curve per head."""
    blocks = report['blocks']
    chosen = next(b for b in blocks if b['block'] == report['spectra_block'])
    ranks = []
    for kind, matrix, label, style in SERIES:
        points = {
            i: b['computed_as'][kind][matrix]['mean_rank'] for i, b in enumerate(blocks) if kind in b['computed_as']
        }
        ranks += [(label, points, style)] if points else []
    spectra = []
    for matrix in ('attention_matrix' if chosen['attention'] == 'softmax' else 'kv_buffer', 'output'):
        curves = []
        for kind, _, label, style in (series for series in SERIES if series[1] == matrix):
            if kind in chosen['computed_as']:
                summary = chosen['computed_as'][kind][matrix]
                legend = f'{label} ({"x".join(map(str, summary["shape"]))}), rank {summary["mean_rank"]:.1f}'
                line = dict(color=style['color'], ls=style.get('ls', '-'))
                curves += [(None if h else legend, spectrum, line) for h, spectrum in enumerate(summary['spectrum'])]
        name = matrix.replace('_', ' ').replace('kv', 'KV').replace('output', 'output features')
        spectra.append((f'{chosen["block"]} ({chosen["attention"]}): {name}, {chosen["heads"]} head(s)', curves))
    kinds = {}
    for b in blocks:
        kinds.setdefault(b['block'].split('.blocks.')[0], b['attention'])  # each stage's first block
    title = (
        f'{report["model"]} (stages: {", ".join(kinds.values())}), {report["weights"]}; {report["images"]} '
        f'at {report["input_size"][1]}x{report["input_size"][2]}, float64; rank = #singular values > '
        f'{report["rtol"]:g} x the largest'
    )
    draw(path, blocks, ranks, spectra, report['rtol'], title)


def main(args):
    figures.pyplot()  # a missing matplotlib is one line, before the work
    model, checkpoint = load_model(args)
    images, image_source = load_images(args, model, checkpoint)
    output_dir = Path(args.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f'--output_dir {output_dir}: {e.strerror}') from None
    for name in ('rank.json', 'rank.png'):
        check_output_file(output_dir / name, '--output_dir')
    # float64 so that the spectra are not cut off at float32 round-off (about 1e-7 of the largest).
    blocks = analyse(model.double().eval(), images.double(), args.rtol)
    names = [b['block'] for b in blocks]
    spectra_block = args.spectra_block or next((b['block'] for b in blocks if b['attention'] != 'softmax'), names[0])
    if spectra_block not in names:
        raise UsageError(f'--spectra-block {spectra_block} is not an attention block; choose from {", ".join(names)}')
    checkpoint_name = f'{Path(args.checkpoint).parent.name}/{Path(args.checkpoint).name}'
    report = {
        'model': model.pretrained_cfg['architecture'],
        'weights': f'checkpoint {checkpoint_name}' if args.checkpoint else 'random init (no checkpoint)',
        'images': image_source,
        'input_size': list(images.shape[1:]),
        'dtype': 'float64',
        'rtol': args.rtol,
        'spectra_block': spectra_block,
        'blocks': blocks,
    }
    with atomic_file(output_dir / 'rank.json', 'w') as f:
        f.write(json.dumps(report, indent=1))
    plot(report, output_dir / 'rank.png')
    for b in blocks:
        ranks = [f'{k}.{m} {b["computed_as"][k][m]["mean_rank"]:.1f}' for k, m, _, _ in SERIES if k in b['computed_as']]
        print(f'{b["block"]:<18} N={b["tokens"]:<5} ' + '  '.join(ranks))
    print(f'wrote {output_dir / "rank.json"} and {output_dir / "rank.png"}')


if __name__ == '__main__':
    with one_line_errors():
        main(get_args_parser().parse_args())
