"""Shared pieces of the benchmarks: building the helpers, statistics, host facts."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vmm.cache import cache_root, produce_file  # noqa: E402

QEMU = shutil.which("qemu-system-x86_64")


def qemu_cpu_flags() -> list[str]:
    """QEMU's -cpu option; MICROVM_QEMU_CPU overrides it (this project's CI hosts need
    `host,-arch-capabilities`, which is also harmless elsewhere)."""
    return ["-cpu", os.environ.get("MICROVM_QEMU_CPU", "host,-arch-capabilities")]


def _build(name: str, sources: list[Path], make) -> Path:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    return produce_file(cache_root() / "bench" / f"{name}-{digest}", make)


def exit_floor_binary() -> Path:
    src = HERE / "exit_floor.c"
    return _build(
        "exit_floor",
        [src],
        lambda out: subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(src)], check=True),
    )


def loop_guest() -> bytes:
    src = HERE / "guest_loop.S"

    def make(out: Path) -> None:
        obj = out.with_suffix(".o")
        subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(out)], check=True)
        obj.unlink()

    return _build("guest_loop", [src], make).read_bytes()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def host_line() -> str:
    from vmm.hostinfo import host_info

    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    qemu = "not installed"
    if QEMU:
        qemu = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=False).stdout.splitlines()[0]
    return (
        f"{cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}, "
        f"{qemu}; {host_info().describe()}"
    )
