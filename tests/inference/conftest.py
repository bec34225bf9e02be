import pytest
import torch


@pytest.fixture
def no_grad():
    """Inference tests: references run without autograd (the engine itself always does)."""
    with torch.no_grad():
        yield


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny fp64 models: one intra-op thread is as fast and does not fight over the shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
