"""scripts/compare_checkpoints.py, with which scripts/gpu_check.sh compares a run stopped and resumed on the GPU
node with one never stopped: "bit-identical", or what differs first and how many tensors differ."""

import pytest
import torch

import checkpoints


def test_compare_checkpoints_says_bit_identical_or_what_differs(tmp_path, capsys):
    from scripts import compare_checkpoints

    state = {
        'model': {'w': torch.arange(4.0)},
        'model_ema': {'w': torch.arange(4.0)},
        'optimizer': {'state': {0: {'exp_avg': torch.ones(4), 'step': torch.tensor(8.0)}}},
        'epoch': 1,
        'step': 8,
    }
    checkpoints.save_checkpoint(state, tmp_path / 'a.pth')
    checkpoints.save_checkpoint(state, tmp_path / 'b.pth')
    compare_checkpoints.command([str(tmp_path / 'a.pth'), str(tmp_path / 'b.pth')])
    assert capsys.readouterr().out == 'bit-identical\n'

    state['optimizer']['state'][0]['exp_avg'][2] += 1e-7
    state['model_ema']['w'][0] = -1.0
    checkpoints.save_checkpoint(state, tmp_path / 'b.pth')
    with pytest.raises(SystemExit) as stopped:
        compare_checkpoints.command([str(tmp_path / 'a.pth'), str(tmp_path / 'b.pth')])
    assert stopped.value.code == 1
    assert capsys.readouterr().out == '2 differences; first: model_ema.w: differs (largest difference 1)\n'

    state['step'] = 9
    checkpoints.save_checkpoint(state, tmp_path / 'b.pth')
    with pytest.raises(SystemExit):
        compare_checkpoints.command([str(tmp_path / 'a.pth'), str(tmp_path / 'b.pth')])
    assert capsys.readouterr().out.startswith('3 differences; first: step: 8 vs 9')
