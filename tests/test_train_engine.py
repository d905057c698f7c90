"""engine.train_one_epoch in each precision on the CPU, the host reads of its steps (one per --print-freq steps)
and a non-finite loss; evaluate's exact counts, where the model is; the generators seeded from (seed, epoch,
rank, position); a sample that cannot be loaded named."""

import math
import re

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

import engine
import main
import utils
from errors import UsageError
from train_helpers import TINY, TINY_MODEL_KWARGS, run_here

pytestmark = pytest.mark.usefixtures('one_thread')

CPU = torch.device('cpu')


class WithLosses(torch.nn.Module):
    """A model that returns its losses (as torchvision's detectors and our segmenters do): `losses(output, y)`."""

    def __init__(self, model, losses):
        super().__init__()
        self.model, self.losses = model, losses

    def forward(self, x, y):
        return self.losses(self.model(x), y)


@pytest.mark.parametrize('amp', ['none', 'bf16', 'fp16'])
def test_training_in_each_precision_on_cpu(amp):
    torch.manual_seed(0)
    model = timm.create_model('ravlt_t', num_classes=10, **TINY_MODEL_KWARGS)
    before = {k: v.clone() for k, v in model.named_parameters()}
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    head_dtypes = []
    model.head.register_forward_hook(lambda module, inputs, output: head_dtypes.append(output.dtype))
    optimizer = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05, **engine.optimizer_options('adamw'))
    scaler = engine.grad_scaler(CPU, utils.AMP_DTYPES[amp])

    result = engine.train_one_epoch(
        model,
        torch.nn.CrossEntropyLoss(),
        loader,
        optimizer,
        scaler,
        CPU,
        0,
        amp_dtype=utils.AMP_DTYPES[amp],
        print_freq=100,
    )

    assert math.isfinite(result.stats['loss']) and result.stats['lr'] == 1e-3
    assert (result.steps, result.global_step, result.stopped) == (2, 2, False)
    assert head_dtypes == [utils.AMP_DTYPES[amp] or torch.float32] * 2
    after = dict(model.named_parameters())
    assert all(after[k].dtype == torch.float32 for k in after)
    assert sum(not torch.equal(before[k], after[k]) for k in after) == len(after)
    assert scaler.get_scale() == (2.0**16 if amp == 'fp16' else 1.0)  # dynamic loss scaling for float16 only


def test_loss_parts_are_logged_beside_the_total_and_a_stop_request_ends_the_epoch():
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(12, 4), torch.randint(0, 2, (12,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)

    def two_parts(out, y):
        return {'loss_a': torch.nn.functional.cross_entropy(out, y), 'loss_b': out.square().mean()}

    model = WithLosses(torch.nn.Linear(4, 2), two_parts)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    requests = iter([True, False, False])
    result = engine.train_one_epoch(
        model,
        None,
        loader,
        optimizer,
        engine.grad_scaler(CPU, None),
        CPU,
        3,
        global_step=30,
        stop_requested=lambda: next(requests),
        print_freq=2,
    )
    assert result.stopped and (result.steps, result.global_step) == (2, 32)  # at the first read after the request
    assert result.stats['loss'] == pytest.approx(result.stats['loss_a'] + result.stats['loss_b'])
    assert result.totals['loss_a'][1] == 2


def test_evaluate_counts_top1_and_top5_exactly():
    # The "model" passes logits through: sample i has its target at rank ranks[i] (0 = top-1).
    ranks = [0, 0, 0, 1, 2, 4, 4, 5, 7, 9]
    logits = torch.arange(10, 0, -1, dtype=torch.float32).repeat(10, 1)  # class c at rank c
    targets = torch.tensor(ranks)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(logits, targets), batch_size=3)
    stats = engine.evaluate(torch.nn.Identity(), loader)
    assert stats['acc1'] == pytest.approx(30.0) and stats['acc5'] == pytest.approx(70.0)
    expected_loss = torch.nn.functional.cross_entropy(logits, targets).item()
    assert stats['loss'] == pytest.approx(expected_loss)


