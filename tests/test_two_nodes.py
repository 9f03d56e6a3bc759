"""Two "nodes" for real on one machine: two Linux network namespaces joined by a veth pair
(10.213.0.1/24 and 10.213.0.2/24 exist only inside them; nothing leaves the machine), each running
one trainer through launch/cluster/slurm_node_launch.sh with launch/cluster/accelerate_multi_node.yaml and the
rendezvous variables launch/cluster/pretrain_multi_node.sbatch sets (MASTER_ADDR = the first node,
SLURM_NNODES, SLURM_NODEID). Checks: 2 nodes x 1 process train bitwise equal to 1 node x 2
processes; killing every process of node 1 mid-run makes node 0 exit with an error naming the lost
rank within train.dist_timeout_s; the requeue (both nodes again, --resume auto as the sbatch script
passes it) finishes bitwise equal.

The namespaces are created and removed by this module (by name, in the fixture's teardown); the
tests skip only where namespaces cannot be made (not root, no ``ip``, ``ip netns add`` refused).
Real SLURM with one slurmd per namespace (sbatch of the multi-node script, requeue) is in
tests/test_slurm_two_nodes.py; here the per-node script runs directly, which lets a test kill one
node's processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from faultkit import ENV, kill_tree, start, wait_step
from faultruns import ckpts, differences, rows, train_args

from selfsup.pretrain.run.rundir import load_checkpoint

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch" / "cluster"
ADDRS = ("10.213.0.1", "10.213.0.2")
IFACE = "ethss"
PORT = 29611  # inside fresh namespaces every port is free
TIMEOUT = 30  # train.dist_timeout_s of the shared 2-process runs (tests/faultruns.py)
LOST_TIMEOUT = 15  # the node-0-lost runs, compared with nothing: the link-down case waits this out


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def nodes():
    """Two namespaces joined by a veth pair; yields their names; removes them afterwards."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2's ip")
    tag = uuid.uuid4().hex[:6]
    names = [f"selfsup-{tag}-{i}" for i in (0, 1)]
    veth = [f"ssv{tag}{i}" for i in (0, 1)]
    made: list[str] = []
    try:
        for n in names:
            r = _ip("netns", "add", n)
            if r.returncode != 0:
                pytest.skip(f"ip netns add refused here: {r.stderr.strip()}")
            made.append(n)
        steps = [("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])]
        for n, v, addr in zip(names, veth, ADDRS, strict=True):
            steps += [("link", "set", v, "netns", n), ("-n", n, "link", "set", v, "name", IFACE),
                      ("-n", n, "addr", "add", f"{addr}/24", "dev", IFACE), ("-n", n, "link", "set", "lo", "up"),
                      ("-n", n, "link", "set", IFACE, "up")]  # fmt: skip
        for step in steps:
            r = _ip(*step)
            assert r.returncode == 0, f"ip {' '.join(step)}: {r.stderr}"
        yield names
    finally:
        for n in made:  # anything still running in a namespace goes first, then the namespace (and its veth end)
            for pid in _ip("netns", "pids", n).stdout.split():
                subprocess.run(["kill", "-9", pid], capture_output=True)
            _ip("netns", "del", n)


def _node(ns: str, node: int, run: Path, shards: dict, *extra: str) -> subprocess.Popen:
    """What srun starts on node ``node``: the per-node launcher, with the sbatch script's variables."""
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "SLURM_NNODES": "2",
           "SLURM_NODEID": str(node), "MASTER_ADDR": ADDRS[0], "MASTER_PORT": str(PORT),
           "SELFSUP_RDZV_TIMEOUT": "60", "GLOO_SOCKET_IFNAME": IFACE}  # fmt: skip
    cmd = ["ip", "netns", "exec", ns, "bash", str(LAUNCH / "slurm_node_launch.sh"),
           str(LAUNCH / "accelerate_multi_node.yaml"), "1", "-m", "selfsup.launch.cli", "pretrain", "--resume", "auto",
           *train_args(run, shards, 2), *extra]  # fmt: skip
    return start(cmd, env=env, cwd=run.parent)


def test_two_nodes_equal_one_node_then_survive_a_lost_node(nodes, tmp_path: Path, fault_sets: dict,
                                                           fault_refs: dict) -> None:  # fmt: skip
    ref = fault_refs[2]  # 1 node x 2 processes, same data and config (tests/faultruns.py)
    run = tmp_path / "two-nodes"
    procs = [_node(ns, i, run, fault_sets) for i, ns in enumerate(nodes)]
    wait_step(run, procs[0], 10)
    out1 = kill_tree(procs[1])  # node 1 is lost: its launcher and trainer die at once
    t0 = time.monotonic()
    out0, _ = procs[0].communicate(timeout=TIMEOUT + 60)
    took = time.monotonic() - t0
    assert procs[0].returncode != 0, out0
    assert "node 0/2" in out0 and "rendezvous 10.213.0.1" in out0, out0
    assert "error: lost a process of the job" in out0 and "rank(s) 1 of 2 stopped" in out0, out0 + out1
    assert took < TIMEOUT, f"node 0 took {took:.0f}s to give up"
    before = dict(ckpts(run))
    assert before and max(before) >= 9, sorted(before)
    assert load_checkpoint(before[max(before)])["world_size"] == 2
    # the requeue: both nodes start again, --resume auto continues from the last checkpoint
    procs = [_node(ns, i, run, fault_sets) for i, ns in enumerate(nodes)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    assert "resumed from" in "\n".join(outs)
    want = ckpts(ref)
    assert sorted(ckpts(run)) == sorted(want)
    for s, path in sorted(ckpts(run).items()):  # before the kill: 2 nodes == 1 node; after: exact resume
        diff = differences(load_checkpoint(path), load_checkpoint(want[s]))
        assert not diff, f"checkpoint {s} differs from 1 node x 2 processes: {diff[:5]}"
    assert rows(run) == rows(ref)
    print(f"two nodes: node 0 exited {took:.1f}s after node 1 was killed (dist_timeout_s={TIMEOUT}); "
          f"{len(before)} checkpoints before the kill, {len(want)} in all, all equal to 1 node x 2 processes")


# "link-down": node 0's veth set down, no reset, packets just stop. Node 1's collective times out
# after train.dist_timeout_s; its roll call then finds the store silent (TCPStore.wait times out,
# then blocks reading its cancel's reply with no timeout: it hung > 150 s before peers.diagnose got a deadline).
@pytest.mark.parametrize("how", ["killed", "link-down"])
def test_node_0_lost_survivor_names_its_host(nodes, tmp_path: Path, fault_sets: dict, how: str) -> None:
    """Node 0 hosts the rendezvous store and rank 0. Killed (its sockets reset) or cut off (its link
    down: nothing reset), node 1 must give up within train.dist_timeout_s (+ the roll call's 10 s
    deadline and the launcher's exit) naming node 0's address."""
    run = tmp_path / f"node0-{how}"
    procs = [_node(ns, i, run, fault_sets, f"train.dist_timeout_s={LOST_TIMEOUT}") for i, ns in enumerate(nodes)]
    try:
        wait_step(run, procs[0], 4)
        t0 = time.monotonic()
        if how == "killed":
            kill_tree(procs[0])
        else:
            assert _ip("-n", nodes[0], "link", "set", IFACE, "down").returncode == 0
        out1, _ = procs[1].communicate(timeout=LOST_TIMEOUT + 120)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p)
        _ip("-n", nodes[0], "link", "set", IFACE, "up")
    print(f"node 0 {how}: node 1 exited rc={procs[1].returncode} after {took:.1f}s; last lines:\n"
          + "\n".join(out1.splitlines()[-6:]))
    assert procs[1].returncode != 0, out1
    assert ADDRS[0] in out1 and "error: lost a process of the job" in out1, out1
    assert took < LOST_TIMEOUT + 30, f"node 1 took {took:.0f}s to give up (dist_timeout_s={LOST_TIMEOUT})"
