import pytest

from reliability_support import FAST, SLOW


@pytest.fixture
def home(tmp_path):
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def work(tmp_path):
    """The user's working folder, with the fast and slow presets in it."""
    path = tmp_path / "work"
    path.mkdir()
    (path / "fast.toml").write_text(FAST)
    (path / "slow.toml").write_text(SLOW)
    return path