def test_evaluate_runs_where_the_model_is():
    """--model-ema-force-cpu keeps the EMA on the CPU while training runs on CUDA: evaluation moves the images
    to the model, not to the training device. Here: a model on 'meta' receives meta images."""

    class Seen(Exception):
        pass

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1, device='meta'))

        def forward(self, x):
            raise Seen(x.device)

    with pytest.raises(Seen) as seen:
        engine.evaluate(Probe(), [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))])
    assert seen.value.args[0] == torch.device('meta')
    assert utils.module_device(torch.nn.Identity()) == CPU


def test_seeded_loading_is_the_same_for_any_worker_count_and_skips_exactly():
    """Each sample's augmentation is seeded from (seed, epoch, rank, position): the same batches whichever
    worker loads them, and a loader that skips the first k positions yields the rest unchanged."""

    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            import random

            import numpy as np

            return torch.tensor([i, torch.rand(()).item(), random.random(), np.random.rand()])

    def batches(workers, skip=0):
        sampler = utils.SeededSampler(
            torch.utils.data.RandomSampler(range(12), generator=torch.Generator().manual_seed(0)), seed=5, rank=1
        )
        sampler.set_epoch(2)
        sampler.skip(skip)
        loader = torch.utils.data.DataLoader(
            utils.SeededDataset(Noisy()), sampler=sampler, batch_size=4, num_workers=workers
        )
        return [b for b in loader]

    alone, with_workers, skipped = batches(0), batches(2), batches(0, skip=4)
    assert len(alone) == len(with_workers) == 3
    for a, b in zip(alone, with_workers):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(alone[1:], skipped)) and len(skipped) == 2
    assert len({round(float(v), 6) for batch in alone for v in batch[:, 1]}) == 12  # every sample its own draws


def test_a_sample_that_fails_to_load_names_its_file():
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            if i == 2:
                raise OSError('image file is truncated (3 bytes not processed)')
            return torch.zeros(2)

        def sample_path(self, i):
            return f'/data/val/{i}.jpg'

    loader = torch.utils.data.DataLoader(
        utils.SeededDataset(torch.utils.data.Subset(Broken(), [0, 2])),
        sampler=utils.SeededSampler(range(2), 0, 0),
        batch_size=2,
        collate_fn=utils.collate_or_error(torch.utils.data.default_collate),
    )
    with pytest.raises(UsageError, match=r'^cannot load /data/val/2.jpg: image file is truncated \(3 bytes'):
        utils.checked(next(iter(loader)))


class HostReads:
    """Counts the reads of tensor values on the host (Tensor.item, tolist, cpu, numpy, bool, float, int) made while
    `counting`, outside data loading: on CUDA each would wait for the device (a host synchronisation). Data
    loading runs on the host anyway (its tensors are never on the device), so its reads are not counted."""

    METHODS = ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__float__', '__int__', '__index__')

    def __init__(self, monkeypatch):
        self.count, self.counting, self.loading = 0, False, 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(original))
        iterator = torch.utils.data.dataloader._BaseDataLoaderIter
        monkeypatch.setattr(iterator, '__next__', self._loading(iterator.__next__))
        loader = torch.utils.data.DataLoader
        monkeypatch.setattr(loader, '__iter__', self._loading(loader.__iter__))

    def _counted(self, original):
        def read(tensor, *args, **kwargs):
            if self.counting and not self.loading:
                self.count += 1
            return original(tensor, *args, **kwargs)

        return read

    def _loading(self, original):
        def load(loader_or_iterator):
            self.loading += 1
            try:
                return original(loader_or_iterator)
            finally:
                self.loading -= 1

        return load


