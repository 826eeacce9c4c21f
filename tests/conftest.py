"""Shared fixtures: offline hub, deterministic seeds, GPU skip marker."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if not _has_cuda():  # Triton kernels run on CPU tensors in the interpreter; must be set before triton imports
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # pytest-xdist: the cores are shared
torch.set_num_threads(max(1, min(4, (os.cpu_count() or 1) // _WORKERS)))


def pytest_report_header(config):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return ("CUDA is visible, so the Triton interpreter is off: run the GPU tests with `-m gpu`; the rest is the "
                "CPU suite (models built on CPU with the Triton backend), run it as CI does with CUDA_VISIBLE_DEVICES=")
    return None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
