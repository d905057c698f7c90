"""engine.train_one_epoch in each precision on the CPU, and evaluate's exact counts."""
import math

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

import engine
import main
from train_helpers import TINY_MODEL_KWARGS, one_thread

pytestmark = pytest.mark.usefixtures('one_thread')

CPU = torch.device('cpu')


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

    stats = engine.train_one_epoch(model=model, criterion=torch.nn.CrossEntropyLoss(), data_loader=loader,
                                   optimizer=optimizer, device=CPU, epoch=0, scaler=scaler,
                                   amp_dtype=main.AMP_DTYPES[amp], print_freq=100)

    assert math.isfinite(stats['loss']) and stats['lr'] == 1e-3
    assert head_dtypes == [main.AMP_DTYPES[amp] or torch.float32] * 2
    after = dict(model.named_parameters())
    assert all(after[k].dtype == torch.float32 for k in after)
    assert sum(not torch.equal(before[k], after[k]) for k in after) == len(after)
    assert scaler.is_enabled() == (amp == 'fp16')


def test_evaluate_counts_top1_and_top5_exactly():
    # The "model" passes logits through: sample i has its target at rank ranks[i] (0 = top-1).
    ranks = [0, 0, 0, 1, 2, 4, 4, 5, 7, 9]
    logits = torch.arange(10, 0, -1, dtype=torch.float32).repeat(10, 1)  # class c at rank c
    targets = torch.tensor(ranks)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(logits, targets), batch_size=3)
    stats = engine.evaluate(loader, torch.nn.Identity(), CPU)
    assert stats['acc1'] == pytest.approx(30.0) and stats['acc5'] == pytest.approx(70.0)
    expected_loss = torch.nn.functional.cross_entropy(logits, targets).item()
    assert stats['loss'] == pytest.approx(expected_loss)
