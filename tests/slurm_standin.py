"""Stand-in trainer for the SLURM launch tests: same process-group, signal and resume contract.

Takes `pretrain --config C key=value ... --resume auto` like `selfsup pretrain`, joins the process
group from the launcher's environment (gloo), all_gathers every step, checkpoints and exits on
SIGUSR1/SIGTERM at a step all ranks agree on, and resumes from run_dir/checkpoints/latest.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

stop = False


def _flag(signum, frame):
    global stop
    stop = True


def main() -> int:
    signal.signal(signal.SIGUSR1, _flag)
    signal.signal(signal.SIGTERM, _flag)
    kv = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a and not a.startswith("-"))
    run_dir = Path(kv["run_dir"])
    steps = int(kv.get("train.max_steps", "20"))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ckdir = run_dir / "checkpoints"
    step, value = 0, torch.zeros(1)
    if (ckdir / "latest").exists():
        ck = torch.load(ckdir / (ckdir / "latest").read_text().strip(), weights_only=True)
        step, value = ck["step"], ck["model"]["w"]
    with open(run_dir / "standin.jsonl", "a") as f:
        f.write(json.dumps({"rank": rank, "world": world, "start": step,
                            "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))}) + "\n")
    while step < steps:
        time.sleep(0.3)
        out = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(out, torch.tensor([float(rank + step)]))
        value = value + torch.cat(out).sum()
        step += 1
        flag = torch.tensor([1.0 if stop else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 or step == steps:
            if rank == 0:
                ckdir.mkdir(parents=True, exist_ok=True)
                name = f"step-{step:08d}.pt"
                torch.save({"model": {"w": value}, "step": step}, ckdir / name)
                (ckdir / "latest").write_text(name)
            dist.barrier()
            if flag.item() > 0:
                break
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
