"""The one way tests reach the shared data folder beside the repository.

The product never reads it; tests that need it call ``shared_path`` and are
skipped, with the reason, when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the shared data folder beside the repository ({'/'.join(('..', 'shared') + parts)} is absent)")
    return path
