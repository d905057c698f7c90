import pytest
import torch


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (the measuring scripts' tests: steady, and no oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restores_kernel_settings(monkeypatch):
    """The process-wide settings a run may change (cuDNN's, --deterministic's), as they were after the test."""
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', torch.backends.cudnn.benchmark)
    monkeypatch.setattr(torch.backends.cudnn, 'deterministic', torch.backends.cudnn.deterministic)
    monkeypatch.setenv('CUBLAS_WORKSPACE_CONFIG', 'unset')
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG')
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Every test compiles from scratch. torch.compile remembers the shapes it saw for a function; seeing another
    shape later it traces symbolically (automatic dynamic shapes), which made a later test's compile 4-6x slower."""
    yield
    if hasattr(torch, '_dynamo'):
        torch._dynamo.reset()
