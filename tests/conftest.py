"""Test-wide settings: no network, one thread per process (2-core CI), deterministic seeds."""

import os

# Set before torch is imported anywhere: oversubscribed OpenMP threads make tiny models 10-25x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """A tiny random SD-shaped diffusers folder (see tests/tiny.py), written once per test session."""
    from tests.tiny import save_tiny_sd_folder

    return save_tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd") / "sd")
