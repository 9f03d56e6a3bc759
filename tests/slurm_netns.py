"""A private two-node SLURM cluster on one machine: one slurmd per Linux network namespace.

Topology (made here, removed by ``SlurmCluster.stop``): a bridge in the root namespace holding the
controller's address ``10.214.T.254/24`` (T from a random tag, so two such clusters do not clash),
and per node a namespace joined to the bridge by a veth pair, its end inside called ``eth0`` with
``10.214.T.<i+1>/24``. munged and slurmctld run in the root namespace (munge's socket is a file, so
every namespace reaches it; slurmctld listens on every address, the bridge's included). Each slurmd
runs as ``nsenter --net=/run/netns/<ns> unshare --uts --mount`` with its own hostname (``node0``, ``node1``)
and a private /etc/hosts (bind-mounted, invisible outside) naming every node and the controller:
jobs there see a host of their own name and address, as on a real cluster, so MASTER_ADDR=node0
resolves and gloo finds its interface from the hostname. Both slurmd use the same SlurmdPort (each
has its own network stack) and ``-N <node>``; spool, pid and log files are per node (%n).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from dataclasses import dataclass

from slurm_cluster import (
    SlurmCluster,
    SlurmUnavailable,
    new_cluster,
    start_control,
    start_daemon,
    wait_idle,
)

NAMES = ("node0", "node1")


@dataclass(frozen=True)
class NetNode:
    """One node: SLURM NodeName (= its hostname inside), network namespace, address."""

    name: str
    netns: str
    addr: str

    def net_inode(self) -> int:
        """The namespace's inode, what /proc/<pid>/ns/net names for a process inside it."""
        return os.stat(f"/run/netns/{self.netns}").st_ino


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _make_network(cluster: SlurmCluster, tag: str, subnet: str) -> list[NetNode]:
    """Bridge + one namespace per node. Registers their removal first."""
    bridge = f"ssbr{tag}"
    spaces = [f"selfsup-{tag}-{n}" for n in NAMES]

    def remove() -> None:  # whatever is still running in a namespace goes first, then it and its veth
        for ns in spaces:
            for pid in _ip("netns", "pids", ns).stdout.split():
                subprocess.run(["kill", "-9", pid], capture_output=True)
            _ip("netns", "del", ns)
        _ip("link", "del", bridge)

    cluster.cleanups.append(remove)
    r = _ip("link", "add", bridge, "type", "bridge")
    if r.returncode != 0:
        raise SlurmUnavailable(f"ip link add type bridge refused here: {r.stderr.strip()}")
    steps = [("addr", "add", f"{subnet}.254/24", "dev", bridge), ("link", "set", bridge, "up")]
    nodes = []
    for i, (name, ns) in enumerate(zip(NAMES, spaces, strict=True)):
        r = _ip("netns", "add", ns)
        if r.returncode != 0:
            raise SlurmUnavailable(f"ip netns add refused here: {r.stderr.strip()}")
        host_end, ns_end = f"ssh{tag}{i}", f"ssp{tag}{i}"
        nodes.append(NetNode(name, ns, f"{subnet}.{i + 1}"))
        steps += [("link", "add", host_end, "type", "veth", "peer", "name", ns_end),
                  ("link", "set", host_end, "master", bridge), ("link", "set", host_end, "up"),
                  ("link", "set", ns_end, "netns", ns), ("-n", ns, "link", "set", ns_end, "name", "eth0"),
                  ("-n", ns, "addr", "add", f"{nodes[-1].addr}/24", "dev", "eth0"),
                  ("-n", ns, "link", "set", "lo", "up"), ("-n", ns, "link", "set", "eth0", "up")]  # fmt: skip
    for step in steps:
        r = _ip(*step)
        if r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(step)}: {r.stderr.strip()}")
    return nodes


def start_two_node_cluster(cpus: int = 4) -> tuple[SlurmCluster, list[NetNode]]:
    """munged + slurmctld in the root namespace, slurmd ``node0`` and ``node1`` in namespaces of
    their own. Returns the cluster and its nodes. Raises SlurmUnavailable where SLURM or
    namespaces cannot be made here (not root, no ip/unshare, refused by the kernel)."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare") or not shutil.which("nsenter"):
        raise SlurmUnavailable("network namespaces need root, iproute2's ip and util-linux's unshare and nsenter")
    probe = subprocess.run(["unshare", "--uts", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise SlurmUnavailable(f"unshare --uts --mount refused here: {probe.stderr.strip()}")
    cluster = new_cluster()
    tag = uuid.uuid4().hex[:6]
    subnet = f"10.214.{int(tag, 16) % 250 + 1}"
    host = socket.gethostname().split(".")[0]
    try:
        nodes = _make_network(cluster, tag, subnet)
        hosts = cluster.root / "hosts"
        hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{n.addr} {n.name}\n" for n in nodes)
                         + f"{subnet}.254 {host}\n")
        conf = start_control(cluster, (host, f"{subnet}.254"), {n.name: n.addr for n in nodes}, cpus)
        for name, ns in ((n.name, n.netns) for n in nodes):
            # nsenter, not `ip netns exec`: that remounts /sys, losing /sys/fs/cgroup, and slurmd
            # 22.05 then fails "Unable to initialize cgroup plugin" even with proctrack/linuxproc.
            # nsenter and unshare exec (no fork), and sh execs slurmd: the pid is slurmd's.
            (cluster.root / "spool" / name).mkdir()
            start_daemon(cluster, f"slurmd-{name}", [
                "nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount", "sh", "-c",
                f'mount --bind "$1" /etc/hosts && hostname {name} && exec slurmd -D -f "$2" -N {name}',
                "sh", str(hosts), str(conf)])  # fmt: skip
        wait_idle(cluster, len(NAMES))
    except BaseException:
        cluster.stop()
        raise
    return cluster, nodes
