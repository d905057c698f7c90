"""RALA's two rank augmentations switched off one at a time, beside plain linear and softmax attention: the
paper's ablation in one command.

Each attention kind of `attn_types` (models/reference.py defines them: `linear`, `rala_no_alpha`,
`rala_no_gate_lepe`, `rala`, `softmax`) replaces RALA in the stages that have it, and for each kind this measures
- cost, of --model at --input-size: parameters, FLOPs in both conventions of scripts/flops.py (all products;
  without the attention products), and eval and train images/s and the peak memory of one step, all kinds
  side by side in one run (profiling.py's method);
- learning, on DIGITS with --train-config (default: the demo recipe, configs/demo_digits.yaml) for each of
  --seeds: top-1 of the final weights and of their EMA (main.py in subprocesses, one thread each, --jobs at a
  time), and the ranks of the KV buffer (the attention matrix for softmax) and of the output features per
  stage (scripts/rank_analysis.py on each trained checkpoint, the block's own kind).

Writes ablation.json, ablation.md (the two tables, with their settings) and ablation.png (ranks per block and
the spectra of the first block per kind) into --output_dir; the trainings go to OUTPUT_DIR/digits/KIND-seedS
(main.py's output folders: a rerun resumes them, a finished one only re-reads its log).

    python scripts/ablation.py --output_dir output/ablation
    python scripts/ablation.py --kinds linear rala --seeds 0 --iters 5 --output_dir output/ablation_quick
"""

import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import FormatStrFormatter

from cli import COUNT, NON_NEGATIVE_INT, POSITIVE, ArgumentParser, json_object, read_config, run_cli
from errors import UsageError
from models import ATTENTION_TYPES
from profiling import Contender, Settings, benchmark, build_model, count_flops, count_params, progress
from utils import atomic_file

ROOT = Path(__file__).resolve().parents[1]
KINDS = list(ATTENTION_TYPES)
# One colour per kind, as in scripts/rank_analysis.py's figure.
COLORS = {
    'linear': 'tab:blue',
    'rala_no_alpha': 'tab:purple',
    'rala_no_gate_lepe': 'tab:orange',
    'rala': 'tab:red',
    'softmax': 'tab:green',
}


def get_args_parser():
    parser = ArgumentParser(
        'ablation.py',
        description="RALA's ablation: cost, ranks and DIGITS accuracy per attention kind",
        with_config=False,
    )
    parser.add_argument(
        '--kinds',
        nargs='+',
        choices=KINDS,
        default=KINDS,
        metavar='KIND',
        help=f'attention kinds, in table order ({", ".join(KINDS)}; default: all)',
    )
    parser.add_argument('--model', default='RAVLT_T', help='the model whose cost is measured')
    parser.add_argument(
        '--model-kwargs',
        type=json_object,
        default=None,
        metavar='JSON',
        help='keyword arguments of that model (its attn_types say where RALA is)',
    )
    parser.add_argument(
        '--input-size',
        type=COUNT,
        nargs='+',
        default=[224],
        metavar='H [W]',
        help='input height and width of the cost measurement (one number for a square)',
    )
    parser.add_argument('--batch-size', type=COUNT, default=16, help='batch of the speed and memory measurement')
    parser.add_argument('--threads', type=COUNT, default=None, help='torch threads of the speed and memory measurement')
    parser.add_argument('--warmup', type=COUNT, default=3, help='untimed steps per contender')
    parser.add_argument('--iters', type=COUNT, default=10, help='timed steps per contender')
    parser.add_argument(
        '--train-config',
        default='configs/demo_digits.yaml',
        help="main.py config of the trainings; each kind replaces RALA in its model's attn_types",
    )
    parser.add_argument(
        '--seeds', type=NON_NEGATIVE_INT, nargs='+', default=[0, 1, 2], metavar='SEED', help='a training per seed'
    )
    parser.add_argument(
        '--jobs',
        type=COUNT,
        default=os.cpu_count() or 1,
        help='trainings at a time (one thread each; default: one per CPU)',
    )
    parser.add_argument('--num-images', type=COUNT, default=4, help='validation images of the rank analysis')
    parser.add_argument(
        '--rtol', type=POSITIVE, default=1e-3, help='rank = number of singular values above rtol * the largest'
    )
    parser.add_argument('--seed', type=int, default=0, help="seed of the cost measurement's weights")
    parser.add_argument('--output_dir', '--output-dir', required=True)
    return parser


