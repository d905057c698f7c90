"""RALA's two rank augmentations switched off one at a time, beside plain linear and softmax attention: the
paper's ablation in one command.

Each kind of `attn_types` (linear, rala_no_alpha, rala_no_gate_lepe, rala, softmax; docs/ablation.md) takes the
place of RALA in the stages that have it, and for each kind this measures
- cost, of --model at --input-size H [W]: parameters, FLOPs as scripts/flops.py counts them, and eval and train
  images/s and the peak memory of one step, all kinds side by side (scripts/benchmark.py's method);
- learning: a main.py training with --train-config (default: the demo recipe) per kind and seed, --jobs at a time,
  one thread each: top-1 of the final weights and of their EMA, and per stage the ranks of the KV buffer (the
  attention matrix for softmax) and of the output features (scripts/rank_analysis.py on each checkpoint).

Writes ablation.json, ablation.md (the two tables) and ablation.png (ranks per block, spectra of the first block)
into --output_dir; the trainings go to OUTPUT_DIR/CONFIG-KEY/KIND-seedS, KEY a hash of the training settings: a
rerun with the same settings resumes them (a finished one only re-reads its log), other settings train anew.

    python scripts/ablation.py --output_dir output/ablation
    python scripts/ablation.py --quick --output_dir output/ablation_quick
"""

import hashlib
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's modules

import torch

import figures
import rank_analysis
from benchmark import Contender, Settings, add_arguments, benchmark, build_model, progress
from cli import COUNT, NON_NEGATIVE_INT, POSITIVE, ArgumentParser, json_object, one_line_errors, read_config
from errors import RunFailure, UsageError
from flops import input_size, markdown_table, measure
from models import ATTENTION_TYPES
from utils import atomic_file

KINDS = list(ATTENTION_TYPES)
COLORS = {'linear': 'C0', 'rala_no_alpha': 'C4', 'rala_no_gate_lepe': 'C1', 'rala': 'C3', 'softmax': 'C2'}
TIME = 'The default run takes about 25 minutes on 2 idle CPU cores, --quick about 7 (docs/ablation.md).'
QUICK = {'seeds': [0], 'batch_size': 4, 'warmup': 1, 'iters': 3}  # --quick, where no flag says otherwise; 2 epochs
QUICK_EPOCHS = 2
COST_KEYS = ('params', 'flops', 'flops_no_attn')


def get_args_parser():
    description = __doc__.split('\n\n')[0] + ' ' + TIME
    parser = ArgumentParser('ablation.py', description=description, with_config=False)
    parser.add_argument('--kinds', nargs='+', choices=KINDS, default=KINDS, metavar='KIND', help=', '.join(KINDS))
    parser.add_argument('--model', default='RAVLT_T', help='the model whose cost is measured')
    parser.add_argument('--model-kwargs', type=json_object, default=None, metavar='JSON', help='its arguments')
    parser.add_argument('--input-size', type=COUNT, nargs='+', default=[224], metavar=('H', 'W'), help='its input')
    add_arguments(parser, batch_size=16, warmup=3, iters=10, authors=False)
    parser.add_argument('--train-config', default='configs/demo_digits.yaml', help='main.py config of the trainings')
    parser.add_argument('--seeds', type=NON_NEGATIVE_INT, nargs='+', default=[0, 1, 2], metavar='SEED')
    parser.add_argument('--jobs', type=COUNT, default=os.cpu_count() or 1, help='trainings at a time')
    parser.add_argument('--num-images', type=COUNT, default=4, help='validation images of the rank analysis')
    parser.add_argument('--rtol', type=POSITIVE, default=1e-3, help='rank: singular values above rtol x the largest')
    parser.add_argument('--quick', action='store_true', help='seed 0, 2 epochs; batch 4, 1 + 3 timed steps')
    parser.add_argument('--output_dir', '--output-dir', required=True)
    return parser


# ---- the models of the ablation ----
def with_kind(name: str, model_kwargs, kind: str) -> dict:
    """The model's keyword arguments with `kind` in place of RALA in its attn_types."""
    with torch.device('meta'):
        base = getattr(build_model(name, 0, model_kwargs), 'attn_types', None)
    if base is None or 'rala' not in base:
        raise UsageError(
            f'{name} with --model-kwargs {json.dumps(model_kwargs)} has no RALA stage to ablate; use a RAVLT model '
            'with "rala" in its attn_types'
        )
    return dict(model_kwargs or {}, attn_types=[kind if t == 'rala' else t for t in base])


