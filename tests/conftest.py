import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("CTREDGE_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture
def criteo_sample() -> Path:
    """The 1,000 real Criteo rows (non-commercial licence: read in place, never copied)."""
    path = shared_data_dir() / "criteo" / "sample-1000.tsv"
    if not path.is_file():
        pytest.skip(f"real Criteo sample not found at {path} (set CTREDGE_SHARED_DATA to the folder holding criteo/)")
    return path