# ---- the models of the ablation ----


def stage_kinds(name: str, model_kwargs, kind: str) -> list:
    """The model's attention per stage with `kind` in place of RALA."""
    with torch.device('meta'):
        model = build_model(name, 0, model_kwargs)
    base = getattr(model, 'attn_types', None)
    if base is None or 'rala' not in base:
        raise UsageError(
            f'{name} with --model-kwargs {json.dumps(model_kwargs)} has no RALA stage to ablate; use a '
            'RAVLT model with "rala" in its attn_types'
        )
    return [kind if t == 'rala' else t for t in base]


def with_kind(name: str, model_kwargs, kind: str) -> dict:
    return dict(model_kwargs or {}, attn_types=stage_kinds(name, model_kwargs, kind))


# ---- cost: params, FLOPs, speed and memory side by side ----


def measure_cost(args, kinds) -> tuple:
    """({kind: cost}, settings line): params and FLOPs, then every kind's eval and train step in one benchmark."""
    size = (args.input_size[0], args.input_size[-1])
    settings = Settings.from_args(args, input_size=size, memory=True)
    cost, contenders = {}, []
    for kind in kinds:
        kwargs = with_kind(args.model, args.model_kwargs, kind)
        progress(f'{kind}: counting FLOPs')
        model = build_model(args.model, args.seed, kwargs)
        flops = count_flops(model, torch.randn(1, 3, *size))
        cost[kind] = {
            'attn_types': kwargs['attn_types'],
            'params': count_params(model),
            'flops': flops['total'],
            'flops_no_attn': flops['total'] - flops['attention'],
        }
        contenders += [Contender(args.model, mode, model_kwargs=kwargs, label=kind) for mode in ('eval', 'train')]
    del model
    for contender, row in zip(contenders, benchmark(contenders, settings)):
        cost[contender.label][contender.mode] = {
            k: row[k] for k in ('img_per_s', 'img_per_s_p25', 'img_per_s_p75', 'peak_mib')
        }
    return cost, f'{args.model}, ' + settings.describe()


# ---- learning: DIGITS trainings and the rank analysis of their checkpoints ----


def child_env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
    env.setdefault('OMP_NUM_THREADS', '1')  # as scripts/demo.sh: the demo's operations are tiny
    return env


def run_logged(command, log: Path, what: str):
    """Run a command with its output in `log`; a failure ends the ablation in one line: the command's last line,
    exit 2 where the command took its input for bad, else 1."""
    with open(log, 'w') as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT).returncode
    if code:
        lines = log.read_text().strip().splitlines()
        message = f'{what} failed (exit {code}): {lines[-1] if lines else "no output"} (output in {log})'
        if code == 2:
            raise UsageError(message)
        raise SystemExit(f'error: {message}')


