"""bf16 autocast vs fp32 for one SimCLR demo-recipe training step on this CPU, side by side.

Why ``train.precision=auto`` picks fp32 on a CPU without oneDNN bf16 kernels (AVX2 only): there
bf16 is emulated. Measured 2026-12-07 on an AMD EPYC (AVX2, 2 cores), batch 128, 2 threads,
best of 3 after a warm-up step, two alternating rounds: fp32 402 / 422 ms, bf16 9602 / 10029 ms
per step (24x).

    .venv/bin/python benchmarks/bench_precision.py
"""

from __future__ import annotations

from functools import partial

import torch
from _common import CONFIGS, Device

from selfsup.config import load_config
from selfsup.data_info import DataInfo
from selfsup.pretrain.build import build_method
from selfsup.pretrain.loop.train import cpu_runs_bf16


def main() -> None:
    torch.set_num_threads(2)
    print(f"oneDNN bf16 kernels on this CPU: {cpu_runs_bf16()}")
    model = build_method(load_config(CONFIGS / "simclr_demo.yaml", []), DataInfo(1, 28, (0.5,), (0.25,))).train()
    x = torch.randint(0, 256, (128, 1, 28, 28), dtype=torch.uint8)

    def step(bf16: bool) -> None:  # forward (views included) and backward
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model(x)
        loss.backward()

    for precision in ("fp32", "bf16", "fp32", "bf16"):  # alternating rounds
        timing = Device(cuda=False).time_ms(partial(step, precision == "bf16"), reps=3)
        print(f"{precision}: {timing['min_ms']:.0f} ms per step (batch 128)")


if __name__ == "__main__":
    main()
