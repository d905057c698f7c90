"""scripts/rank_analysis.py and scripts/plot_logs.py: ranks, the analysed terms against the model, files written."""

import argparse
import json
import subprocess
import sys

import pytest
import timm
import torch
from PIL import Image

import checkpoints
import plot_logs
import rank_analysis
from cli import one_line_errors
from errors import UsageError
from helpers import ROOT
from models import reference

pytestmark = pytest.mark.usefixtures('one_thread')
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def analyse(*argv):
    rank_analysis.main(rank_analysis.get_args_parser().parse_args(argv))


def plot(*argv):
    plot_logs.main(plot_logs.get_args_parser().parse_args(argv))


def tiny_ravlt():
    """A three-stage float64 RAVLT (RALA, plain linear attention, softmax) with every weight randomised, norms and
    biases included."""
    torch.manual_seed(0)
    model = (
        timm.create_model(
            'ravlt_t',
            num_classes=10,
            embed_dims=(16, 32, 32),
            depths=(1, 1, 1),
            num_heads=(1, 2, 2),
            attn_types=('rala', 'linear', 'softmax'),
            projection_dim=32,
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        img.verify()


def test_rank_of_constructed_matrices_is_recovered():
    torch.manual_seed(0)
    ranks = torch.tensor([[1, 5], [12, 20]])
    singular = torch.logspace(0, -2, 20, dtype=torch.float64)  # all well above rtol = 1e-3 of the largest
    matrices = torch.zeros(2, 2, 30, 20, dtype=torch.float64)
    for i in range(2):
        for h in range(2):
            r = int(ranks[i, h])
            u, _ = torch.linalg.qr(torch.randn(30, r, dtype=torch.float64))
            w, _ = torch.linalg.qr(torch.randn(20, r, dtype=torch.float64))
            matrices[i, h] = 3.0 * (u * singular[:r]) @ w.T
    matrices[1, 1] += 1e-9 * torch.randn(30, 20, dtype=torch.float64)  # noise far below the tolerance
    summary = rank_analysis.summarise(matrices, rtol=1e-3)
    assert summary['rank'] == ranks.tolist()
    assert summary['shape'] == [30, 20]
    spectrum = torch.tensor(summary['spectrum'], dtype=torch.float64)  # mean over the two images, per head
    expected = torch.zeros(2, 2, 20, dtype=torch.float64)
    for i in range(2):
        for h in range(2):
            expected[i, h, : ranks[i, h]] = singular[: ranks[i, h]]
    torch.testing.assert_close(spectrum, expected.mean(0), rtol=0, atol=1e-8)
    # sigma_i / sigma_0 = 10^(-2i/19) > 0.5 for i = 0, 1, 2 only.
    assert rank_analysis.summarise(matrices, rtol=0.5)['rank'] == [[1, 3], [3, 3]]
    assert rank_analysis.summarise(torch.zeros(1, 1, 4, 3, dtype=torch.float64), 1e-3)['rank'] == [[0]]


def test_analysed_terms_reproduce_the_model():
    """The block's own kind, through the reference, gives what the model's module computes; each block is also
    computed as every kind its weights allow; the ranks respect their bounds."""
    model = tiny_ravlt()
    outputs = {}
    for name, attn, _ in rank_analysis.attention_modules(model):
        attn.register_forward_hook(lambda m, args, out, name=name: outputs.__setitem__(name, out))
    images = torch.randn(2, 3, 40, 24, dtype=torch.float64)
    inputs = {}
    with torch.no_grad():
        for name, attn, _ in rank_analysis.attention_modules(model):
            attn.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
        model(images)
        for name, attn, angle in rank_analysis.attention_modules(model):
            x = inputs[name]
            B, C, H, W = x.shape
            terms = reference.attention_terms(attn, x, angle)
            torch.testing.assert_close(
                attn.proj(terms['output'].transpose(-1, -2).reshape(B, C, H, W)), outputs[name], rtol=1e-12, atol=1e-13
            )
    assert sorted(outputs) == ['layers.0.blocks.0', 'layers.1.blocks.0', 'layers.2.blocks.0']

    rala, linear, softmax = rank_analysis.analyse(model, images, rtol=1e-3)
    assert [b['attention'] for b in (rala, linear, softmax)] == ['rala', 'linear', 'softmax']
    assert list(rala['computed_as']) == ['rala', 'linear', 'rala_no_alpha', 'rala_no_gate_lepe']
    assert list(linear['computed_as']) == ['linear', 'rala_no_gate_lepe']
    assert list(softmax['computed_as']) == ['softmax']
    assert (rala['tokens'], rala['heads'], rala['head_dim']) == (60, 1, 16)
    assert rala['computed_as']['rala']['kv_buffer']['shape'] == [16, 16]
    assert rala['computed_as']['rala']['output']['shape'] == [60, 16]
    assert softmax['computed_as']['softmax']['attention_matrix']['shape'] == [6, 6]
    # The KV buffer does not depend on LePE and gate.
    assert rala['computed_as']['rala']['kv_buffer'] == rala['computed_as']['rala_no_gate_lepe']['kv_buffer']
    assert rala['computed_as']['linear']['kv_buffer'] == rala['computed_as']['rala_no_alpha']['kv_buffer']
    # Without LePE and gate, out = RoPE(q') kv: the output's rank is at most the KV buffer's.
    for block in (rala, linear):
        for kind in ('linear', 'rala_no_gate_lepe'):
            summary = block['computed_as'][kind]
            for out_ranks, kv_ranks in zip(summary['output']['rank'], summary['kv_buffer']['rank']):
                assert all(o <= k for o, k in zip(out_ranks, kv_ranks))


TINY_KWARGS = {'embed_dims': [16, 32, 32, 32], 'depths': [2, 1, 1, 1], 'num_heads': [1, 2, 2, 4], 'projection_dim': 32}


def run_rank_analysis(tmp_path, *extra):
    out = tmp_path / 'rank'
    analyse('--num-images', '2', '--input-size', '32', '--output_dir', out, *extra)
    assert_png(out / 'rank.png')
    return json.loads((out / 'rank.json').read_text())


@pytest.mark.slow  # DIGITS and a figure; the checkpoint test below runs in every tier
def test_rank_analysis_writes_png_and_json(tmp_path):
    report = run_rank_analysis(tmp_path, '--model', 'RAVLT_T', '--model-kwargs', json.dumps(TINY_KWARGS))
    assert report['weights'] == 'random init (no checkpoint)' and report['images'] == '2 DIGITS val images'
    assert report['model'] == 'ravlt_t' and report['input_size'] == [3, 32, 32]
    assert report['spectra_block'] == 'layers.0.blocks.0'
    assert [b['block'] for b in report['blocks']] == [
        'layers.0.blocks.0',
        'layers.0.blocks.1',
        'layers.1.blocks.0',
        'layers.2.blocks.0',
        'layers.3.blocks.0',
    ]
    assert [b['attention'] for b in report['blocks']] == ['rala'] * 3 + ['softmax'] * 2
    assert [b['tokens'] for b in report['blocks']] == [64, 64, 16, 4, 1]
    stage2 = report['blocks'][2]['computed_as']['rala']
    assert len(stage2['kv_buffer']['rank']) == 2 and len(stage2['kv_buffer']['rank'][0]) == 2  # images, heads
    assert stage2['kv_buffer']['shape'] == [16, 16] and stage2['output']['shape'] == [16, 16]


def test_rank_analysis_with_checkpoint_and_image_folder(tmp_path):
    # A checkpoint as main.py writes it: the model settings and input size come from its `args`.
    torch.manual_seed(0)
    trained = timm.create_model('ravlt_t', num_classes=10, **TINY_KWARGS)
    ckpt = tmp_path / 'checkpoint.pth'
    torch.save(
        {
            'model': trained.state_dict(),
            'epoch': 3,
            'args': {'model': 'RAVLT_T', 'model-kwargs': TINY_KWARGS, 'input-size': 48},
        },
        ckpt,
    )
    folder = tmp_path / 'images'
    folder.mkdir()
    for i in range(3):
        Image.new('RGB', (50, 40), (60 * i, 20, 200)).save(folder / f'{i}.png')
    (folder / 'notes.txt').write_text('not an image')
    out = tmp_path / 'rank'
    analyse(
        '--checkpoint',
        ckpt,
        '--images',
        folder,
        '--num-images',
        2,
        '--spectra-block',
        'layers.2.blocks.0',
        '--output_dir',
        out,
    )
    report = json.loads((out / 'rank.json').read_text())
    assert (
        report['weights'] == f'checkpoint {tmp_path.name}/checkpoint.pth'
        and report['images'] == f'2 images from {folder}'
    )
    assert report['input_size'] == [3, 48, 48]  # the training size stored in the checkpoint
    assert report['blocks'][2]['tokens'] == 36 and report['spectra_block'] == 'layers.2.blocks.0'
    assert_png(out / 'rank.png')
    # The authors' checkpoints keep their settings in an argparse.Namespace.
    assert checkpoints.flags_of({'args': argparse.Namespace(input_size=224)})['input_size'] == 224
    assert checkpoints.flags_of({'args': {'input-size': 48}})['input_size'] == 48


def test_rank_analysis_bad_input_is_one_line(tmp_path, capsys):
    tiny = ['--model-kwargs', json.dumps(TINY_KWARGS)]
    with pytest.raises(UsageError, match='--spectra-block layers.9.blocks.0 is not an attention block'):
        run_rank_analysis(tmp_path, *tiny, '--spectra-block', 'layers.9.blocks.0')
    with pytest.raises(UsageError, match='no .jpg/.png images in'):
        run_rank_analysis(tmp_path, *tiny, '--images', str(tmp_path))
    # The script's entry point: cli.one_line_errors turns the UsageError into one line and exit code 2.
    with pytest.raises(SystemExit) as exit_info, one_line_errors():
        analyse('--checkpoint', tmp_path / 'none.pth', '--output_dir', tmp_path / 'out')
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f'error: checkpoint {tmp_path / "none.pth"} does not exist']
    assert not (tmp_path / 'out').exists()


def write_log(folder, entries):
    folder.mkdir()
    (folder / 'log.txt').write_text(''.join(json.dumps(e) + '\n' for e in entries))
    return str(folder)


def test_plot_logs_writes_png(tmp_path):
    with_ema = write_log(
        tmp_path / 'a',
        [
            {
                'epoch': e,
                'n_parameters': 10,
                'train_loss': 2.0 / (e + 1),
                'train_lr': 1e-3,
                'test_acc1': 10.0 * e,
                'test_acc5': 50.0,
                'test_loss': 1.0,
                'test_ema_acc1': 9.0 * e,
            }
            for e in range(4)
        ],
    )
    resumed_no_ema = write_log(
        tmp_path / 'b',
        [
            {'epoch': 0, 'train_loss': 2.0, 'train_lr': 1e-3, 'test_acc1': 5.0},
            {'epoch': 1, 'train_loss': 1.5, 'train_lr': 1e-3, 'test_acc1': 7.0},
            {'epoch': 1, 'train_loss': 1.4, 'train_lr': 1e-3, 'test_acc1': 8.0},
        ],
    )
    logs = [plot_logs.read_log(with_ema), plot_logs.read_log(resumed_no_ema)]
    assert list(logs[1]) == [0, 1] and logs[1][1]['test_acc1'] == 8.0  # the later line of a re-logged epoch
    plot(with_ema, resumed_no_ema, '--labels', 'ema', 'no ema')
    assert_png(tmp_path / 'a' / 'curves.png')
    out = tmp_path / 'cmp.png'
    plot(resumed_no_ema, '--output', out)
    assert_png(out)
    assert [key for key, _ in plot_logs.logged_panels(logs)] == ['train_loss', 'train_lr', 'test_acc1', 'test_ema_acc1']


def test_plot_logs_draws_the_metrics_of_dense_runs(tmp_path, capsys):
    detection = write_log(
        tmp_path / 'det',
        [
            {
                'epoch': e,
                'step': 2 * e + 2,
                'train_loss': 1.0 / (e + 1),
                'train_loss_classifier': 0.5,
                'train_lr': 1e-4,
                'test_bbox_AP': 10.0 * e,
                'test_bbox_APl': None,
                'test_segm_AP': 8.0 * e,
            }
            for e in range(3)
        ],
    )
    segmentation = write_log(
        tmp_path / 'seg',
        [
            {'epoch': 0, 'step': 2, 'train_loss': 2.0, 'train_lr': 1e-4},
            {'epoch': 1, 'step': 4, 'train_loss': 1.0, 'train_lr': 1e-4, 'test_mIoU': 30.0, 'test_mAcc': 40.0},
        ],
    )
    out = tmp_path / 'dense.png'
    plot(detection, segmentation, '--output', out)
    assert_png(out)
    logs = [plot_logs.read_log(detection), plot_logs.read_log(segmentation)]
    assert [key for key, _ in plot_logs.logged_panels(logs)] == [
        'train_loss',
        'train_lr',
        'test_bbox_AP',
        'test_segm_AP',
        'test_mIoU',
    ]
    printed = capsys.readouterr().out
    assert 'det: 3 epochs, best box AP 20.00, best mask AP 16.00' in printed
    assert 'seg: 2 epochs, best mIoU 30.00' in printed


@pytest.mark.parametrize(
    'content, message',
    [
        (None, 'log.txt does not exist; pass the output folders of training runs'),
        ('', 'is empty'),
        ('{"epoch": 0, "train_loss": 1.0}\n{"epoch": 1, "train_loss"\n', 'line 2 is not JSON'),
        ('{"train_loss": 1.0}\n', 'line 1 has no integer "epoch"'),
    ],
)
@pytest.mark.slow
def test_plot_logs_bad_input_is_one_line(tmp_path, content, message):
    run = tmp_path / 'run'
    if content is not None:
        run.mkdir()
        (run / 'log.txt').write_text(content)
    result = subprocess.run(
        [sys.executable, 'scripts/plot_logs.py', str(run)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0]
    assert not (run / 'curves.png').exists()


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--input-size', '-5'], r'argument --input-size: must be in \[1, inf\), got -5'),
        (['--output_dir', 'FILE'], '--output_dir .*FILE: File exists'),
        (['--output_dir', 'FILE/rank'], '--output_dir .*FILE/rank: Not a directory'),
        (['--output_dir', 'OUT', '--model', 'convnext_atto', '--model-kwargs', '{}'], 'convnext_atto has no RAVLT'),
    ],
)
def test_rank_analysis_checks_its_input_and_output_before_the_analysis(argv, message, tmp_path, monkeypatch):
    (tmp_path / 'FILE').write_text('not a folder')
    monkeypatch.setattr(rank_analysis, 'analyse', lambda *a: pytest.fail('analysed before the checks'))
    argv = [a.replace('FILE', str(tmp_path / 'FILE')).replace('OUT', str(tmp_path / 'out')) for a in argv]
    with pytest.raises(UsageError, match=message):
        analyse('--model-kwargs', json.dumps(TINY_KWARGS), '--input-size', '32', *argv)
    assert (tmp_path / 'FILE').read_text() == 'not a folder' and not (tmp_path / 'out').exists()