def train_and_analyse(job: dict, args) -> dict:
    """One training (resumed if its folder holds one) and the rank analysis of its checkpoint."""
    folder = Path(job['folder'])
    folder.parent.mkdir(parents=True, exist_ok=True)
    what = f'{job["kind"]} seed {job["seed"]}'
    progress(f'{what}: training in {folder}')
    run_logged(
        [
            sys.executable,
            str(ROOT / 'main.py'),
            '--config',
            str(Path(args.train_config).resolve()),
            '--model-kwargs',
            json.dumps(job['model_kwargs']),
            '--seed',
            str(job['seed']),
            '--output_dir',
            str(folder),
        ],
        folder.with_suffix('.train.log'),
        f'training {what}',
    )
    progress(f'{what}: rank analysis')
    run_logged(
        [
            sys.executable,
            str(ROOT / 'scripts' / 'rank_analysis.py'),
            '--checkpoint',
            str(folder / 'checkpoint.pth'),
            '--num-images',
            str(args.num_images),
            '--rtol',
            str(args.rtol),
            '--output_dir',
            str(folder / 'rank'),
        ],
        folder.with_suffix('.rank.log'),
        f'rank analysis of {what}',
    )
    log = [json.loads(line) for line in (folder / 'log.txt').read_text().splitlines()]
    last = log[-1]
    if last['epoch'] != job['epochs'] - 1:
        raise SystemExit(f'error: {folder / "log.txt"} ends at epoch {last["epoch"]}, not {job["epochs"] - 1}')
    return {
        'seed': job['seed'],
        'acc1': last['test_acc1'],
        'ema_acc1': last.get('test_ema_acc1'),
        'loss': last['test_loss'],
        'folder': str(folder),
        'ranks': json.loads((folder / 'rank' / 'rank.json').read_text()),
    }


