"""The run layer's setup, piece by piece: what torchrun and srun tell a process (and which GPU it takes), the
process group's timeout, the data-loading workers per core, parameters in their gradients' layout (what DDP's
buckets expect), cuDNN's benchmarking and --deterministic, and where an EMA kept on the CPU is evaluated. CUDA is
mocked where a test needs a CUDA run: no GPU is touched."""

import builtins
import datetime
import os
import warnings

import pytest
import torch

import distributed
import main
import model_factory
import run
import utils
from errors import UsageError


def test_launch_environment_of_torchrun_srun_and_a_plain_process():
    torchrun = {
        'RANK': '3',
        'WORLD_SIZE': '8',
        'LOCAL_RANK': '3',
        'MASTER_ADDR': 'node1',
        'MASTER_PORT': '29400',
        'SLURM_PROCID': '0',
        'SLURM_NTASKS': '1',
    }
    assert distributed.launch_environment(torchrun) == {
        k: torchrun[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')
    }
    # srun sets the step's task count (SLURM_STEP_NUM_TASKS) beside the job's (SLURM_NTASKS); the rendezvous is
    # on the step's first node, at a port of the job's own.
    srun = {
        'SLURM_PROCID': '9',
        'SLURM_NTASKS': '16',
        'SLURM_STEP_NUM_TASKS': '16',
        'SLURM_LOCALID': '1',
        'SLURM_STEP_NODELIST': 'gpu[07-08],cpu1',
        'SLURM_JOB_NODELIST': 'gpu[01-08],cpu1',
        'SLURM_JOB_ID': '123456',
    }
    assert distributed.launch_environment(srun) == {
        'RANK': '9',
        'WORLD_SIZE': '16',
        'LOCAL_RANK': '1',
        'MASTER_ADDR': 'gpu07',
        'MASTER_PORT': str(20000 + 123456 % 20000),
    }
    assert distributed.launch_environment(dict(srun, SLURM_JOB_ID='123457'))['MASTER_PORT'] == '23457'
    given = distributed.launch_environment(dict(srun, MASTER_ADDR='head', MASTER_PORT='1234'))
    assert (given['MASTER_ADDR'], given['MASTER_PORT']) == ('head', '1234')
    # One srun task, or a batch script's own shell with one task: a single process.
    assert distributed.launch_environment({'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'})['WORLD_SIZE'] == '1'
    assert distributed.launch_environment({}) == {'RANK': '0', 'WORLD_SIZE': '1', 'LOCAL_RANK': '0'}
    # A batch script of several tasks that runs python itself, not through srun: told how to launch.
    with pytest.raises(UsageError, match='SLURM_NTASKS is 4 but this process was not started by srun'):
        distributed.launch_environment({'SLURM_PROCID': '0', 'SLURM_NTASKS': '4'})
    with pytest.raises(UsageError, match='RANK=0 WORLD_SIZE=2 are set but not by a launcher'):
        distributed.launch_environment({'RANK': '0', 'WORLD_SIZE': '2'})
    assert [distributed.first_slurm_host(n) for n in ('node5', 'a[1-3]', 'gpu[003,7]', 'x-1,y-2')] == [
        'node5',
        'a1',
        'gpu003',
        'x-1',
    ]


def test_the_process_group_waits_as_long_as_dist_timeout(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch.distributed, 'init_process_group', lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: False)
    launched_by(monkeypatch, RANK='1', WORLD_SIZE='2', LOCAL_RANK='1', MASTER_ADDR='node1', MASTER_PORT='29400')
    monkeypatch.setattr(builtins, 'print', builtins.print)  # rank 1 silences its print: undone after the test
    args = main.get_args_parser().parse_args(['--device', 'cpu', '--dist-timeout', '90'])
    with warnings.catch_warnings():
        distributed.init_distributed(args)
    assert (args.rank, args.world_size, args.device, args.dist_backend) == (1, 2, torch.device('cpu'), 'gloo')
    assert seen == {'backend': 'gloo', 'timeout': datetime.timedelta(minutes=90), 'device_id': None}
    assert main.get_args_parser().parse_args([]).dist_timeout == 60  # minutes: COCO scoring and large saves fit


def test_default_data_loading_workers_do_not_exceed_the_cores(monkeypatch, tmp_path):
    launched_by(monkeypatch)
    monkeypatch.setattr(run.os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3})
    args = main.get_args_parser().parse_args(['--device', 'cpu', '--data-set', 'DIGITS'])
    run.Run(main.get_args_parser(), args)
    assert args.num_workers == 4  # not the recipe's 10 on a 4-core machine
    monkeypatch.setitem(os.environ, 'LOCAL_WORLD_SIZE', '2')  # torchrun: two processes on these cores
    args = main.get_args_parser().parse_args(['--device', 'cpu', '--data-set', 'DIGITS'])
    run.Run(main.get_args_parser(), args)
    assert args.num_workers == 2
    args = main.get_args_parser().parse_args(['--device', 'cpu', '--num_workers', '6'])
    run.Run(main.get_args_parser(), args)
    assert args.num_workers == 6  # asked for: as asked


