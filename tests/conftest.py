"""Shared test setup: offline Hugging Face, quiet MLflow, CPU DeepSpeed, and the repo/shared paths."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in the interpreter on CPU tensors

from tests.helpers.paths import REPO, SHARED_DATA, TINY_DATA  # noqa: E402, F401


@pytest.fixture
def shared_corpus() -> Path:
    path = SHARED_DATA / "corpus"
    if not path.is_dir():
        pytest.skip(f"../shared/data/corpus is not present next to the repo ({path}); skipping the real-corpus test")
    return path


@pytest.fixture(scope="session")
def packed(tmp_path_factory) -> Path:
    """The demo's tokenizer and packed data (root/tokenizer.model, root/packed), built once per test session."""
    from fm_pretrain.demo import prepare_data

    root = tmp_path_factory.mktemp("demo_data")
    prepare_data(root)
    return root


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