def test_plot_logs_never_writes_over_a_file_that_is_no_figure(tmp_path):
    """issue 27: `--output RUN/checkpoint.pth` replaced the checkpoint with a PNG and exited 0."""
    run = write_log(tmp_path / 'run', [{'epoch': 0, 'train_loss': 1.0}])
    (tmp_path / 'run' / 'checkpoint.pth').write_bytes(b'weights')
    for name in ('checkpoint.pth', 'log.txt', 'curves'):
        with pytest.raises(UsageError, match=f'--output .*{name}: expected a file name ending in .png'):
            plot(run, '--output', tmp_path / 'run' / name)
    assert sorted(p.name for p in (tmp_path / 'run').iterdir()) == ['checkpoint.pth', 'log.txt']
    assert (tmp_path / 'run' / 'checkpoint.pth').read_bytes() == b'weights'


def test_a_missing_matplotlib_is_one_line_naming_the_install(tmp_path, monkeypatch):
    run = write_log(tmp_path / 'run', [{'epoch': 0, 'train_loss': 1.0}])
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # `import matplotlib` raises ImportError
    with pytest.raises(UsageError, match=r'figures need matplotlib: pip install "matplotlib>=3.7"'):
        plot(run)
    monkeypatch.setattr(rank_analysis, 'load_model', lambda *a: pytest.fail('worked before the check'))
    with pytest.raises(UsageError, match=r'figures need matplotlib: pip install "matplotlib>=3.7"'):
        analyse('--output_dir', tmp_path / 'rank')
    assert not (tmp_path / 'run' / 'curves.png').exists() and not (tmp_path / 'rank').exists()
