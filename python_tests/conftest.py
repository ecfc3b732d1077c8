"""python_tests is a package (each folder mirrors a part of hycam_ext), so pytest puts the
repository root on sys.path: the tests import the checkout's hycam_ext (with its in-place build)
and their helpers as python_tests.*; no test edits sys.path."""
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and the CUDA kernels")
    config.addinivalue_line("markers", "slow: longer-running test")


def pytest_collection_modifyitems(config, items):
    import hycam_ext
    has_gpu = torch.cuda.is_available() and hycam_ext.ops.cuda_kernels_available()
    skip = pytest.mark.skip(reason="needs a CUDA GPU and hycam_ext built with CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
