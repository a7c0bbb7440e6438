"""
Shared test fixtures. Tests are hermetic: every test gets its own temporary base dir (never
~/.cache/nanochat), no network, wandb disabled. Real data comes from ../shared/data (override the
location with NANOCHAT_SHARED_DATA).
"""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("NANOCHAT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

os.environ.setdefault("WANDB_MODE", "disabled")
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    """A fresh NANOCHAT_BASE_DIR for each test."""
    path = tmp_path / "nanochat_base"
    path.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: the real small data sets the tests use."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set NANOCHAT_SHARED_DATA to its path")
    return SHARED_DATA
