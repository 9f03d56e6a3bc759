"""``train.precision=auto`` on the CPU: bf16 only where oneDNN has bf16 kernels, checked against the
CPU's own flags in /proc/cpuinfo (oneDNN's bf16 path needs AVX-512 F, BW, VL and DQ; without them
bf16 autocast is emulated and a demo step was measured 24x slower than fp32)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from selfsup.config import load_config
from selfsup.pretrain.loop.train import auto_precision, cpu_runs_bf16, make_accelerator


def cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(), reason="x86-64 Linux")
def test_cpu_bf16_follows_the_avx512_flags():
    avx512_core = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpuinfo_flags()
    assert cpu_runs_bf16() == avx512_core, sorted(f for f in cpuinfo_flags() if f.startswith("avx"))


def fresh_accelerator(precision: str):
    """An Accelerator as a run builds it, after clearing what an earlier one left in this process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return make_accelerator(load_config(None, [f"train.precision={precision}"]))


def test_auto_precision_on_this_cpu(capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    accelerator = fresh_accelerator("auto")
    want = "bf16" if cpu_runs_bf16() else "no"
    assert accelerator.mixed_precision == want
    assert f"train.precision=auto: {'bf16' if want == 'bf16' else 'fp32'} (this CPU" in capsys.readouterr().out
    assert auto_precision(cuda=False, cpu_bf16=False)[0] == "fp32"
    assert auto_precision(cuda=False, cpu_bf16=True)[0] == "bf16"
    if not torch.cuda.is_available():
        assert fresh_accelerator("bf16").mixed_precision == "bf16"  # asked for: kept
    fresh_accelerator("fp32")  # leave the process as the other in-process tests expect it