def measure_learning(args, kinds) -> tuple:
    """({kind: {'runs': [per seed]}}, settings line)."""
    config = read_config(args.train_config, None)  # main.py checks it when it trains
    name, kwargs = config.get('model', 'RAVLT_T'), config.get('model-kwargs')
    if not isinstance(config.get('epochs'), int):
        raise UsageError(f'--train-config {args.train_config} must set epochs (the trainings are checked against it)')
    epochs = config['epochs']
    jobs = [
        {
            'kind': kind,
            'seed': seed,
            'epochs': epochs,
            'model_kwargs': with_kind(name, kwargs, kind),
            'folder': str(Path(args.output_dir).resolve() / 'digits' / f'{kind}-seed{seed}'),
        }
        for kind in kinds
        for seed in args.seeds
    ]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(train_and_analyse, job, args) for job in jobs]
        try:
            runs = [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    learning = {kind: {'attn_types': with_kind(name, kwargs, kind)['attn_types'], 'runs': []} for kind in kinds}
    for job, run in zip(jobs, runs):
        learning[job['kind']]['runs'].append(run)
    line = (
        f'{name} {json.dumps(kwargs)} trained with {args.train_config} ({epochs} epochs), seeds '
        f'{", ".join(map(str, args.seeds))}; ranks: {args.num_images} validation images, float64, singular values '
        f'above {args.rtol:g} x the largest'
    )
    return learning, line


def stage_ranks(report: dict) -> list:
    """Per stage, from a rank.json: the block kind's mean ranks (over the stage's blocks, heads and images) of its
    KV buffer or attention matrix and of its output features, with their bounds."""
    stages = {}
    for block in report['blocks']:
        terms = block['computed_as'][block['attention']]
        matrix = 'kv_buffer' if 'kv_buffer' in terms else 'attention_matrix'
        stage = stages.setdefault(
            block['block'].split('.blocks.')[0],
            {
                'attention': block['attention'],
                'matrix': matrix,
                'tokens': block['tokens'],
                'head_dim': block['head_dim'],
                'matrix_bound': block['head_dim'] if matrix == 'kv_buffer' else block['tokens'],
                'output_bound': min(block['tokens'], block['head_dim']),
                'matrix_ranks': [],
                'output_ranks': [],
            },
        )
        stage['matrix_ranks'].append(terms[matrix]['mean_rank'])
        stage['output_ranks'].append(terms['output']['mean_rank'])
    return [
        {
            **{k: v for k, v in s.items() if not k.endswith('_ranks')},
            'matrix_rank': statistics.fmean(s['matrix_ranks']),
            'output_rank': statistics.fmean(s['output_ranks']),
        }
        for s in stages.values()
    ]


def summarise_learning(learning: dict):
    """Adds each kind's accuracies (one per seed) and its stage ranks averaged over the seeds."""
    for entry in learning.values():
        runs = entry['runs']
        entry['acc1'] = [r['acc1'] for r in runs]
        entry['ema_acc1'] = [r['ema_acc1'] for r in runs]
        entry['loss'] = [r['loss'] for r in runs]
        entry['stages'] = []
        for seeds in zip(*(stage_ranks(r['ranks']) for r in runs)):  # one stage, every seed
            entry['stages'].append(
                {
                    **seeds[0],
                    'matrix_rank': statistics.fmean(s['matrix_rank'] for s in seeds),
                    'output_rank': statistics.fmean(s['output_rank'] for s in seeds),
                }
            )


# ---- the tables and the figure ----


def spread(values, digits: int = 2) -> str:
    mean = statistics.fmean(values)
    return (
        f'{mean:.{digits}f}'
        if len(values) == 1
        else f'{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})'
    )


def cost_table(cost: dict, settings: str) -> str:
    reference = cost.get('rala')
    lines = [
        f'Cost: {settings}; img/s: median (25th-75th percentile), x: relative to rala',
        '',
        '| attention per stage | params (M) | GFLOPs | GFLOPs w/o attention products | eval img/s | '
        'train img/s | eval peak MiB | train peak MiB |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for c in cost.values():
        cells = [
            ', '.join(c['attn_types']),
            f'{c["params"] / 1e6:.3f}',
            f'{c["flops"] / 1e9:.3f}',
            f'{c["flops_no_attn"] / 1e9:.3f}',
        ]
        for mode in ('eval', 'train'):
            m = c[mode]
            ratio = f' x{m["img_per_s"] / reference[mode]["img_per_s"]:.2f}' if reference else ''
            cells.append(f'{m["img_per_s"]:.1f} ({m["img_per_s_p25"]:.1f}-{m["img_per_s_p75"]:.1f}){ratio}')
        cells += [f'{c[mode]["peak_mib"]:.0f}' for mode in ('eval', 'train')]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def learning_table(learning: dict, settings: str) -> str:
    stages = next(iter(learning.values()))['stages']
    # Stages with softmax in every row (the same kind) are left out.
    shown = [i for i in range(len(stages)) if any(e['stages'][i]['attention'] != 'softmax' for e in learning.values())]
    header = ['attention per stage', 'top-1 %', 'EMA top-1 %', 'test loss']
    for i in shown:
        s = stages[i]
        header += [
            f'stage {i + 1} KV buffer rank (of d = {s["head_dim"]}) / attention matrix* (of N = {s["tokens"]})',
            f'stage {i + 1} output rank (of {s["output_bound"]})',
        ]
    lines = [
        f'Learning: {settings}; top-1 and loss of the final weights: mean (min-max) over seeds, ranks: mean over '
        'blocks, heads, images and seeds',
        '',
        '| ' + ' | '.join(header) + ' |',
        '|' + '---|' * len(header),
    ]
    for e in learning.values():
        cells = [', '.join(e['attn_types']), spread(e['acc1']), spread(e['ema_acc1']), spread(e['loss'], 4)]
        for s in (e['stages'][i] for i in shown):
            star = '*' if s['matrix'] == 'attention_matrix' else ''
            cells += [f'{s["matrix_rank"]:.1f}{star}', f'{s["output_rank"]:.1f}']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines + ['', '*: softmax attention has no KV buffer; its N x N attention matrix instead.'])


def plot(learning: dict, path: Path, settings: str, rtol: float):
    """Ranks per block (output solid, KV buffer or attention matrix dashed) and the spectra of the first block,
    from the first seed's checkpoint of each kind."""
    fig, (ax_rank, ax_kv, ax_out) = plt.subplots(1, 3, figsize=(18, 6))
    for kind, e in learning.items():
        report = e['runs'][0]['ranks']
        blocks = report['blocks']
        x = range(len(blocks))
        own = [b['computed_as'][b['attention']] for b in blocks]
        matrix = [t.get('kv_buffer', t.get('attention_matrix')) for t in own]
        ax_rank.plot(x, [t['output']['mean_rank'] for t in own], color=COLORS[kind], marker='s', label=f'{kind} output')
        ax_rank.plot(
            x,
            [m['mean_rank'] for m in matrix],
            color=COLORS[kind],
            marker='o',
            ls='--',
            label=f'{kind} {"KV buffer" if "kv_buffer" in own[0] else "attention matrix"}',
        )
        first = own[0]
        for ax, summary in ((ax_kv, first.get('kv_buffer', first.get('attention_matrix'))), (ax_out, first['output'])):
            spectrum = [statistics.fmean(values) for values in zip(*summary['spectrum'])]  # mean over heads
            name = ' attention matrix' if 'attention_matrix' in first and ax is ax_kv else ''
            ax.plot(
                range(1, len(spectrum) + 1),
                spectrum,
                color=COLORS[kind],
                label=f'{kind}{name} ({"x".join(map(str, summary["shape"]))}), rank {summary["mean_rank"]:.1f}',
            )
    names = [b['block'].replace('layers.', '').replace('.blocks.', '.') for b in blocks]
    ax_rank.plot(
        x,
        [min(b['tokens'], b['head_dim']) for b in blocks],
        color='gray',
        lw=0,
        marker='_',
        ms=16,
        label='max. rank of output, min(N, d)',
    )
    ax_rank.set_xticks(list(x), [f'{n}\nN={b["tokens"]}, d={b["head_dim"]}' for n, b in zip(names, blocks)])
    ax_rank.set_yscale('log', base=2)
    ax_rank.yaxis.set_major_formatter(FormatStrFormatter('%g'))
    ax_rank.set_xlabel('block i.j = layers.i.blocks.j: N tokens, head dim d')
    ax_rank.set_ylabel('rank (mean over heads and images)')
    ax_rank.set_title('ranks per block (solid: output features; dashed: KV buffer or attention matrix)', fontsize=10)
    ax_rank.legend(fontsize=7, ncol=2)
    for ax, title in ((ax_kv, 'KV buffer (attention matrix for softmax)'), (ax_out, 'output features')):
        ax.axhline(rtol, color='gray', lw=0.8, ls=':', label=f'rank tolerance {rtol:g}')
        ax.set_yscale('log')
        ax.set_xlabel('singular value index i')
        ax.set_ylabel('sigma_i / sigma_1 (mean over heads and images)')
        ax.set_title(f'{blocks[0]["block"]}: {title}')
        ax.legend(fontsize=7)
    fig.suptitle(f'{settings} (figure: first seed)', fontsize=9)
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, dpi=100, format='png')
    plt.close(fig)