# ---- cost: params, FLOPs, speed and memory side by side ----
def measure_cost(args) -> tuple:
    """({kind: cost}, settings line): params and FLOPs, then every kind's eval and train step in one benchmark."""
    settings = Settings.from_args(args, input_size=input_size(args.input_size), memory=True)
    cost, contenders = {}, []
    for kind in args.kinds:
        kwargs = with_kind(args.model, args.model_kwargs, kind)
        progress(f'{kind}: counting FLOPs')
        row = measure(args.model, settings.input_size, model_kwargs=kwargs)
        cost[kind] = {'attn_types': kwargs['attn_types'], **{k: row[k] for k in COST_KEYS}}
        contenders += [Contender(args.model, mode, model_kwargs=kwargs, label=kind) for mode in ('eval', 'train')]
    for contender, row in zip(contenders, benchmark(contenders, settings)):
        keys = ('img_per_s', 'img_per_s_p25', 'img_per_s_p75', 'peak_mib')
        cost[contender.label][contender.mode] = {k: row[k] for k in keys}
    return cost, f'{args.model}, ' + settings.describe()


# ---- learning: trainings and the rank analysis of their checkpoints ----
def run_logged(command, log: Path, what: str):
    """Run a command with its output in `log`; a failure ends the ablation in one line: the command's last line,
    exit 2 where the command took its input for bad, else 1."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))  # the demo's operations are tiny
    with open(log, 'w') as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code:
        lines = log.read_text().strip().splitlines()
        message = f'{what} failed (exit {code}): {lines[-1] if lines else "no output"} (output in {log})'
        raise UsageError(message) if code == 2 else RunFailure(message)


def train_and_analyse(job: dict, args) -> dict:
    """One training (resumed if its folder holds one) and the rank analysis of its checkpoint."""
    folder, what = job['folder'], f'{job["kind"]} seed {job["seed"]}'
    folder.parent.mkdir(parents=True, exist_ok=True)
    progress(f'{what}: training in {folder}')
    train = [sys.executable, 'main.py', '--config', str(Path(args.train_config).resolve()), '--epochs', job['epochs']]
    train += ['--model-kwargs', json.dumps(job['model_kwargs']), '--seed', job['seed'], '--output_dir', folder]
    run_logged(list(map(str, train)), folder.with_suffix('.train.log'), f'training {what}')
    progress(f'{what}: rank analysis')
    rank = [sys.executable, 'scripts/rank_analysis.py', '--checkpoint', folder / 'checkpoint.pth', '--rtol', args.rtol]
    rank += ['--num-images', args.num_images, '--output_dir', folder / 'rank']
    run_logged(list(map(str, rank)), folder.with_suffix('.rank.log'), f'rank analysis of {what}')
    last = json.loads((folder / 'log.txt').read_text().splitlines()[-1])
    if last['epoch'] != job['epochs'] - 1:
        raise RunFailure(f'{folder / "log.txt"} ends at epoch {last["epoch"]}, not {job["epochs"] - 1}')
    return {
        'seed': job['seed'],
        'acc1': last['test_acc1'],
        'ema_acc1': last.get('test_ema_acc1'),
        'loss': last['test_loss'],
        'folder': str(folder),
        'ranks': json.loads((folder / 'rank' / 'rank.json').read_text()),
    }


def measure_learning(args) -> tuple:
    """({kind: {'attn_types': ..., 'runs': [per seed]}}, settings line)."""
    config = read_config(args.train_config)  # main.py checks it when it trains
    name, kwargs, epochs = config.get('model', 'RAVLT_T'), config.get('model-kwargs'), config.get('epochs')
    epochs = min(epochs, QUICK_EPOCHS) if args.quick and isinstance(epochs, int) else epochs
    if not isinstance(epochs, int):
        raise UsageError(f'--train-config {args.train_config} must set epochs (the trainings are checked against it)')
    # The trainings' folder is keyed by everything that sets them: another config (or --quick) never reuses them.
    key = hashlib.sha256(json.dumps([config, epochs], sort_keys=True).encode()).hexdigest()[:8]
    folder = Path(args.output_dir).resolve() / f'{Path(args.train_config).stem}-{key}'
    kinds = {kind: with_kind(name, kwargs, kind) for kind in args.kinds}
    learning = {kind: {'attn_types': model_kwargs['attn_types'], 'runs': []} for kind, model_kwargs in kinds.items()}
    jobs = [
        {
            'kind': kind,
            'seed': seed,
            'epochs': epochs,
            'model_kwargs': kinds[kind],
            'folder': folder / f'{kind}-seed{seed}',
        }
        for kind in args.kinds
        for seed in args.seeds
    ]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(train_and_analyse, job, args) for job in jobs]
        try:
            for job, future in zip(jobs, futures):
                learning[job['kind']]['runs'].append(future.result())
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a failure ends the ablation: the waiting trainings never start
            raise
    line = (
        f'{name} {json.dumps(kwargs)} trained with {args.train_config} ({epochs} epochs, in {folder.name}), seeds '
        f'{", ".join(map(str, args.seeds))}; ranks: {args.num_images} validation images, float64, singular values '
        f'above {args.rtol:g} x the largest'
    )
    return learning, line


def summarise_learning(learning: dict):
    """Adds each kind's accuracies and losses (one per seed) and, per stage, the mean ranks (over its blocks, their
    heads, the images and the seeds) of the blocks' own kind: KV buffer or attention matrix, and output."""
    for entry in learning.values():
        for key in ('acc1', 'ema_acc1', 'loss'):
            entry[key] = [run[key] for run in entry['runs']]
        stages = {}
        for block in (b for run in entry['runs'] for b in run['ranks']['blocks']):
            terms = block['computed_as'][block['attention']]
            matrix = 'kv_buffer' if 'kv_buffer' in terms else 'attention_matrix'
            keys = {k: block[k] for k in ('attention', 'tokens', 'head_dim')}
            stage = stages.setdefault(block['block'].split('.blocks.')[0], {**keys, 'matrix': matrix, 'ranks': []})
            stage['ranks'].append((terms[matrix]['mean_rank'], terms['output']['mean_rank']))
        entry['stages'] = []
        for stage in stages.values():
            matrix_ranks, output_ranks = zip(*stage.pop('ranks'))
            means = {'matrix_rank': statistics.fmean(matrix_ranks), 'output_rank': statistics.fmean(output_ranks)}
            entry['stages'].append({**stage, **means})