class SlicedQkv(torch.nn.Module):
    """As RALA's qkvo: one 1x1 kernel used in slices (whose gradient comes contiguous), a depthwise kernel and a
    (1, C, 1, 1) layer scale, on channels-last activations."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Conv2d(8, 24, 1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gamma = torch.nn.Parameter(torch.ones(1, 8, 1, 1))

    def forward(self, x):
        parts = [
            torch.nn.functional.conv2d(x, self.qkv.weight[i * 8 : (i + 1) * 8], self.qkv.bias[i * 8 : (i + 1) * 8])
            for i in range(3)
        ]
        return self.gamma * self.dw(parts[0] * parts[1] + parts[2])


def test_parameters_take_their_gradients_layout_without_hooks():
    """DDP's buckets take the parameters' strides and warn "Grad strides do not match bucket view strides" (and
    copy the gradient every step) where a gradient comes with others: one backward before training gives each
    parameter its gradient's strides where only size-1 dimensions differ (the same memory); no hook runs in
    training. Two processes, no warning: tests/test_train_distributed.py."""
    torch.manual_seed(0)
    model = SlicedQkv()
    model_factory.channels_last_convs(model)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    model(x).square().sum().backward()
    mismatched = [name for name, p in model.named_parameters() if p.grad.stride() != p.stride()]
    assert mismatched == ['qkv.weight'], mismatched  # what this fixes
    model.zero_grad(set_to_none=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    model_factory.match_gradient_layouts(model, torch.zeros(1, 8, 4, 4))

    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())  # moved nothing
    assert all(p._backward_hooks is None and p._post_accumulate_grad_hooks is None for p in model.parameters())
    model(x).square().sum().backward()
    for name, param in model.named_parameters():
        assert param.grad.stride() == param.stride(), name


def cuda_run(monkeypatch, get_parser, argv, set_device=lambda index: None, device_count=1):
    """A Run set up as on a machine with CUDA (torch.cuda mocked: nothing here touches a GPU)."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: device_count)
    monkeypatch.setattr(torch.cuda, 'set_device', set_device)
    args = get_parser().parse_args(['--device', 'cuda', *map(str, argv)])
    return run.Run(get_parser(), args), args


