"""Boot time and memory: our VMM vs QEMU microvm, the same tiny guest, alternating.

    python3 bench/boot.py [--rounds 20] [--guest hello] [--format pvh]

For each round, in turn:
- qemu:        `qemu-system-x86_64 -M microvm ... -kernel GUEST` as a process;
- ours-cli:    `microvm run --kernel GUEST` as a process (Python start-up included);
- ours-inproc: `Machine(config)` in this process, the way the pytest plugin runs VMs.
For the two processes, "marker" is the time from spawn until the guest's first
console line reaches our pipe, "exit" until the process has exited, and RSS the
child's peak resident set (wait4).  For the in-process VM, "marker" is from
`Machine(...)` until the guest's boot-timer write (Firecracker's convention,
port 0x3f0) and "exit" until `wait()` returns; RSS is not separable there and is
reported as the growth of this process's peak.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import subprocess
import sys
import time

from common import QEMU, host_line, median, qemu_cpu_flags

from vmm.guestkit import tiny_guest
from vmm.machine import Machine, MachineConfig

MARKER = b"Hello from tiny guest"


def run_process(cmd: list[str], expect_rc: int) -> tuple[float, float, int]:
    """(spawn->marker, spawn->exit, peak RSS KiB) of one process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    buf = b""
    t_marker = None
    fd = p.stdout.fileno()
    while True:
        r, _, _ = select.select([fd], [], [], 30)
        if not r:
            p.kill()
            raise RuntimeError(f"no output from {cmd[0]} in 30 s")
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        if t_marker is None and MARKER in buf:
            t_marker = time.perf_counter() - t0
    _, status, usage = os.wait4(p.pid, 0)
    t_exit = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != expect_rc or t_marker is None:
        raise RuntimeError(f"{cmd[0]} exited {p.returncode}, marker {'seen' if t_marker else 'missing'}: {buf[-300:]!r}")
    return t_marker, t_exit, usage.ru_maxrss


def run_inproc(kernel: str) -> tuple[float, float, int]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    with Machine(MachineConfig(kernel=kernel, timeout=30), t0=t0) as m:
        m.start()
        st = m.wait()
        t_exit = time.monotonic() - t0
        assert st is not None and st.ok, st
        boot = m.boot_time
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return boot, t_exit, after - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--guest", default="hello")
    ap.add_argument("--format", default="pvh")
    args = ap.parse_args()
    kernel = str(tiny_guest(args.guest, args.format))
    cmds = {
        "ours-cli": ([sys.executable, "-m", "vmm.cli", "run", "--kernel", kernel], 0),
    }
    if QEMU:
        cmds["qemu"] = (
            [QEMU, "-M", "microvm", "-enable-kvm", *qemu_cpu_flags(), "-m", "128", "-nographic", "-no-reboot",
             "-nodefaults", "-serial", "stdio", "-kernel", kernel, "-device", "isa-debug-exit,iobase=0xf4,iosize=4"],
            1,  # isa-debug-exit: (0 << 1) | 1
        )
    results: dict[str, list[tuple[float, float, int]]] = {k: [] for k in (*cmds, "ours-inproc")}
    run_inproc(kernel)  # warm caches (imports, host probe) before measuring
    for _ in range(args.rounds):
        for name, (cmd, rc) in cmds.items():
            results[name].append(run_process(cmd, rc))
        results["ours-inproc"].append(run_inproc(kernel))
    print(f"# boot: {args.guest} ({args.format}), median of {args.rounds} alternating rounds")
    print(f"# host: {host_line()}")
    print(f"{'what':<13} {'marker ms':>10} {'exit ms':>9} {'peak RSS MiB':>13}")
    for name, rows in results.items():
        print(
            f"{name:<13} {median([r[0] for r in rows]) * 1e3:10.1f} {median([r[1] for r in rows]) * 1e3:9.1f} "
            f"{median([r[2] for r in rows]) / 1024:13.1f}"
        )
    if "qemu" in results:
        q = median([r[0] for r in results["qemu"]])
        for name in ("ours-cli", "ours-inproc"):
            print(f"# {name} marker / qemu marker = {median([r[0] for r in results[name]]) / q:.2f}")


if __name__ == "__main__":
    main()
