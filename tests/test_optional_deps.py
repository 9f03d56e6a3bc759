"""tests/test_export_interop.py on a machine where torchvision is installed but built for another torch:
its torchvision test must skip with that reason, not fail. A real torchvision wheel (0.29.1,
which cannot load beside the CPU torch 2.13 these machines carry) is installed into a private
folder with pip and put on the path of a pytest subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TORCHVISION = "torchvision==0.29.1"


@pytest.fixture(scope="session")
def broken_torchvision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("torchvision")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), TORCHVISION],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"pip cannot install {TORCHVISION} here (no package registry?): {r.stderr.strip()[-300:]}")
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], env={**os.environ, "PYTHONPATH": str(target)},
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    if probe.returncode == 0:
        pytest.skip(f"{TORCHVISION} loads beside this torch: the broken case does not arise here")
    assert "torchvision::nms does not exist" in probe.stderr or "Error" in probe.stderr, probe.stderr
    return target


@pytest.mark.slow
def test_export_tests_skip_when_torchvision_cannot_load(broken_torchvision: Path) -> None:
    here = Path(__file__).parent
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        str(here / "test_export_interop.py"), "-k", "torchvision"],
                       env={**os.environ, "PYTHONPATH": str(broken_torchvision)}, capture_output=True, text=True,
                       timeout=600, cwd=here.parent)  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "1 skipped" in out and "cannot be loaded beside torch" in out, out
