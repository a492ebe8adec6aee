"""virtio-blk throughput and IOPS: our VMM vs QEMU microvm, the same ring-3 guest and image size.

    python3 bench/blk.py [--rounds 5] [--ops 8192] [--depth 1,16] [--size-mib 64] [--phases ...]

The guest is the tiny kit's ``blkbench``: 4 KiB requests, sequential and
random, reads and writes, with ``depth`` requests in flight, polled from
ring 3.  Both VMMs run it as a process (our `microvm run`, QEMU
``-M microvm`` with ``-device virtio-blk-device``) on one raw image in the
host page cache (QEMU's default cache mode, and our plain pread/pwrite).
Each phase is timed on the host, from the guest's ``blkbench: begin <phase>``
line to its ``blkbench: end <phase>`` line arriving on the serial pipe, so
boot and teardown do not count and the image is the same for both VMMs.
Rounds alternate between the VMMs (and swap their order every round); the
table gives medians and the ratio ours / QEMU (above 1: ours is faster).

Ours handles each queue notification as an MMIO exit on the vCPU thread
(the default); ``ours-ioeventfd`` (``--ioeventfd``) lets KVM signal
an eventfd instead and runs the device on a thread of its own, as QEMU does.
The guest polls the used ring in a loop, so that path needs a second free CPU:
on an idle host it is the faster one at low queue depth, on a busy host the
slower one.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import QEMU, host_line, median, qemu_cpu_flags

from vmm.guestkit import tiny_guest

PHASES = ("seqread", "randread", "seqwrite", "randwrite")
BLOCK = 4096
LINE = re.compile(rb"^blkbench: (begin|end) (\w+)\r?$")
RESULT = re.compile(rb"^blkbench: (\w+) ops=(\d+) bytes=(\d+) errors=(\d+) depth=(\d+)")


def make_image(path: Path, size_mib: int) -> None:
    """A fully allocated image with non-zero contents (reads hit real data, not holes)."""
    chunk = bytes(range(256)) * (4096 * 4)  # 4 MiB
    with open(path, "wb") as f:
        left = size_mib << 20
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n


def ours_cmd(kernel: str, image: Path, append: str) -> list[str]:
    return [sys.executable, "-m", "vmm.cli", "run", "--kernel", kernel, "--disk", str(image), "--mem", "128",
            "--timeout", "600", "--append", append]  # fmt: skip


def qemu_cmd(kernel: str, image: Path, append: str) -> list[str]:
    return [QEMU, "-M", "microvm", "-enable-kvm", *qemu_cpu_flags(), "-m", "128", "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
            "-global", "virtio-mmio.force-legacy=false",
            "-drive", f"if=none,file={image},format=raw,id=bench0",
            "-device", "virtio-blk-device,drive=bench0",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", kernel, "-append", append]  # fmt: skip


def run_once(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600
) -> dict[str, tuple[float, int, int]]:
    """{phase: (seconds, ops, bytes)} from one guest run; raises if the guest reported an error."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    assert p.stdout is not None
    fd = p.stdout.fileno()
    buf = b""
    log = b""
    begun: dict[str, float] = {}
    took: dict[str, float] = {}
    results: dict[str, tuple[int, int, int]] = {}
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        r, _, _ = select.select([fd], [], [], max(left, 0))
        if not r:
            p.kill()
            raise RuntimeError(f"{cmd[0]}: no end of output in {timeout} s: {log[-500:]!r}")
        chunk = os.read(fd, 65536)
        now = time.perf_counter()
        if not chunk:
            break
        log += chunk
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            m = LINE.match(line)
            if m:
                phase = m.group(2).decode()
                if m.group(1) == b"begin":
                    begun[phase] = now
                else:
                    took[phase] = now - begun[phase]
                continue
            m = RESULT.match(line)
            if m:
                results[m.group(1).decode()] = (int(m.group(2)), int(m.group(3)), int(m.group(4)))
    stderr = p.stderr.read() if p.stderr else b""
    p.wait()
    out = {}
    for phase, (ops, nbytes, errors) in results.items():
        if errors:
            raise RuntimeError(f"{cmd[0]}: {errors} failed requests in {phase}: {log[-500:]!r}")
        out[phase] = (took[phase], ops, nbytes)
    if not out:
        raise RuntimeError(f"{cmd[0]} exited {p.returncode} without results: {log[-500:]!r} {stderr[-500:]!r}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ops", type=int, default=8192, help="requests per phase")
    ap.add_argument("--depth", default="1,16", help="comma-separated queue depths")
    ap.add_argument("--size-mib", type=int, default=64, help="image size")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--format", default="pvh", help="guest image format")
    args = ap.parse_args()
    if QEMU is None:
        sys.exit("bench/blk.py compares against qemu-system-x86_64, which is not installed")
    kernel = str(tiny_guest("blkbench", args.format))
    depths = [int(d) for d in args.depth.split(",")]
    phases = [p for p in args.phases.split(",") if p]
    with tempfile.TemporaryDirectory(prefix="blkbench-") as tmp:
        image = Path(tmp) / "bench.img"
        make_image(image, args.size_mib)
        def ours_ioeventfd_cmd(kernel: str, image: Path, append: str) -> list[str]:
            return [*ours_cmd(kernel, image, append), "--ioeventfd"]

        vmms = {"ours": (ours_cmd, None), "ours-ioeventfd": (ours_ioeventfd_cmd, None), "qemu": (qemu_cmd, None)}
        samples: dict[tuple[str, int, str], list[float]] = {}
        shown: dict[str, list[str]] = {}
        for depth in depths:
            append = f"ops={args.ops} depth={depth} phases={','.join(phases)}"
            for name, (make, env) in vmms.items():
                run_once(make(kernel, image, append), env)  # warm-up: page cache, imports
                shown.setdefault(name, make(kernel, image, append))
            for rnd in range(args.rounds):
                order = list(vmms) if rnd % 2 == 0 else list(reversed(vmms))
                for name in order:
                    make, env = vmms[name]
                    for phase, (secs, ops, _nbytes) in run_once(make(kernel, image, append), env).items():
                        samples.setdefault((name, depth, phase), []).append(ops / secs)
    print(
        f"# virtio-blk from ring 3 (blkbench, 4 KiB requests, {args.ops} per phase, image {args.size_mib} MiB), "
        f"median of {args.rounds} alternating rounds"
    )
    print(f"# host: {host_line()}")
    for name, cmd in shown.items():
        print(f"# {name}: {shlex.join(cmd)}")
    print(
        f"{'phase':<10} {'depth':>5} {'ours MB/s':>10} {'ours IOPS':>10} {'ioevfd IOPS':>11} {'qemu MB/s':>10} "
        f"{'qemu IOPS':>10} {'ours/qemu':>9}"
    )
    for depth in depths:
        for phase in phases:
            ours = median(samples[("ours", depth, phase)])
            ioev = median(samples[("ours-ioeventfd", depth, phase)])
            qemu = median(samples[("qemu", depth, phase)])
            print(
                f"{phase:<10} {depth:>5} {ours * BLOCK / 1e6:10.1f} {ours:10.0f} {ioev:11.0f} "
                f"{qemu * BLOCK / 1e6:10.1f} {qemu:10.0f} {ours / qemu:9.2f}"
            )


if __name__ == "__main__":
    main()
