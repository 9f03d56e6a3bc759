"""The 2-processes-vs-1 checks' launcher: a test file run as a script under ``torchrun --standalone``
(gloo on CPU), its rank 0 saving the results to ``out``, which come back as a dict."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def two_process_results(script: str | Path, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(script).resolve()), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def results_fixture(script: str | Path):
    """A module-scoped ``two_process_results`` fixture: the 2-process results of ``script``, run once
    per module. In a test file: ``two_process_results = results_fixture(__file__)``."""

    @pytest.fixture(scope="module", name="two_process_results")
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> dict:
        return two_process_results(script, tmp_path_factory.mktemp(Path(script).stem) / "results.pt")

    return fixture


def save_and_leave(results: dict, out_path: str | Path) -> None:
    """The end of every worker: rank 0 saves ``results``; then every rank leaves the process group
    together (a rank exiting while the other is still inside a gloo call ends that one with
    "terminate called without an active exception" on loaded machines)."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()
