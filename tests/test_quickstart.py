"""The README's quick-start command, end to end on the embedded default (small model)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import force_unmount

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.mount


def test_quickstart_script(tmp_path: Path) -> None:
    env = dict(os.environ, CHUNKFS_QUICKSTART_DIR=str(tmp_path / "qs"), CHUNKFS_MODEL_SIZE="24M")
    try:
        result = subprocess.run(["bash", str(REPO / "scripts/quickstart.sh")], capture_output=True, text=True,
                                env=env, timeout=600, check=False)
    finally:
        force_unmount(tmp_path / "qs" / "mnt")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all equal to the source" in result.stdout
    assert "loaded 2 tensors (24 MiB)" in result.stdout
