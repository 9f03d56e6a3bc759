"""When a collective fails, say which rank is gone instead of dumping a gloo/NCCL traceback.

A rank that dies (killed, out of memory, its node lost) makes the others fail in their next
collective: at once when its sockets are reset (a killed process), or after
``train.dist_timeout_s`` when its node vanished without a word. The survivors then hold a roll
call through the rendezvous store (the TCP store of the launcher on the first node, which
outlives the trainers): each writes its rank and waits a few seconds for the others; the ranks
that do not answer are reported as lost. If the store itself is unreachable (or does not answer in time), the
first node (which hosts it) is the one that is gone.
"""

from __future__ import annotations

import datetime
import os
import threading

MARKERS = ("gloo", "nccl", "connection reset", "connection closed", "broken pipe", "timed out", "timeout",
           "socket", "peer", "c10d", "distbackend", "distnetwork", "diststore")  # fmt: skip


def is_collective_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in MARKERS)


def _roll_call(store, rank: int, world: int, wait_s: float) -> list[int]:
    """Write this rank's name, wait for the others'; the ranks that never answer."""
    store.set(f"selfsup/rollcall/{rank}", "here")
    lost = []
    for r in range(world):
        if r == rank:
            continue
        try:
            store.wait([f"selfsup/rollcall/{r}"], datetime.timedelta(seconds=wait_s))
        except Exception:  # noqa: BLE001 - no answer (a timeout): that rank is gone
            lost.append(r)
            wait_s = 0.1  # the others had the same time already
    return lost


def diagnose(exc: BaseException, wait_s: float = 5.0) -> str:
    """One line naming the lost rank(s), from a roll call among the survivors.

    The roll call runs in a daemon thread with a hard deadline: when the store's host vanished
    without resetting the connection (a cable pulled, a link down), ``store.wait``'s timeout
    expires, and then it sends CANCEL_WAIT and reads the reply with no timeout (torch 2.x
    ``TCPStore::doWait``) for as long as TCP retransmits (many minutes). Past the deadline the store
    counts as unreachable, and the thread is left behind, stuck in C++, until the process exits.
    """
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    rank, world = dist.get_rank(), dist.get_world_size()
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    result: dict[str, object] = {}

    def call() -> None:
        try:
            result["lost"] = _roll_call(c10d._get_default_store(), rank, world, wait_s)
        except Exception as e:  # noqa: BLE001 - the store is gone
            result["error"] = type(e).__name__

    thread = threading.Thread(target=call, name="selfsup-rollcall", daemon=True)
    thread.start()
    deadline = wait_s + 5.0
    thread.join(deadline)
    if "lost" not in result:  # raised, or still stuck in the store: its host (node 0) is gone
        why = result.get("error", f"no answer within {deadline:.0f}s")
        return (f"rank {rank} of {world}: lost contact with the rendezvous store at {where} ({why}); "
                f"the first node (rank 0, which hosts the store) is gone. The collective failed with: {first}")  # fmt: skip
    lost = result["lost"]
    if not lost:
        return (f"rank {rank} of {world}: a collective failed but every rank answered the roll call: {first}")
    names = ", ".join(map(str, lost))
    return (f"rank {rank} of {world}: rank(s) {names} of {world} stopped (no answer within {wait_s:.0f}s of the "
            f"failure; rendezvous {where}). The collective failed with: {first}")  # fmt: skip
