"""The project's sbatch scripts against real SLURM daemons (tests/slurm_cluster.py).

Proves, on a one-node cluster started for this module: both ranks join with world size 2 and the
run finishes; a USR1 to the batch shell (what `--signal=B:USR1@grace` does before the time limit)
makes the trainer checkpoint, the job requeues itself, resumes from that step and ends with the
same parameters as an uninterrupted run; bad arguments fail the job at once with a message that
names the bad path; a node that cannot meet the others gives up after the rendezvous timeout.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import SlurmCluster, SlurmUnavailable, start_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch" / "cluster"
SBATCH = LAUNCH / "pretrain_cpu.sbatch"
RECIPE = REPO / "configs" / "simclr_demo.yaml"
STEPS = 24
# Small enough for 2 shared cores, with a metrics row every step so the test can see training.
OVERRIDES = [f"train.max_steps={STEPS}", "data.batch_size=32", "data.workers=1",
             "train.log_every=1", "train.checkpoint_every=0", "log.progress=false"]


@pytest.fixture(scope="module")
def slurm():
    try:
        cluster = start_cluster(cpus=4)
    except SlurmUnavailable as e:
        pytest.skip(f"no private SLURM cluster on this machine: {e}")
    yield cluster
    cluster.stop()


def job_env() -> dict[str, str]:
    """What a user's activated environment gives the job: this interpreter's bin first on PATH."""
    return {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "WANDB_MODE": "offline",
            "WANDB_SILENT": "true"}


def submit(slurm: SlurmCluster, workdir: Path, *args: str) -> int:
    return slurm.sbatch(f"--chdir={workdir}", str(SBATCH), *args, env=job_env())


def job_output(workdir: Path, job_id: int) -> str:
    path = workdir / f"selfsup-cpu-{job_id}.out"
    return path.read_text() if path.exists() else "<no output file>"


def checkpoints(run_dir: Path) -> dict[int, dict]:
    """Every checkpoint left in the run, by step."""
    return {int(p.stem.split("-")[1]): torch.load(p, weights_only=True)
            for p in sorted((run_dir / "checkpoints").glob("step-*.pt"))}


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return max((r["step"] for r in rows if "step" in r), default=0)


def wait_for(predicate, timeout: float, what) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise TimeoutError(what())


@pytest.fixture(scope="module")
def runs(slurm: SlurmCluster, embedded_shards, tmp_path_factory):
    """An uninterrupted run and a preempted one, side by side (the node advertises 4 CPUs)."""
    work = tmp_path_factory.mktemp("slurm-runs")
    args = [str(RECIPE), embedded_shards["train"]]
    ref = submit(slurm, work, *args, str(work / "ref"), *OVERRIDES)
    pre = submit(slurm, work, *args, str(work / "pre"), *OVERRIDES)
    # Signal once the trainer is in its loop (a few steps logged), as SLURM would mid-run.
    def training_or_ended() -> bool:
        if slurm.job(pre)["JobState"] not in ("PENDING", "RUNNING"):
            raise AssertionError(f"job ended before the signal:\n{job_output(work, pre)}")
        return last_logged_step(work / "pre") >= 3

    wait_for(training_or_ended, 120,
             lambda: f"preempted run never logged 3 steps:\n{job_output(work, pre)}")
    slurm.run("scancel", "-b", "-s", "USR1", str(pre))
    pre_info = slurm.wait_done(pre, 150)
    ref_info = slurm.wait_done(ref, 60)
    return {"work": work, "ref": (ref, ref_info), "pre": (pre, pre_info)}


def test_two_ranks_complete(runs):
    work, (job, info) = runs["work"], runs["ref"]
    out = job_output(work, job)
    assert info["JobState"] == "COMPLETED", out
    assert info["Restarts"] == "0", out
    assert "node 0/1" in out and "2 process(es)" in out, out
    final = checkpoints(work / "ref")[STEPS]
    assert final["world_size"] == 2  # both ranks were in the process group (gloo, 2 processes)
    assert last_logged_step(work / "ref") == STEPS


def test_preempted_job_requeues_resumes_and_matches(runs):
    work, (job, info) = runs["work"], runs["pre"]
    out = job_output(work, job)
    assert info["JobState"] == "COMPLETED", out
    assert info["Restarts"] == "1", out  # SLURM_RESTART_COUNT=1 in the second run
    assert "USR1 received" in out and "requeueing job" in out, out
    assert "restart 1 on" in out, out
    stopped = [int(m) for m in re.findall(r"stopping on signal at step (\d+)", out)]
    resumed = [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", out)]
    assert len(stopped) == 1 and resumed == stopped, out
    assert 0 < stopped[0] < STEPS, out
    ckpts = checkpoints(work / "pre")
    assert sorted(ckpts) == [stopped[0], STEPS]
    assert ckpts[stopped[0]]["reason"].startswith("signal")
    # same W&B run after the requeue: the id travels in the checkpoint, offline runs share it
    wandb_id = ckpts[STEPS]["wandb_id"]
    assert wandb_id and ckpts[stopped[0]]["wandb_id"] == wandb_id
    assert len(list((work / "pre" / "wandb").glob(f"offline-run-*-{wandb_id}"))) == 2
    ref, pre = checkpoints(work / "ref")[STEPS]["model"], ckpts[STEPS]["model"]
    assert ref.keys() == pre.keys()
    for name in ref:
        torch.testing.assert_close(pre[name], ref[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("bad", "message"),
    [("config", "config file not found"), ("shards", "shards path not found"),
     ("run_dir", "cannot be created: its parent")],
)
def test_bad_arguments_fail_fast(
    slurm: SlurmCluster, embedded_shards, tmp_path: Path, bad: str, message: str
):
    args = {"config": str(RECIPE), "shards": embedded_shards["train"],
            "run_dir": str(tmp_path / "run")}
    args[bad] = str(tmp_path / "missing" / bad)
    start = time.monotonic()
    job = submit(slurm, tmp_path, args["config"], args["shards"], args["run_dir"])
    info = slurm.wait_done(job, 60)
    out = job_output(tmp_path, job)
    assert info["JobState"] == "FAILED", out
    assert message in out and str(tmp_path / "missing" / bad) in out, out
    assert time.monotonic() - start < 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_rendezvous_gives_up_with_clear_error(tmp_path: Path):
    """Node 1 of 2 whose master never listens, and node 0 whose peer never comes: both exit."""
    timeout = 5
    procs = []
    for node in (0, 1):
        env = {**os.environ, **job_env(), "SLURM_NNODES": "2", "SLURM_NODEID": str(node),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "SELFSUP_RDZV_TIMEOUT": str(timeout), "ACCELERATE_USE_CPU": "1"}
        procs.append(subprocess.Popen(
            ["bash", str(LAUNCH / "slurm_node_launch.sh"), str(LAUNCH / "accelerate_cpu.yaml"),
             "1", "-m", "selfsup.launch.cli", "pretrain", "--config", str(RECIPE),
             f"run_dir={tmp_path}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path))
    for node, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0, out
        assert "did not all meet at 127.0.0.1" in out, out
        expected = "waiting for clients" if node == 0 else "trying to connect to"
        assert expected in out, out