def launched_by(monkeypatch, **env):
    """os.environ as a launcher leaves it (and as it was after the test)."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(('SLURM_', 'MASTER_', 'TORCHELASTIC'))
        and k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE')
    }
    monkeypatch.setattr(os, 'environ', dict(clean, **env))


@pytest.mark.parametrize('visible, device', [(1, 0), (8, 3)])
@pytest.mark.usefixtures('restores_kernel_settings')
def test_srun_with_one_gpu_per_task_takes_the_gpu_it_sees(monkeypatch, visible, device):
    """srun --gpus-per-task=1 (or --gpu-bind, a site's cgroups): the task of SLURM_LOCALID 3 sees one GPU, its
    own, as device 0; with all 8 visible it takes the 4th."""
    seen = {}
    launched_by(
        monkeypatch,
        SLURM_PROCID='3',
        SLURM_NTASKS='8',
        SLURM_STEP_NUM_TASKS='8',
        SLURM_LOCALID='3',
        SLURM_STEP_NODELIST='gpu[01-02]',
        SLURM_JOB_ID='7',
    )
    monkeypatch.setattr(torch.distributed, 'init_process_group', lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(builtins, 'print', builtins.print)  # rank 3 silences its print: undone after the test
    with warnings.catch_warnings():
        _, args = cuda_run(
            monkeypatch, main.get_args_parser, [], set_device=lambda i: seen.update(set_device=i), device_count=visible
        )
    assert (args.rank, args.world_size) == (3, 8)
    assert args.device == torch.device('cuda', device) and seen['set_device'] == device
    assert seen['backend'] == 'nccl' and seen['device_id'] == torch.device('cuda', device)
    assert (os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'], os.environ['LOCAL_RANK']) == ('gpu01', '20007', '3')


def test_a_task_seeing_several_gpus_but_fewer_than_its_local_rank_is_told_how_to_launch(monkeypatch):
    launched_by(
        monkeypatch,
        SLURM_PROCID='3',
        SLURM_NTASKS='8',
        SLURM_STEP_NUM_TASKS='8',
        SLURM_LOCALID='3',
        SLURM_STEP_NODELIST='gpu01',
    )
    with pytest.raises(UsageError, match='local rank 3 but this process sees 2 GPUs: start one process per GPU'):
        cuda_run(monkeypatch, main.get_args_parser, [], device_count=2)


@pytest.mark.usefixtures('restores_kernel_settings')
def test_cudnn_benchmarks_only_where_every_batch_has_one_size(monkeypatch, tmp_path):
    """Classification crops are one size: cuDNN may benchmark. Segmentation's padded batches and whole-image
    evaluation change size every batch: re-tuning every conv for each would cost time and memory."""
    import main_seg

    launched_by(monkeypatch)
    torch.backends.cudnn.benchmark = False
    cuda_run(monkeypatch, main.get_args_parser, ['--data-set', 'DIGITS', '--num_workers', '0'])
    assert torch.backends.cudnn.benchmark is True
    cuda_run(monkeypatch, main_seg.get_args_parser, ['--num_workers', '0'])
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.usefixtures('restores_kernel_settings')
def test_deterministic_sets_deterministic_kernels_before_any_work(monkeypatch):
    launched_by(monkeypatch)
    torch.backends.cudnn.benchmark = True
    cuda_run(monkeypatch, main.get_args_parser, ['--deterministic', '--data-set', 'DIGITS', '--num_workers', '0'])
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'
    assert torch.backends.cudnn.benchmark is False  # no benchmarking either


def test_an_ema_kept_on_the_cpu_is_evaluated_on_the_runs_device(monkeypatch):
    """--model-ema-force-cpu keeps the EMA's weights in host memory; its evaluation runs a copy on the run's
    device (CPU autocast in float16 would take hours per epoch). Here the run's device is 'meta'."""
    launched_by(monkeypatch)
    run_ = run.Run(main.get_args_parser(), main.get_args_parser().parse_args(['--device', 'cpu', '--num_workers', '0']))
    run_.device = torch.device('meta')
    ema = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    evaluated = run_._inference_copy(ema)
    assert utils.module_device(evaluated) == torch.device('meta') and not evaluated.training
    assert utils.module_device(ema) == torch.device('cpu') and ema.training  # the EMA itself stays


def test_the_inference_form_applies_every_kind_of_fold_timm_knows():
    """inference_form (what every evaluation runs) folds a model whose modules only have timm's `fuse()`."""

    class Fusable(torch.nn.Module):
        def forward(self, x):
            return x + 1

        def fuse(self):
            return torch.nn.Identity()

    model = torch.nn.Sequential(Fusable())
    folded = model_factory.inference_form(model)
    assert isinstance(folded[0], torch.nn.Identity) and isinstance(model[0], Fusable)  # a copy was folded
    assert model_factory.inference_form(model, inplace=True) is model and isinstance(model[0], torch.nn.Identity)
