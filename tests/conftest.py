import os

# Tests never reach the Hugging Face Hub; the demo model and data ship with the package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own WORKBENCH_HOME (history database, caches)."""
    home = tmp_path_factory.mktemp("wbhome")
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread avoids OpenMP spin-waits on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Each folder is an area of the product; its name is a marker (``-m tui``, ``-m "engine and not slow"``).
AREAS = ("engine", "lowrank", "structured", "quantization", "data", "evaluation", "cli", "workers", "tui", "reliability", "project")


def pytest_collection_modifyitems(config, items):
    for item in items:
        area = item.path.parent.name
        if area in AREAS:
            item.add_marker(getattr(pytest.mark, area))
