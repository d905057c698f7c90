"""engine.train_one_epoch in each precision on the CPU; evaluate's exact counts, where the model is; the
generators seeded from (seed, epoch, rank, position)."""
import math

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

import engine
import utils
from errors import UsageError
from train_helpers import TINY_MODEL_KWARGS

pytestmark = pytest.mark.usefixtures('one_thread')

CPU = torch.device('cpu')


def cross_entropy(model, images, targets):
    return {'loss': torch.nn.functional.cross_entropy(model(images), targets)}


@pytest.mark.parametrize('amp', ['none', 'bf16', 'fp16'])
def test_training_in_each_precision_on_cpu(amp):
    torch.manual_seed(0)
    model = timm.create_model('ravlt_t', num_classes=10, **TINY_MODEL_KWARGS)
    before = {k: v.clone() for k, v in model.named_parameters()}
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    head_dtypes = []
    model.head.register_forward_hook(lambda module, inputs, output: head_dtypes.append(output.dtype))
    optimizer = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05)
    scaler = torch.amp.GradScaler('cpu', enabled=amp == 'fp16')

    result = engine.train_one_epoch(model, cross_entropy, loader, optimizer, scaler, CPU, 0,
                                    amp_dtype=utils.AMP_DTYPES[amp], print_freq=100)

    assert math.isfinite(result.stats['loss']) and result.stats['lr'] == 1e-3
    assert (result.steps, result.global_step, result.stopped) == (2, 2, False)
    assert head_dtypes == [utils.AMP_DTYPES[amp] or torch.float32] * 2
    after = dict(model.named_parameters())
    assert all(after[k].dtype == torch.float32 for k in after)
    assert sum(not torch.equal(before[k], after[k]) for k in after) == len(after)
    assert scaler.is_enabled() == (amp == 'fp16')


def test_loss_parts_are_logged_beside_the_total_and_a_stop_request_ends_the_epoch():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    data = torch.utils.data.TensorDataset(torch.randn(12, 4), torch.randint(0, 2, (12,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)

    def two_parts(model, x, y):
        out = model(x)
        return {'loss_a': torch.nn.functional.cross_entropy(out, y), 'loss_b': out.square().mean()}

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    requests = iter([False, True, False])
    result = engine.train_one_epoch(model, two_parts, loader, optimizer, torch.amp.GradScaler('cpu', enabled=False),
                                    CPU, 3, global_step=30, stop_requested=lambda: next(requests), print_freq=100)
    assert result.stopped and (result.steps, result.global_step) == (2, 32)  # stopped after the step that saw it
    assert result.stats['loss'] == pytest.approx(result.stats['loss_a'] + result.stats['loss_b'])
    assert result.totals['loss_a'][1] == 2


def test_evaluate_counts_top1_and_top5_exactly():
    # The "model" passes logits through: sample i has its target at rank ranks[i] (0 = top-1).
    ranks = [0, 0, 0, 1, 2, 4, 4, 5, 7, 9]
    logits = torch.arange(10, 0, -1, dtype=torch.float32).repeat(10, 1)  # class c at rank c
    targets = torch.tensor(ranks)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(logits, targets), batch_size=3)
    stats = engine.evaluate(loader, torch.nn.Identity())
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
        engine.evaluate([(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))], Probe())
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
        sampler = utils.SeededSampler(torch.utils.data.RandomSampler(range(12), generator=torch.Generator().manual_seed(0)),
                                      seed=5, rank=1)
        sampler.set_epoch(2)
        sampler.skip(skip)
        loader = torch.utils.data.DataLoader(utils.SeededDataset(Noisy()), sampler=sampler, batch_size=4,
                                             num_workers=workers)
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

    loader = torch.utils.data.DataLoader(utils.SeededDataset(torch.utils.data.Subset(Broken(), [0, 2])),
                                         sampler=utils.SeededSampler(range(2), 0, 0), batch_size=2,
                                         collate_fn=utils.collate_or_error(torch.utils.data.default_collate))
    with pytest.raises(UsageError, match='^/data/val/2.jpg: image file is truncated'):
        engine.check_batch(next(iter(loader)))
