"""Make `tests._procs` and friends importable however pytest is started; shared fixtures."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The README's demo dataset (real photos from scikit-image), built once per test run."""
    out = tmp_path_factory.mktemp("demo_data")
    subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--output",
                    str(out)], check=True, capture_output=True, timeout=300)
    return out