@pytest.mark.slow
@pytest.mark.parametrize('extra', [[], ['--clip-grad', '1.0', '--amp', 'bf16']])
def test_twenty_training_steps_read_the_device_twice_at_print_freq_10(monkeypatch, extra):
    """The training step reads nothing on the host: the losses (and a stop request) are read every --print-freq
    steps in one go; fused AdamW and the loss scaler skip a non-finite step on the device. Counted over one epoch
    of 20 steps of the real entry point (FAKE: 1,024 images, batch 50), the EMA and --clip-grad included; the run
    ends there (as by Ctrl-C)."""
    reads = HostReads(monkeypatch)
    train_one_epoch, epochs = engine.train_one_epoch, []

    def counted(*args, **kwargs):
        reads.count, reads.counting = 0, True
        try:
            result = train_one_epoch(*args, **kwargs)
        finally:
            reads.counting = False
        epochs.append((result.steps, reads.count))
        raise KeyboardInterrupt  # nothing more to count

    monkeypatch.setattr(engine, 'train_one_epoch', counted)
    args = TINY + [
        '--data-set',
        'FAKE',
        '--batch-size',
        '50',
        '--epochs',
        '1',
        '--warmup-epochs',
        '0',
        '--aa',
        'none',
        '--mixup',
        '0',
        '--cutmix',
        '0',
        '--no-repeated-aug',
        '--print-freq',
        '10',
        *extra,
    ]
    result = run_here(main, args)
    assert result.returncode == 130, result.stderr
    assert epochs == [(20, 2)]
    printed = [re.match(r'Epoch: \[0\] \[ *(\d+)/20\]', line) for line in result.stdout.splitlines()]
    assert [int(found.group(1)) for found in printed if found] == [9, 19]  # printed where read


def test_the_loop_reads_the_host_once_per_print_freq_steps(monkeypatch):
    """train_one_epoch alone, with what a run gives it (fused AdamW, the loss scaler, a schedule stepped per
    update, timm's EMA, --clip-grad, a stop check): 20 steps at print_freq 10 read the host twice."""
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(5)
    )
    model(torch.zeros(2, 3, 6, 6))
    data = torch.utils.data.TensorDataset(torch.randn(40, 3, 6, 6), torch.randint(0, 5, (40,)))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, **engine.optimizer_options('adamw'))
    scheduler, _ = create_scheduler_v2(
        optimizer, 'cosine', num_epochs=2, warmup_epochs=1, step_on_epochs=False, updates_per_epoch=20
    )
    ema = ModelEmaV3(model, decay=0.9, use_warmup=True)
    reads = HostReads(monkeypatch)
    reads.counting = True
    result = engine.train_one_epoch(
        model,
        torch.nn.CrossEntropyLoss(),
        loader,
        optimizer,
        engine.grad_scaler(CPU, None),
        CPU,
        0,
        lr_scheduler=scheduler,
        model_ema=ema,
        max_norm=1.0,
        stop_requested=lambda: False,
        print_freq=10,
    )
    reads.counting = False
    assert (result.steps, reads.count) == (20, 2)
    assert not torch.equal(ema.module[0].weight, model[0].weight)  # the EMA was updated, blended


def test_a_non_finite_loss_never_updates_the_weights_and_stops_at_the_next_read_naming_its_step():
    """Step 3's loss is infinite while its gradients are finite (a -inf logit of a wrong class has none): the step
    is skipped on the device, the steps after it run until the read at step 5, which stops naming step 3."""
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 4), torch.randint(0, 3, (24,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    weights, calls = [], [0]

    def loss(out, y):
        calls[0] += 1
        weights.append(model.model.weight.detach().clone())
        if calls[0] == 4:  # step 3
            return {'loss': torch.nn.functional.cross_entropy(out, y) + float('inf') * (out.detach().sum() * 0 + 1)}
        return {'loss': torch.nn.functional.cross_entropy(out, y)}

    model = WithLosses(torch.nn.Linear(4, 3), loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, **engine.optimizer_options('adamw'))
    with pytest.raises(FloatingPointError, match=r'^loss is inf at epoch 0, step 3 of 6; training stopped'):
        engine.train_one_epoch(model, None, loader, optimizer, engine.grad_scaler(CPU, None), CPU, 0, print_freq=5)
    assert calls[0] == 5  # the read after step 4 (the 5th) found it
    assert torch.equal(weights[3], weights[4])  # step 3 changed nothing
    assert not torch.equal(weights[2], weights[3]) and not torch.equal(weights[4], model.model.weight)  # the others did
