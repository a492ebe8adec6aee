"""The tiny guests on QEMU's microvm machine: a reference VMM for the images themselves.

QEMU boots the PVH ELF through its PVH option ROM, the bzImage through the
real-mode setup entry (linuxboot) and the multiboot ELF through its multiboot
ROM, so these tests check the kit independently of our own VMM.  QEMU's
isa-debug-exit turns a written value V into the exit status (V << 1) | 1.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

KIT = Path(__file__).resolve().parents[2] / "guests" / "tiny"
QEMU = shutil.which("qemu-system-x86_64")

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")

FORMATS = ("pvh", "bzimage", "multiboot")
#: The entry path each format takes on QEMU microvm.
QEMU_ENTRY = {"pvh": "pvh", "bzimage": "linux-16", "multiboot": "multiboot"}
BOOTCHECK_PLAN = 19


@pytest.fixture(scope="module")
def kit():
    spec = importlib.util.spec_from_file_location("tiny_build_qemu_tests", KIT / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.build(["hello", "exitcode", "bootcheck", "ktap", "echo"])
    return mod


@dataclass
class QemuRun:
    status: int
    output: str

    @property
    def guest_code(self) -> int | None:
        """The value the guest wrote to the debug-exit port, or None if it never did."""
        return self.status >> 1 if self.status & 1 else None


def run_qemu(
    image: Path,
    append: str = "",
    *,
    smp: int = 1,
    mem_mib: int = 128,
    initrd: Path | None = None,
    stdin: bytes | None = None,
    timeout: float = 60,
) -> QemuRun:
    cmd = [
        QEMU, "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities",
        "-smp", str(smp), "-m", str(mem_mib), "-display", "none", "-serial", "stdio",
        "-monitor", "none", "-no-reboot", "-kernel", str(image),
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-append", append,
    ]  # fmt: skip
    if initrd is not None:
        cmd += ["-initrd", str(initrd)]
    proc = subprocess.run(
        cmd,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    out = proc.stdout.decode(errors="replace").replace("\r\n", "\n")
    if proc.returncode not in (0, 1) and not proc.returncode & 1:
        pytest.fail(f"QEMU failed (status {proc.returncode}): {proc.stderr.decode(errors='replace')}\n{out}")
    return QemuRun(proc.returncode, out)


def banner(run: QemuRun, name: str) -> tuple[str, str]:
    m = re.search(rf"^tiny-guest {name}: entry (\S+), portio: (native|gp-emulated)$", run.output, re.MULTILINE)
    assert m, run.output
    return m.group(1), m.group(2)


def tap_results(output: str) -> tuple[int, list[tuple[bool, int, str]]]:
    plan = re.search(r"^1\.\.(\d+)$", output, re.MULTILINE)
    assert plan, output
    results = [
        (m.group(1) is None, int(m.group(2)), m.group(3))
        for m in re.finditer(r"^(not )?ok (\d+) - (.*)$", output, re.MULTILINE)
    ]
    return int(plan.group(1)), results


@pytest.mark.parametrize("fmt", FORMATS)
def test_hello(kit, fmt):
    run = run_qemu(kit.guest_path("hello", fmt))
    assert "Hello from tiny guest" in run.output
    entry, _ = banner(run, "hello")
    assert entry == QEMU_ENTRY[fmt]
    assert f"entry: {entry}\n" in run.output
    assert run.guest_code == 0


@pytest.mark.parametrize("code", [0, 1, 42, 127])
def test_exitcode(kit, code):
    run = run_qemu(kit.guest_path("exitcode", "pvh"), f"console=ttyS0 code={code}")
    assert f"exitcode: exiting with code {code}" in run.output
    assert run.guest_code == code


def test_exitcode_rejects_garbage(kit):
    run = run_qemu(kit.guest_path("exitcode", "bzimage"), "code=12abc")
    assert "cannot parse code=12abc" in run.output
    assert run.guest_code == kit.EXIT_BAD_CMDLINE


@pytest.mark.parametrize("fmt", FORMATS)
def test_bootcheck_passes(kit, fmt, tmp_path):
    initrd = tmp_path / "initrd.bin"
    initrd.write_bytes(os.urandom(150_000))
    append = f"mem_mib=256 vcpus=2 {kit.initrd_cmdline(initrd.read_bytes())}"
    run = run_qemu(kit.guest_path("bootcheck", fmt), append, smp=2, mem_mib=256, initrd=initrd)
    plan, results = tap_results(run.output)
    assert plan == BOOTCHECK_PLAN
    assert [n for _, n, _ in results] == list(range(1, plan + 1))
    failed = [name for ok, _, name in results if not ok]
    assert failed == [], run.output
    # Nothing that matters was skipped: these inputs exercise every check.
    skipped = [name for _, _, name in results if "# SKIP" in name]
    assert skipped == [], run.output
    assert run.guest_code == 0


def test_bootcheck_catches_a_wrong_initrd_and_memory_size(kit, tmp_path):
    initrd = tmp_path / "initrd.bin"
    data = os.urandom(4096)
    initrd.write_bytes(data)
    wrong_sum = kit.initrd_checksum(data) ^ 1
    append = f"mem_mib=512 initrd_size={len(data)} initrd_sum={wrong_sum:x}"
    run = run_qemu(kit.guest_path("bootcheck", "pvh"), append, mem_mib=128, initrd=initrd)
    _, results = tap_results(run.output)
    failed = [name for ok, _, name in results if not ok]
    assert len(failed) == 2, run.output
    assert failed[0].startswith("memory map: total RAM matches mem_mib # RAM ")
    assert failed[1].startswith("initrd checksum # crc32 ")
    assert run.guest_code == 2


def test_bootcheck_counts_every_vcpu(kit):
    run = run_qemu(kit.guest_path("bootcheck", "pvh"), "vcpus=3", smp=3)
    _, results = tap_results(run.output)
    by_name = {name.split(" # ")[0]: (ok, name) for ok, _, name in results}
    ok, detail = by_name["smp: every vCPU started with a distinct APIC ID"]
    assert ok and "2 of 2 APs" in detail, run.output
    assert by_name["acpi: MADT has one enabled LAPIC per vCPU"][0]
    # Claiming a vCPU QEMU does not have fails the MADT count and the AP start-up.
    run = run_qemu(kit.guest_path("bootcheck", "pvh"), "vcpus=4 smp_timeout_ms=200", smp=3)
    _, results = tap_results(run.output)
    failed = {name.split(" # ")[0] for ok, _, name in results if not ok}
    assert failed == {
        "acpi: MADT has one enabled LAPIC per vCPU",
        "smp: every vCPU started with a distinct APIC ID",
    }, run.output
    assert "2 of 3 APs" in run.output
    assert run.guest_code == 2


def test_ktap_document(kit):
    run = run_qemu(kit.guest_path("ktap", "multiboot"), "ktap=pass,fail:broken,skip ktap_suite=demo ktap_exit=fail")
    doc = run.output[run.output.index("KTAP version 1") :]
    assert doc.splitlines() == [
        "KTAP version 1",
        "1..1",
        "    KTAP version 1",
        "    # Subtest: demo",
        "    1..3",
        "    ok 1 case_1",
        "    # broken: expected success, got failure on request",
        "    not ok 2 broken",
        "    ok 3 case_3 # SKIP skipped on the command line",
        "# demo: pass:1 fail:1 skip:1 total:3",
        "not ok 1 demo",
    ]
    assert run.guest_code == 1


def test_ktap_stops_early(kit):
    run = run_qemu(kit.guest_path("ktap", "pvh"), "ktap=pass,pass,pass ktap_stop=2")
    assert run.output.rstrip().endswith("    ok 2 case_2")
    assert run.guest_code == 0


def test_echo(kit):
    run = run_qemu(kit.guest_path("echo", "pvh"), stdin=b"hello there\r\nsecond line\nexit 5\n")
    assert "echo: ready\necho: hello there\necho: second line\necho: exit 5\n" in run.output
    assert run.guest_code == 5
