import pytest
import torch


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (the measuring scripts' tests: steady, and no oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
