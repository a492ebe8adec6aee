"""Names and numbers that must not collide between pytest-xdist workers.

Each worker is a separate process with its own VMs; anything that lives in a
host-wide namespace (tap devices, TCP ports, Unix socket paths outside the
worker's temporary directory) is derived from the worker's index, so
``pytest -n auto`` runs need no shared state.  The controller process (no
xdist) is worker 0.
"""

from __future__ import annotations

import os
import re

#: Linux's IFNAMSIZ - 1: the longest network interface name.
IFNAME_MAX = 15
#: TCP/UDP ports handed to worker N: PORT_BASE + N * PORTS_PER_WORKER, and the next PORTS_PER_WORKER - 1.
PORT_BASE = 20000
PORTS_PER_WORKER = 500


def worker_id() -> str:
    """pytest-xdist's worker id ("gw3"), or "main" outside xdist."""
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def worker_index() -> int:
    m = re.fullmatch(r"gw(\d+)", worker_id())
    return int(m.group(1)) if m else 0


def tap_name(n: int, prefix: str = "mvm") -> str:
    """A tap device name unique to this worker and ``n`` (at most 15 characters)."""
    name = f"{prefix}{worker_index()}t{n}"
    if len(name) > IFNAME_MAX:
        raise ValueError(f"tap name {name!r} is longer than {IFNAME_MAX} characters (use a shorter prefix)")
    return name


def port(n: int) -> int:
    """The ``n``-th port reserved for this worker."""
    if not 0 <= n < PORTS_PER_WORKER:
        raise ValueError(f"port index {n} is outside 0..{PORTS_PER_WORKER - 1}")
    p = PORT_BASE + worker_index() * PORTS_PER_WORKER + n
    if p > 65535:
        raise ValueError(f"worker {worker_id()} has no ports left (index {worker_index()} is too high)")
    return p