# ---- the tables and the figure ----
def spread(values, digits: int = 2) -> str:
    mean = f'{statistics.fmean(values):.{digits}f}'
    return mean if len(values) == 1 else f'{mean} ({min(values):.{digits}f}-{max(values):.{digits}f})'


def cost_table(cost: dict, settings: str) -> str:
    reference, cells = cost.get('rala'), []
    for c in cost.values():
        cells.append([', '.join(c['attn_types']), *(f'{c[k] / d:.3f}' for k, d in zip(COST_KEYS, (1e6, 1e9, 1e9)))])
        for m, mode in ((c[mode], mode) for mode in ('eval', 'train')):
            ratio = f' x{m["img_per_s"] / reference[mode]["img_per_s"]:.2f}' if reference else ''
            cells[-1].append(f'{m["img_per_s"]:.1f} ({m["img_per_s_p25"]:.1f}-{m["img_per_s_p75"]:.1f}){ratio}')
        cells[-1] += [f'{c[mode]["peak_mib"]:.0f}' for mode in ('eval', 'train')]
    header = ['attention per stage', 'params (M)', 'GFLOPs', 'GFLOPs w/o attention products', 'eval img/s']
    header += ['train img/s', 'eval peak MiB', 'train peak MiB']
    title = f'Cost: {settings}; img/s: median (25th-75th percentile), x: relative to rala'
    return f'{title}\n\n{markdown_table(header, cells)}'