def main(argv):
    args = get_args_parser().parse(argv)
    if len(args.input_size) > 2:
        raise UsageError('--input-size takes H or H W (height then width)')
    if len(set(args.kinds)) != len(args.kinds):
        raise UsageError('--kinds names a kind twice')
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    stage_kinds(args.model, args.model_kwargs, 'rala')  # the cost model can be ablated: checked before training
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    learning, learning_settings = measure_learning(args, args.kinds)
    summarise_learning(learning)
    cost, cost_settings = measure_cost(args, args.kinds)
    tables = cost_table(cost, cost_settings) + '\n\n' + learning_table(learning, learning_settings) + '\n'
    plot(learning, output_dir / 'ablation.png', learning_settings, args.rtol)
    for entry in learning.values():  # the rank reports stay in the training folders
        for run in entry['runs']:
            del run['ranks']
    result = {
        'command': ' '.join(['python scripts/ablation.py', *argv]),
        'cost_settings': cost_settings,
        'learning_settings': learning_settings,
        'cost': cost,
        'learning': learning,
    }
    with atomic_file(output_dir / 'ablation.json', 'w') as f:
        f.write(json.dumps(result, indent=1))
    with atomic_file(output_dir / 'ablation.md', 'w') as f:
        f.write(tables)
    print(tables)
    print(f'wrote {output_dir / "ablation.json"}, {output_dir / "ablation.md"} and {output_dir / "ablation.png"}')
    return result


if __name__ == '__main__':
    run_cli(main, sys.argv[1:])
