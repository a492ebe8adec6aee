#!/usr/bin/env python3
"""Mutation check of the device fuzzers: break one device check at a time, see the `ci` fuzz profile catch it.

Each mutation replaces one exact piece of device code (it must occur exactly
once) in a temporary copy of the repository, never in the working tree, and
runs the fuzz tests that target that device with ``--hypothesis-profile=ci``.
A mutation is *killed* when those tests fail (not when they error out on
import); the score is killed / total.  Exit status 0 only if every mutation is
killed.

    python3 scripts/mutation_check.py            # all mutations
    python3 scripts/mutation_check.py -k fifo    # those whose name contains "fifo"
    python3 scripts/mutation_check.py --list
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    #: What the mutation breaks, in one line.
    breaks: str
    #: (file, original text, replacement) edits, each original occurring exactly once.
    edits: tuple[tuple[str, str, str], ...]
    #: The fuzz tests (pytest node ids or -k expressions) expected to catch it.
    tests: tuple[str, ...]


QUEUE = "vmm/devices/virtio/queue.py"
MMIO = "vmm/devices/virtio/mmio.py"
SERIAL = "vmm/devices/serial.py"
BLK = "vmm/devices/virtio/blk.py"
VIRTIO_TESTS = ("tests/fuzz/test_virtio_fuzz.py", "tests/fuzz/test_virtqueue_fuzz.py")

MUTATIONS = (
    Mutation(
        "chain-length-limit",
        "a chain may be longer than the queue size (loops are no longer cut)",
        ((QUEUE, "            if walked >= size:\n", "            if False:\n"),),
        VIRTIO_TESTS,
    ),
    Mutation(
        "indirect-in-indirect",
        "an INDIRECT descriptor inside an indirect table is followed",
        (
            (
                QUEUE,
                '                if indirect:\n                    raise self._fail("indirect-nested"',
                '                if False:\n                    raise self._fail("indirect-nested"',
            ),
        ),
        VIRTIO_TESTS,
    ),
    Mutation(
        "address-overflow-check",
        "a buffer's address+length is not checked against guest RAM when the chain is parsed",
        (
            (
                QUEUE,
                '                if not contains(addr, length):\n                    raise self._fail(\n                        "buffer-outside-ram"',
                '                if False:\n                    raise self._fail(\n                        "buffer-outside-ram"',
            ),
        ),
        VIRTIO_TESTS,
    ),
    Mutation(
        "uart-fifo-bound",
        "the receiver FIFO holds one byte more than 16",
        (
            (
                SERIAL,
                "        if len(self._rx) < self._rx_capacity():\n",
                "        if len(self._rx) <= self._rx_capacity():\n",
            ),
        ),
        ("tests/fuzz/test_uart_fuzz.py",),
    ),
    Mutation(
        "not-ready-check",
        "a notification reaches a queue whose QueueReady is 0",
        (
            (
                MMIO,
                '        if not q.ready:\n            self.faults["notify-queue-not-ready"]',
                '        if False:\n            self.faults["notify-queue-not-ready"]',
            ),
            (
                QUEUE,
                "        if not self.ready or self.broken:\n            return 0",
                "        if self.broken or not self.size:\n            return 0",
            ),
        ),
        VIRTIO_TESTS,
    ),
    Mutation(
        "head-in-flight",
        "a head made available again while in flight is accepted",
        ((QUEUE, "        if self._in_flight[head]:\n", "        if False:\n"),),
        VIRTIO_TESTS,
    ),
    Mutation(
        "avail-idx-ahead",
        "avail.idx more than the queue size ahead is accepted",
        ((QUEUE, "        if n > self.size:\n", "        if n > 2 * self.size + 1:\n"),),
        VIRTIO_TESTS,
    ),
    Mutation(
        "event-idx-rule",
        "with EVENT_IDX the device notifies one entry late",
        (
            (
                QUEUE,
                "need = ((new - used_event - 1) & U16_MASK) < ((new - old) & U16_MASK)",
                "need = ((new - used_event - 2) & U16_MASK) < ((new - old) & U16_MASK)",
            ),
        ),
        VIRTIO_TESTS,
    ),
    Mutation(
        "status-order",
        "DRIVER_OK is accepted without FEATURES_OK",
        ((MMIO, "            (VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK),\n", ""),),
        ("tests/fuzz/test_virtio_fuzz.py",),
    ),
    Mutation(
        "blk-capacity",
        "a request ending past the disk's capacity reaches the file",
        (
            (
                BLK,
                "        if sector > self.capacity or nbytes // SECTOR_SIZE > self.capacity - sector:\n",
                "        if sector > self.capacity:\n",
            ),
        ),
        ("tests/fuzz/test_virtio_fuzz.py",),
    ),
    Mutation(
        "uart-thre-rearm",
        "a THR write does not re-arm the THRE interrupt",
        (
            (
                SERIAL,
                "        # ... and the character leaves at once, so THR is empty again.\n        self._thre_pending = True\n",
                "        # ... and the character leaves at once, so THR is empty again.\n",
            ),
        ),
        ("tests/fuzz/test_uart_fuzz.py",),
    ),
)


def copy_tree(dst: Path) -> None:
    """The files git knows about (tracked and untracked-not-ignored), copied into ``dst``."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in files:
        if not raw:
            continue
        rel = raw.decode()
        src = ROOT / rel
        if not src.is_file():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    # The KVM bindings are built, not tracked; the fuzz tests do not need them.


def apply(tree: Path, m: Mutation) -> None:
    for rel, old, new in m.edits:
        path = tree / rel
        text = path.read_text()
        count = text.count(old)
        if count != 1:
            raise SystemExit(f"mutation {m.name}: {rel}: the text to replace occurs {count} times, not once")
        path.write_text(text.replace(old, new))


def run_one(m: Mutation, timeout: float) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        apply(tree, m)
        env = {**os.environ, "PYTHONPATH": str(tree), "HYPOTHESIS_PROFILE": "ci"}
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            "--hypothesis-profile=ci",
            "--rootdir",
            str(tree),
            *m.tests,
        ]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return "survived (timeout)", time.monotonic() - t0, ""
        took = time.monotonic() - t0
        out = proc.stdout + proc.stderr
        found = next(
            (line.strip() for line in out.splitlines() if "InvariantViolation" in line or "StepTimeout" in line), ""
        )
        if proc.returncode == 1 and " failed" in out:
            return "killed", took, found
        if proc.returncode == 0:
            return "survived", took, ""
        return f"error (pytest exit {proc.returncode})", took, out[-400:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-k", dest="select", default="", help="run only mutations whose name contains this")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per mutation (default 600)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.select in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:24} {m.breaks}")
        return 0
    killed = 0
    for m in chosen:
        verdict, took, detail = run_one(m, args.timeout)
        killed += verdict == "killed"
        print(f"{m.name:24} {verdict:22} {took:6.1f}s  {detail[:150]}", flush=True)
    print(f"mutation score: {killed}/{len(chosen)} killed")
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
