"""launch/cluster/pretrain_multi_node.sbatch on a real two-node SLURM cluster (tests/slurm_netns.py:
one slurmd per network namespace, slurmctld and munged in the root namespace).

Two jobs, submitted together with ``sbatch --nodes=2``: an uninterrupted one, and one that
``scontrol requeue`` interrupts after its first checkpoints (slurmctld kills both nodes' steps and
puts the job back in the queue; the requeued job runs the script again and ``--resume auto``
continues). Checks: the trainers of each job ran in the two node namespaces (seen from /proc while
they train), met as world size 2 at node0, and the requeued job's checkpoints and metrics equal the
uninterrupted job's bitwise.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from pathlib import Path

import psutil
import pytest
from faultruns import ckpts, differences, rows
from slurm_cluster import SlurmUnavailable
from slurm_netns import start_two_node_cluster
from test_train import SMALL

from selfsup.pretrain.run.rundir import load_checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "launch" / "cluster" / "pretrain_multi_node.sbatch"
RECIPE = REPO / "configs" / "simclr_demo.yaml"
STEPS, EVERY = 18, 3
OVERRIDES = [*SMALL, f"train.max_steps={STEPS}", f"train.checkpoint_every={EVERY}",
             "train.keep_checkpoints=0", "log.wandb=off", "train.dist_timeout_s=30"]  # fmt: skip
# CPU nodes: one trainer per node over gloo; the script's #SBATCH GPU and CPU requests overridden.
SBATCH_ARGS = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


@pytest.fixture(scope="module")
def cluster():
    try:
        c, nodes = start_two_node_cluster(cpus=3)
    except SlurmUnavailable as e:
        pytest.skip(f"no private two-node SLURM cluster on this machine: {e}")
    yield c, nodes
    c.stop()


def job_env() -> dict[str, str]:
    """An activated environment (this interpreter first on PATH) asking for CPU trainers."""
    return {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "ACCELERATE_USE_CPU": "1",
            "SELFSUP_NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1", "SELFSUP_RDZV_TIMEOUT": "60",
            "WANDB_MODE": "offline", "WANDB_SILENT": "true"}  # fmt: skip


def trainer_netns(run: Path) -> set[int]:
    """Network-namespace inodes of the trainer processes (``python -m selfsup.launch.cli``, not
    their launchers) training into ``run`` right now."""
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        trainer = cmd and Path(cmd[0]).name.startswith("python") and "accelerate" not in " ".join(cmd[:3])
        if trainer and "selfsup.launch.cli" in cmd and f"run_dir={run}" in cmd:
            with contextlib.suppress(OSError):  # ended meanwhile
                found.add(os.stat(f"/proc/{p.pid}/ns/net").st_ino)
    return found


# How each interrupted job is stopped once it has a checkpoint: by slurmctld (the steps on both
# nodes killed, the job put back in the queue), or by the script's own time-limit path (USR1 to the
# batch shell, as --signal=B:USR1@300 sends it: forwarded through srun to both nodes' trainers,
# which checkpoint; then the script requeues itself).
INTERRUPT = {"requeued": ("scontrol", "requeue"), "preempted": ("scancel", "-b", "-s", "USR1")}
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


@pytest.fixture(scope="module")
def jobs(cluster, small_shards: str, tmp_path_factory):
    """The uninterrupted job and the interrupted ones, all submitted at once."""
    slurm, nodes = cluster
    work = tmp_path_factory.mktemp("slurm2")
    t0 = time.monotonic()
    ids = {name: slurm.sbatch(*SBATCH_ARGS, f"--chdir={work}", str(SBATCH), str(RECIPE), small_shards,
                              str(work / name), *OVERRIDES, env=job_env())
           for name in ("ref", *INTERRUPT)}  # fmt: skip

    def out(name: str) -> str:
        path = work / f"selfsup-{ids[name]}.out"
        return path.read_text() if path.exists() else "<no output file>"

    seen: dict[str, set[int]] = {name: set() for name in ids}
    before: dict[str, int] = {}
    tick = 0
    while len(before) < len(INTERRUPT) or any(slurm.job(i)["JobState"] not in DONE for i in ids.values()):
        for name, cmd in INTERRUPT.items():
            if name not in before and max(ckpts(work / name), default=0) >= EVERY:
                info = slurm.job(ids[name])
                assert info["JobState"] == "RUNNING", f"{name} ended before its interrupt:\n{out(name)}"
                before[name] = max(ckpts(work / name))
                slurm.run(*cmd, str(ids[name]))
        if tick % 5 == 0:  # a process scan costs more than a look at the checkpoints
            for name in ids:
                seen[name] |= trainer_netns(work / name)
        tick += 1
        assert time.monotonic() - t0 < 400, "jobs still running after 400 s:\n" + "\n".join(map(out, ids))
        time.sleep(0.05)
    took = time.monotonic() - t0
    print(f"two-node SLURM: {len(ids)} jobs done {took:.1f}s after sbatch; interrupted after {before}")
    return {"work": work, "nodes": nodes, "info": {n: slurm.job(i) for n, i in ids.items()},
            "out": {n: out(n) for n in ids}, "seen": seen, "before": before}  # fmt: skip


def test_multi_node_sbatch_trains_on_both_nodes(jobs):
    info, out = jobs["info"]["ref"], jobs["out"]["ref"]
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", out
    assert info["NodeList"] == "node[0-1]", info
    assert "2 node(s) x 1 GPU(s), rendezvous node0:" in out, out
    assert "node 0/2 (node0)" in out and "node 1/2 (node1)" in out, out  # each node's launcher
    # the trainers themselves ran in the two namespaces (and nowhere else)
    assert jobs["seen"]["ref"] == {n.net_inode() for n in jobs["nodes"]}, jobs["seen"]
    final = ckpts(jobs["work"] / "ref")
    assert sorted(final) == list(range(EVERY, STEPS + 1, EVERY)), sorted(final)
    assert load_checkpoint(final[STEPS])["world_size"] == 2
    assert [r["step"] for r in rows(jobs["work"] / "ref")] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("name", list(INTERRUPT))
def test_interrupted_job_requeues_resumes_and_ends_equal(jobs, name: str):
    work, info, out = jobs["work"], jobs["info"][name], jobs["out"][name]
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out
    assert "restart 0 on node[0-1]" in out and "restart 1 on node[0-1]" in out, out
    if name == "requeued":
        assert "DUE TO JOB REQUEUE" in out, out
    else:  # the trainers on both nodes stopped on USR1 and checkpointed, then the script requeued
        assert "node 0: trainers stopped after USR1" in out and "node 1: trainers stopped after USR1" in out, out
        assert "requeueing job" in out, out
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", out)]
    assert len(resumed) == 2 and len(set(resumed)) == 1, out  # once per node (its local main process)
    assert jobs["before"][name] <= resumed[0] < STEPS, out
    assert jobs["seen"][name] == {n.net_inode() for n in jobs["nodes"]}, jobs["seen"]
    got, want = ckpts(work / name), ckpts(work / "ref")
    assert set(want) <= set(got), (sorted(got), sorted(want))  # plus, maybe, a signal checkpoint
    for step, path in sorted(want.items()):
        diff = differences(load_checkpoint(got[step]), load_checkpoint(path))
        if name == "preempted" and step == resumed[0]:  # USR1 landed on a periodic step: the
            diff = [d for d in diff if d != ".reason: 'signal SIGUSR1' != 'periodic'"]  # same state
        assert not diff, f"checkpoint {step} differs from the uninterrupted run: {diff[:5]}"
    assert rows(work / name) == rows(work / "ref")
