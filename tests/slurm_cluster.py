"""A private one-node SLURM cluster for tests: real munged, slurmctld and slurmd, no systemd.

Why real daemons: requeue that restarts from scratch, signals that never reach the trainer and
ranks that never meet are the usual ways SLURM launch scripts break, and none of them shows up
when the scripts are only read. Where the machine allows it (root on Debian with apt), this module
installs ``slurmctld slurmd slurm-client munge``, writes a slurm.conf under a fresh /tmp folder
(own ports, own munge socket, state and spool there too, so it never touches a system cluster),
starts the three daemons in the foreground as children of the test process, and stops them by pid.
The settings are the ones checked on these machines (see DESIGN.md): no cgroups, linuxproc
process tracking, fast scheduling and requeue.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "munged")


class SlurmUnavailable(RuntimeError):
    """This machine cannot run a private SLURM cluster; the message says why (tests skip on it)."""


def ensure_installed() -> None:
    """Install the Debian SLURM and munge packages if any binary is missing.

    Idempotent and fast when everything is present (no apt call at all). Raises SlurmUnavailable
    when the packages are missing and cannot be installed here (not root, no apt).
    """
    if all(shutil.which(b) for b in BINARIES):
        return
    missing = [b for b in BINARIES if not shutil.which(b)]
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM binaries missing ({', '.join(missing)}) and not root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable(f"SLURM binaries missing ({', '.join(missing)}) and no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    still = [b for b in BINARIES if not shutil.which(b)]
    if still:
        raise SlurmUnavailable(f"apt installed {PACKAGES} but {still} are still not on PATH")


def _free_ports(n: int) -> list[int]:
    """Ports free right now, so a second cluster (or a system one) on this machine cannot clash."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _slurm_conf(root: Path, ctld: tuple[str, str], ports: tuple[int, int], nodes: dict[str, str],
                cpus: int) -> str:
    """The configuration; every setting here was needed or checked (DESIGN.md). ``ctld`` is the
    controller's (hostname, address), ``ports`` (slurmctld, slurmd), ``nodes`` NodeName -> NodeAddr.
    Per-node files use %n, so several slurmd (one per network namespace) never share a file."""
    node_lines = "".join(f"NodeName={n} NodeAddr={a} CPUs={cpus} State=UNKNOWN\n" for n, a in nodes.items())
    return f"""\
ClusterName=selfsuptest
SlurmctldHost={ctld[0]}({ctld[1]})
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
JobRequeue=1
MpiDefault=none
SwitchType=switch/none
{node_lines}PartitionName=debug Nodes={",".join(nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


@dataclass
class SlurmCluster:
    """A running private cluster. ``env`` points SLURM clients (and jobs) at its slurm.conf."""

    root: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    cleanups: list[Callable[[], None]] = field(default_factory=list)  # run last by stop(), newest first

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        """Run a SLURM client command against this cluster and return its stdout."""
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> int:
        """Submit a batch job; ``env`` adds variables the job inherits (sbatch exports ALL)."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (no accounting daemon here, so no sacct)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id))
        fields: dict[str, str] = {}
        for token in out.split():
            key, _, value = token.partition("=")
            fields[key] = value
        return fields

    def wait_state(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job is in one of ``states``; raise with the job record if it never is."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f}s: {info}")

    def wait_done(self, job_id: int, timeout: float) -> dict[str, str]:
        """Wait for a terminal state (a requeued job passes through PENDING and keeps going)."""
        return self.wait_state(
            job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"},
            timeout,
        )

    def log_tail(self) -> str:
        """The daemons' logs, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("slurm*.log")):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, stop every slurmd, then slurmctld and munged by pid; then the cleanups."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env,
                           capture_output=True, timeout=30)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                out = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True,
                                     text=True, timeout=30).stdout
                if not out.strip():
                    break
                time.sleep(0.5)
        slurmds = [n for n in self.procs if n.startswith("slurmd")]
        for name in (*slurmds, "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        while self.cleanups:
            self.cleanups.pop()()


def _wait_for(what: str, check, timeout: float, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode} while waiting for {what}\n"
                                   f"{cluster.log_tail()}")
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{cluster.log_tail()}")


def new_cluster() -> SlurmCluster:
    """Checks and installs, then a fresh state folder (no daemons yet; ``env`` has no SLURM_CONF
    until ``start_control`` writes slurm.conf). Raises SlurmUnavailable."""
    if os.name != "posix":
        raise SlurmUnavailable("SLURM needs Linux")
    ensure_installed()
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting slurmd/slurmctld as configured here needs root")
    try:
        munge_user = pwd.getpwnam("munge")
    except KeyError as e:
        raise SlurmUnavailable("the munge package did not create a 'munge' user") from e
    root = Path(tempfile.mkdtemp(prefix="selfsup-slurm-"))
    root.chmod(0o755)  # munged refuses socket folders whose parents others can write
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir()
    os.chown(root / "munge", munge_user.pw_uid, munge_user.pw_gid)
    (root / "munge").chmod(0o700)
    env = dict(os.environ)
    for var in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
        env.pop(var)  # a test run inside a SLURM job must not leak its own job into ours
    return SlurmCluster(root=root, env=env)


def start_daemon(cluster: SlurmCluster, name: str, cmd: list[str], user: str | None = None) -> None:
    """A daemon in the foreground as a direct child (no runuser in between), so stop() signals and
    reaps the daemon itself."""
    with open(cluster.root / "log" / f"{name}.out", "wb") as log:
        cluster.procs[name] = subprocess.Popen(
            cmd, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            user=user, group=user,
        )


def start_control(cluster: SlurmCluster, ctld: tuple[str, str], nodes: dict[str, str], cpus: int) -> Path:
    """Write slurm.conf (fresh free ports), start munged and slurmctld; returns the conf path."""
    root = cluster.root
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, ctld, tuple(_free_ports(2)), nodes, cpus))
    cluster.env["SLURM_CONF"] = str(conf)
    socket_path = root / "munge" / "munge.socket"
    start_daemon(cluster, "munged", [
        "munged", "--foreground", "--force", f"--socket={socket_path}",
        f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/munge/munged.log",
        f"--seed-file={root}/munge/munged.seed",
    ], user="munge")
    _wait_for("munged socket", socket_path.exists, 20, cluster)
    start_daemon(cluster, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)])
    _wait_for("slurmctld", lambda: cluster.run("scontrol", "ping", check=False).count("UP") > 0,
              30, cluster)
    return conf


def wait_idle(cluster: SlurmCluster, nodes: int, timeout: float = 30) -> None:
    """Until ``nodes`` nodes have registered and are idle."""
    _wait_for(f"{nodes} node(s) idle", lambda: cluster.run(
        "sinfo", "-h", "-N", "-o", "%t", check=False).split().count("idle") >= nodes, timeout, cluster)


def start_cluster(cpus: int = 4) -> SlurmCluster:
    """Install if needed, then start munged, slurmctld and slurmd on a private config.

    ``cpus`` is what the node advertises (``config_overrides`` lets it exceed the real core
    count), so two 2-rank jobs can run side by side on a 2-core machine. Raises SlurmUnavailable
    when this machine cannot host the cluster.
    """
    cluster = new_cluster()
    host = socket.gethostname().split(".")[0]
    try:
        conf = start_control(cluster, (host, "127.0.0.1"), {host: "127.0.0.1"}, cpus)
        start_daemon(cluster, "slurmd", ["slurmd", "-D", "-f", str(conf), "-N", host])
        wait_idle(cluster, 1)
    except BaseException:
        cluster.stop()
        raise
    return cluster
