"""Hermit: time from VMM start to the unikernel's first console output.

    python3 bench/hermit.py [--rounds 10] [--dir ../shared/guests/hermit]

Boots each real Hermit image (uhyve ABI) in an in-process Machine and times
`Machine(...)` -> the first byte the guest prints (through the uhyve console
hypercall or the UART), and -> the VM's end (its exit code, or on a host that
emulates guest ring 0, the instruction it could not emulate).  uhyve itself
is not packaged for Debian, so there is no reference VMM in this benchmark.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

from common import REPO, host_line, median

from vmm.machine import Machine, MachineConfig

IMAGES = ("hello_world", "hello_c", "rusty_demo")


def boot(path: Path) -> tuple[float, float, str]:
    first = threading.Event()
    stamp: list[float] = []

    def on_output(data: bytes) -> None:
        if not stamp:
            stamp.append(time.monotonic())
            first.set()

    t0 = time.monotonic()
    with Machine(MachineConfig(kernel=path, mem_mib=256, timeout=60), t0=t0) as m:
        m.console.add_listener(on_output)
        m.start()
        st = m.wait()
        end = time.monotonic()
    assert stamp, f"{path.name} printed nothing: {st}"
    return stamp[0] - t0, end - t0, st.describe()[:60] if st else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--dir", default=os.environ.get("MICROVM_HERMIT_DIR", str(REPO.parent / "shared" / "guests" / "hermit")))
    args = ap.parse_args()
    d = Path(args.dir)
    results: dict[str, list[tuple[float, float, str]]] = {name: [] for name in IMAGES}
    for _ in range(args.rounds):
        for name in IMAGES:
            results[name].append(boot(d / name))
    print(f"# Hermit: VMM start -> first console output, median of {args.rounds}")
    print(f"# host: {host_line()}")
    print(f"{'image':<12} {'first output ms':>16} {'end ms':>8}  how it ended")
    for name, rows in results.items():
        print(f"{name:<12} {median([r[0] for r in rows]) * 1e3:16.1f} {median([r[1] for r in rows]) * 1e3:8.1f}  {rows[-1][2]}")


if __name__ == "__main__":
    main()
