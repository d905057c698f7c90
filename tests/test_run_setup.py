"""The run layer's setup, piece by piece: what torchrun and srun tell a process, the process group's timeout,
the data-loading workers per core, and gradients in their parameters' layout (what DDP's buckets expect)."""
import builtins
import datetime
import warnings

import pytest
import torch

import distributed
import main
import model_factory
import run
from cli import UsageError


def test_launch_environment_of_torchrun_srun_and_a_plain_process():
    torchrun = {'RANK': '3', 'WORLD_SIZE': '8', 'LOCAL_RANK': '3', 'MASTER_ADDR': 'node1', 'MASTER_PORT': '29400',
                'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'}
    assert distributed.launch_environment(torchrun) == {k: torchrun[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK',
                                                                         'MASTER_ADDR', 'MASTER_PORT')}
    srun = {'SLURM_PROCID': '9', 'SLURM_NTASKS': '16', 'SLURM_LOCALID': '1', 'SLURM_NODELIST': 'gpu[07-08],cpu1'}
    assert distributed.launch_environment(srun) == {'RANK': '9', 'WORLD_SIZE': '16', 'LOCAL_RANK': '1',
                                            'MASTER_ADDR': 'gpu07', 'MASTER_PORT': '29500'}
    assert distributed.launch_environment(dict(srun, MASTER_ADDR='head', MASTER_PORT='1234'))['MASTER_ADDR'] == 'head'
    # One srun task, or a batch script's own shell: a single process.
    assert distributed.launch_environment({'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'})['WORLD_SIZE'] == '1'
    assert distributed.launch_environment({}) == {'RANK': '0', 'WORLD_SIZE': '1', 'LOCAL_RANK': '0'}
    with pytest.raises(UsageError, match='under srun, set MASTER_ADDR'):
        distributed.launch_environment({'SLURM_PROCID': '1', 'SLURM_NTASKS': '2', 'SLURM_NODELIST': '['})
    assert [distributed.first_slurm_host(n) for n in ('node5', 'a[1-3]', 'gpu[003,7]', 'x-1,y-2')] == \
        ['node5', 'a1', 'gpu003', 'x-1']


def test_the_process_group_waits_as_long_as_dist_timeout(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch.distributed, 'init_process_group', lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: False)
    for name, value in {'RANK': '1', 'WORLD_SIZE': '2', 'LOCAL_RANK': '1'}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(builtins, 'print', builtins.print)  # rank 1 silences its print: undone after the test
    args = main.get_args_parser().parse(['--device', 'cpu', '--dist-timeout', '90'])
    with warnings.catch_warnings():
        distributed.init_distributed(args)
    assert (args.rank, args.world_size, args.distributed) == (1, 2, True)
    assert seen['backend'] == 'gloo' and seen['timeout'] == datetime.timedelta(minutes=90)
    assert main.get_args_parser().parse([]).dist_timeout == 60  # minutes: COCO scoring and large saves fit


def test_default_data_loading_workers_do_not_exceed_the_cores(monkeypatch, tmp_path):
    monkeypatch.setattr(run.os, 'sched_getaffinity', lambda pid: {0, 1})
    args = main.get_args_parser().parse(['--device', 'cpu', '--data-set', 'DIGITS'])
    run.Run(main.get_args_parser(), args)
    assert args.num_workers == 2  # not the recipe's 10 on a 2-core machine
    args = main.get_args_parser().parse(['--device', 'cpu', '--num_workers', '6'])
    run.Run(main.get_args_parser(), args)
    assert args.num_workers == 6  # asked for: as asked


def test_gradients_take_their_parameters_layout():
    """Without this, DDP warns "Grad strides do not match bucket view strides" on every run of RAVLT."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8))
    gamma = torch.nn.Parameter(torch.ones(1, 8, 1, 1))
    model.register_parameter('gamma', gamma)
    model_factory.match_gradient_layouts(model)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    (model(x) * gamma).square().sum().backward()
    for name, param in model.named_parameters():
        assert param.grad.stride() == param.stride(), name


def test_the_inference_form_applies_every_kind_of_fold_timm_knows():
    """for_inference (what every evaluation runs) folds a model whose modules only have timm's `fuse()`."""
    class Fusable(torch.nn.Module):
        def forward(self, x):
            return x + 1

        def fuse(self):
            return torch.nn.Identity()

    model = torch.nn.Sequential(Fusable())
    folded = model_factory.for_inference(model)
    assert isinstance(folded[0], torch.nn.Identity) and isinstance(model[0], Fusable)  # a copy was folded
