"""Debian's cloud kernel on our VMM, as far as the host lets it get.

The kernel and a busybox initramfs come from Debian's packages
(guests/linux/build.py).  On a host that runs guest ring 0 natively the
kernel boots to the initramfs, loads Debian's virtio modules and uses each
device.  On a host that emulates guest ring 0 (nested KVM-PVM), stock Linux
cannot finish booting under any VMM: there the test checks everything the
kernel reports about our boot before that point (its version, our command
line, our e820 map, our ACPI tables, the DSDT with the virtio devices on it),
and nothing more.  Which host this is is measured (vmm.hostinfo).
"""

from __future__ import annotations

import re
import time

import pytest

from vmm.devices.virtio.spec import BlockSpec, RngSpec
from vmm.exitstatus import ExitReason
from vmm.hostinfo import host_info
from vmm.machine import Machine, MachineConfig

pytestmark = pytest.mark.slow

CMDLINE = "console=ttyS0 earlyprintk=ttyS0 panic=-1 microvm.test=debian-kernel"
#: On an emulating host the kernel prints these within ~3 s of guest time.
EARLY_MARKERS = (
    r"Linux version \S+",
    r"Command line: " + re.escape(CMDLINE),
    r"BIOS-e820: \[mem 0x0000000000000000-0x000000000009fbff\] usable",
    r"BIOS-e820: \[mem 0x0000000000100000-0x0000000007ffffff\] usable",
    r"ACPI: RSDP 0x00000000000E0000",
    r"ACPI: XSDT 0x",
    r"ACPI: FACP 0x",
    r"ACPI: APIC 0x",
    r"ACPI: DSDT 0x([0-9A-F]+) ([0-9A-F]+)",
    r"IOAPIC\[0\]: apic_id 0, version \d+, address 0xfec00000, GSI 0-23",
)


def boot_until(m: Machine, patterns, timeout: float) -> str:
    """Start ``m`` and wait until every pattern is in the console or the VM ends."""
    m.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = m.console.text()
        if all(re.search(p, text) for p in patterns) or m.wait(0.2) is not None:
            return text
    return m.console.text()


@pytest.fixture
def disk(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(b"microvm-disk-ok\n".ljust(1 << 20, b"\0"))
    return img


def test_debian_kernel_reads_our_boot_information(debian_linux, disk):
    devices = [RngSpec(), BlockSpec(str(disk))]
    native = host_info().ring0_native
    cfg = MachineConfig(
        kernel=debian_linux.kernel,
        initrd=debian_linux.initrd,
        cmdline=CMDLINE
        + " microvm.modules=virtio_mmio,virtio_blk,virtio-rng"
        + r" microvm.cmd=ls\x20/sys/bus/virtio/devices;head\x20-c16\x20/dev/vda;head\x20-c8\x20/dev/hwrng|wc\x20-c",
        mem_mib=128,
        direct_elf=True,  # the in-guest lz4 decompressor alone takes minutes where ring 0 is emulated
        devices=devices,
        timeout=240,
    )
    with Machine(cfg) as m:
        if native:
            status = m.start().wait(240)
            text = m.console.text()
        else:
            text = boot_until(m, EARLY_MARKERS, 180)
            status = m.status
        for pattern in EARLY_MARKERS:
            assert re.search(pattern, text), f"missing {pattern!r} in:\n{text[-3000:]}"
        assert debian_linux.kernel_package.split("linux-image-")[1].split("-cloud")[0] in text
        # The DSDT the kernel found is ours, with both virtio devices in it.
        addr, length = (int(x, 16) for x in re.search(EARLY_MARKERS[8], text).groups())
        assert m.memory.read(addr, 4) == b"DSDT"
        assert m.memory.read_u32(addr + 4) == length
        dsdt = m.memory.read(addr, length)
        assert dsdt.count(b"LNRO0005") == len(devices)
        if native:
            assert status is not None and status.reason is ExitReason.GUEST_EXIT, text[-3000:]
            assert status.code == 0, text[-3000:]
            assert "MICROVM-INITRAMFS-READY" in text
            assert "microvm-initramfs: loaded virtio_mmio" in text
            assert len(re.findall(r"virtio\d+", text)) >= 2
            assert "microvm-disk-ok" in text
        else:
            # Emulated ring 0: it got this far; if it already stopped, the VMM said why.
            if status is not None:
                assert status.reason is ExitReason.EMULATION_FAILURE, status
                assert status.insn_bytes and status.rip


def test_bzimage_entry_is_accepted(debian_linux):
    """The bzImage itself (not the host-decompressed ELF) loads through the boot protocol."""
    cfg = MachineConfig(kernel=debian_linux.kernel, cmdline=CMDLINE, mem_mib=128, timeout=5)
    with Machine(cfg) as m:
        assert m.boot.protocol == "linux-bzimage"
        assert m.boot.details["boot_protocol"] >= "2.12"
        m.start()
        status = m.wait(30)
        if host_info().ring0_native:
            assert "Linux version" in m.console.text()
        else:  # decompressing 30 MB in emulated ring 0 takes minutes: it must still be running
            assert status.reason is ExitReason.TIMEOUT, status
            assert m.exits().get("internal_error", 0) == 0