def learning_table(learning: dict, settings: str) -> str:
    stages = next(iter(learning.values()))['stages']
    # Stages with softmax in every row (the same kind) are left out.
    shown = [i for i in range(len(stages)) if any(e['stages'][i]['attention'] != 'softmax' for e in learning.values())]
    header = ['attention per stage', 'top-1 %', 'EMA top-1 %', 'test loss']
    for i in shown:
        s = stages[i]
        header.append(
            f'stage {i + 1} KV buffer rank (of d = {s["head_dim"]}) / attention matrix* (of N = {s["tokens"]})'
        )
        header.append(f'stage {i + 1} output rank (of {min(s["tokens"], s["head_dim"])})')
    cells = []
    for e in learning.values():
        cells.append([', '.join(e['attn_types']), spread(e['acc1']), spread(e['ema_acc1']), spread(e['loss'], 4)])
        for s in (e['stages'][i] for i in shown):
            star = '*' if s['matrix'] == 'attention_matrix' else ''
            cells[-1] += [f'{s["matrix_rank"]:.1f}{star}', f'{s["output_rank"]:.1f}']
    title = f'Learning: {settings}; top-1 and loss of the final weights: mean (min-max) over seeds, ranks: mean over '
    title += 'blocks, heads, images and seeds'
    note = '*: softmax attention has no KV buffer; its N x N attention matrix instead.'
    return f'{title}\n\n{markdown_table(header, cells)}\n\n{note}'


def plot(learning: dict, path: Path, settings: str, rtol: float):
    """Each kind's ranks per block (output solid, KV buffer or attention matrix dashed) and the spectra of the first
    block (mean over heads), from the first seed's checkpoint."""
    ranks, spectra = [], [('KV buffer (attention matrix for softmax)', []), ('output features', [])]
    for kind, e in learning.items():
        blocks = e['runs'][0]['ranks']['blocks']
        own = [b['computed_as'][b['attention']] for b in blocks]
        matrices = [terms.get('kv_buffer', terms.get('attention_matrix')) for terms in own]
        style = dict(color=COLORS[kind], marker='s')
        ranks.append((f'{kind} output', dict(enumerate(t['output']['mean_rank'] for t in own)), style))
        name = 'KV buffer' if 'kv_buffer' in own[0] else 'attention matrix'
        ranks.append(
            (f'{kind} {name}', dict(enumerate(m['mean_rank'] for m in matrices)), dict(style, ls='--', marker='o'))
        )
        for (_, curves), summary in zip(spectra, (matrices[0], own[0]['output'])):
            spectrum = [statistics.fmean(values) for values in zip(*summary['spectrum'])]  # mean over heads
            shape = 'x'.join(map(str, summary['shape']))
            curves.append((f'{kind} ({shape}), rank {summary["mean_rank"]:.1f}', spectrum, dict(color=COLORS[kind])))
    spectra = [(f'{blocks[0]["block"]}: {title}, mean over heads', curves) for title, curves in spectra]
    rank_analysis.draw(path, blocks, ranks, spectra, rtol, f'{settings} (figure: first seed)')


def main(args):
    for key, value in QUICK.items():
        if args.quick and key not in args.given:
            setattr(args, key, value)
    if len(set(args.kinds)) != len(args.kinds):
        raise UsageError('--kinds names a kind twice')
    input_size(args.input_size)
    with_kind(args.model, args.model_kwargs, 'rala')  # the cost model can be ablated: checked before training
    figures.pyplot()  # a missing matplotlib is one line, before the trainings
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    learning, learning_settings = measure_learning(args)
    summarise_learning(learning)
    cost, cost_settings = measure_cost(args)
    tables = cost_table(cost, cost_settings) + '\n\n' + learning_table(learning, learning_settings) + '\n'
    plot(learning, output_dir / 'ablation.png', learning_settings, args.rtol)
    for entry in learning.values():  # the rank reports stay in the training folders
        for run in entry['runs']:
            del run['ranks']
    settings = {k: v for k, v in vars(args).items() if k != 'given'}
    result = {'settings': settings, 'cost_settings': cost_settings, 'learning_settings': learning_settings}
    result.update(cost=cost, learning=learning)
    with atomic_file(output_dir / 'ablation.json', 'w') as f:
        f.write(json.dumps(result, indent=1))
    with atomic_file(output_dir / 'ablation.md', 'w') as f:
        f.write(tables)
    print(tables)
    print(f'wrote {output_dir / "ablation.json"}, {output_dir / "ablation.md"} and {output_dir / "ablation.png"}')
    return result


if __name__ == '__main__':
    with one_line_errors():
        main(get_args_parser().parse_args())
