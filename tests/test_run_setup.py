"""The run layer's setup, piece by piece: what torchrun and srun tell a process (and which GPU it takes), the
process group's timeout, the data-loading workers per core, parameters in their gradients' layout (what DDP's
buckets expect), cuDNN's benchmarking and --deterministic, and the precision of a CPU EMA's evaluation. CUDA is
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
from cli import UsageError


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
    srun = {'SLURM_PROCID': '9', 'SLURM_NTASKS': '16', 'SLURM_LOCALID': '1', 'SLURM_NODELIST': 'gpu[07-08],cpu1'}
    assert distributed.launch_environment(srun) == {
        'RANK': '9',
        'WORLD_SIZE': '16',
        'LOCAL_RANK': '1',
        'MASTER_ADDR': 'gpu07',
        'MASTER_PORT': '29500',
    }
    assert distributed.launch_environment(dict(srun, MASTER_ADDR='head', MASTER_PORT='1234'))['MASTER_ADDR'] == 'head'
    # One srun task, or a batch script's own shell: a single process.
    assert distributed.launch_environment({'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'})['WORLD_SIZE'] == '1'
    assert distributed.launch_environment({}) == {'RANK': '0', 'WORLD_SIZE': '1', 'LOCAL_RANK': '0'}
    with pytest.raises(UsageError, match='under srun, set MASTER_ADDR'):
        distributed.launch_environment({'SLURM_PROCID': '1', 'SLURM_NTASKS': '2', 'SLURM_NODELIST': '['})
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
    args = get_parser().parse(['--device', 'cuda', *map(str, argv)])
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
def test_srun_with_one_gpu_per_task_takes_the_gpu_it_sees(monkeypatch, visible, device):
    """srun --gpus-per-task=1 (or --gpu-bind, a site's cgroups): the task of SLURM_LOCALID 3 sees one GPU, its
    own, as device 0; with all 8 visible it takes the 4th."""
    seen = {}
    launched_by(monkeypatch, SLURM_PROCID='3', SLURM_NTASKS='8', SLURM_LOCALID='3', SLURM_NODELIST='gpu[01-02]')
    monkeypatch.setattr(torch.distributed, 'init_process_group', lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(distributed, 'watch_peers', lambda rank, world: seen.update(watched=(rank, world)))
    monkeypatch.setattr(builtins, 'print', builtins.print)  # rank 3 silences its print: undone after the test
    with warnings.catch_warnings():
        _, args = cuda_run(
            monkeypatch, main.get_args_parser, [], set_device=lambda i: seen.update(set_device=i), device_count=visible
        )
    assert (args.rank, args.world_size, args.local_rank) == (3, 8, 3)
    assert args.device == torch.device('cuda', device) and seen['set_device'] == device
    assert seen['backend'] == 'nccl' and seen['device_id'] == torch.device('cuda', device)
    assert seen['watched'] == (3, 8)


def test_a_task_seeing_several_gpus_but_fewer_than_its_local_rank_is_told_how_to_launch(monkeypatch):
    launched_by(monkeypatch, SLURM_PROCID='3', SLURM_NTASKS='8', SLURM_LOCALID='3', SLURM_NODELIST='gpu01')
    with pytest.raises(UsageError, match='local rank 3 but this process sees 2 GPUs: start one process per GPU'):
        cuda_run(monkeypatch, main.get_args_parser, [], device_count=2)


class Prepared(Exception):
    pass


def kernels_when_training(monkeypatch, run_, task) -> bool:
    """cudnn.benchmark as the run sets it before it prepares the model."""

    def stop(*args, **kwargs):
        raise Prepared(torch.backends.cudnn.benchmark)

    monkeypatch.setattr(run_, '_prepare_model', stop)
    with pytest.raises(Prepared) as prepared:
        run_.train(task)
    return prepared.value.args[0]


@pytest.mark.usefixtures('restores_kernel_settings')
def test_cudnn_benchmarks_only_where_every_batch_has_one_size(monkeypatch, tmp_path):
    """Classification crops are one size: cuDNN may benchmark. Segmentation's padded batches and whole-image
    evaluation change size every batch: re-tuning every conv for each would cost time and memory."""
    import main_seg
    from test_dense import TINY_JSON, write_ade

    launched_by(monkeypatch)
    classification, args = cuda_run(
        monkeypatch, main.get_args_parser, ['--data-set', 'DIGITS', '--model-kwargs', TINY_JSON, '--num_workers', '0']
    )
    assert kernels_when_training(monkeypatch, classification, main.build_task(args, classification)) is True
    write_ade(tmp_path, 'training')
    write_ade(tmp_path, 'validation', num_images=2)
    segmentation, args = cuda_run(
        monkeypatch,
        main_seg.get_args_parser,
        ['--data-path', tmp_path, '--model-kwargs', TINY_JSON, '--num_workers', '0'],
    )
    assert kernels_when_training(monkeypatch, segmentation, main_seg.build_task(args, segmentation)) is False


@pytest.mark.usefixtures('restores_kernel_settings')
def test_deterministic_sets_deterministic_kernels_before_any_work(monkeypatch):
    launched_by(monkeypatch)
    run_, args = cuda_run(
        monkeypatch, main.get_args_parser, ['--deterministic', '--data-set', 'DIGITS', '--num_workers', '0']
    )
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'
    assert kernels_when_training(monkeypatch, run_, main.build_task(args, run_)) is False  # no benchmarking either


def test_an_ema_kept_on_the_cpu_beside_a_cuda_run_evaluates_in_float32(monkeypatch):
    """--model-ema-force-cpu with the run's fp16 on CUDA: CPU autocast in float16 would take hours per epoch.
    The model on the run's device evaluates in the run's precision."""
    launched_by(monkeypatch)
    run_, args = cuda_run(
        monkeypatch,
        main.get_args_parser,
        ['--data-set', 'DIGITS', '--num_workers', '0', '--model-ema-force-cpu', '--input-size', '8'],
    )
    assert args.amp == 'fp16' and run_.amp_dtype == torch.float16
    task = main.build_task(args, run_)
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self, device):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1, device=device))

        def forward(self, x):
            seen.append(torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None)
            raise Prepared

    with pytest.raises(Prepared):
        task.evaluate(Probe('cpu'), [(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))])
    assert run_.device.type == 'cuda' and seen == [None]
    monkeypatch.setattr(run_, 'device', torch.device('cpu'))
    assert run_.precision(Probe('cpu')) == torch.float16  # on the run's device: the run's precision


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
