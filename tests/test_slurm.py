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
LAUNCH = REPO / "launch"
SBATCH = LAUNCH / "pretrain_cpu.sbatch"
STANDIN = Path(__file__).resolve().parent / "slurm_standin.py"
STEPS = 30


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
    return {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "SELFSUP_PROGRAM": str(STANDIN)}


def submit(slurm: SlurmCluster, workdir: Path, *args: str) -> int:
    return slurm.sbatch(f"--chdir={workdir}", str(SBATCH), *args, env=job_env())


def job_output(workdir: Path, job_id: int) -> str:
    path = workdir / f"selfsup-cpu-{job_id}.out"
    return path.read_text() if path.exists() else "<no output file>"


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    ckdir = run_dir / "checkpoints"
    ck = torch.load(ckdir / (ckdir / "latest").read_text().strip(), weights_only=True)
    assert ck["step"] == STEPS
    return ck["model"]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def runs(slurm: SlurmCluster, tmp_path_factory):
    """An uninterrupted run and a preempted one, side by side (the node advertises 4 CPUs)."""
    work = tmp_path_factory.mktemp("slurm-runs")
    (work / "shards").mkdir()
    (work / "shards" / "manifest.json").write_text("{}")
    config = work / "recipe.yaml"
    config.write_text("{}\n")
    args = [str(config), str(work / "shards")]
    ref = submit(slurm, work, *args, str(work / "ref"), f"train.max_steps={STEPS}")
    pre = submit(slurm, work, *args, str(work / "pre"), f"train.max_steps={STEPS}")
    log = work / "pre" / "standin.jsonl"
    # Signal only once the trainer is in its loop: a signal during start-up (before the handler
    # exists) kills the process, which is SLURM's normal cancel, not the preemption path.
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 2, 90,
             f"preempted run never started:\n{job_output(work, pre)}")
    time.sleep(2)
    slurm.run("scancel", "-b", "-s", "USR1", str(pre))
    pre_info = slurm.wait_done(pre, 150)
    ref_info = slurm.wait_done(ref, 60)
    return {"work": work, "ref": (ref, ref_info), "pre": (pre, pre_info)}


def test_two_ranks_complete(runs):
    work, (job, info) = runs["work"], runs["ref"]
    assert info["JobState"] == "COMPLETED", job_output(work, job)
    rows = [json.loads(line) for line in (work / "ref" / "standin.jsonl").read_text().splitlines()]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    assert {r["world"] for r in rows} == {2}
    assert info["Restarts"] == "0"
    final_params(work / "ref")


def test_preempted_job_requeues_resumes_and_matches(runs):
    work, (job, info) = runs["work"], runs["pre"]
    out = job_output(work, job)
    assert info["JobState"] == "COMPLETED", out
    assert info["Restarts"] == "1", out
    assert "USR1 received" in out and "requeueing job" in out, out
    rows = [json.loads(line) for line in (work / "pre" / "standin.jsonl").read_text().splitlines()]
    first = [r for r in rows if r["restart"] == 0]
    second = [r for r in rows if r["restart"] == 1]
    assert len(first) == len(second) == 2, rows
    resumed_at = {r["start"] for r in second}
    assert len(resumed_at) == 1 and 0 < resumed_at.pop() < STEPS, rows
    ref, pre = final_params(work / "ref"), final_params(work / "pre")
    assert ref.keys() == pre.keys()
    for name in ref:
        torch.testing.assert_close(pre[name], ref[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("bad", "message"),
    [("config", "config file not found"), ("shards", "shards path not found"),
     ("run_dir", "cannot be created: its parent")],
)
def test_bad_arguments_fail_fast(slurm: SlurmCluster, tmp_path: Path, bad: str, message: str):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    (tmp_path / "recipe.yaml").write_text("{}\n")
    args = {"config": str(tmp_path / "recipe.yaml"), "shards": str(tmp_path / "shards"),
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
             "1", str(STANDIN), f"run_dir={tmp_path}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path))
    for node, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0, out
        assert "did not all meet at 127.0.0.1" in out, out
        expected = "waiting for clients" if node == 0 else "trying to connect to"
        assert expected in out, out
