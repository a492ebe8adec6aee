"""Boot the three real Hermit images the way uhyve does.

Where guest ring 0 runs natively (``vmm.hostinfo``), each image must boot,
print its greeting and leave through the uhyve exit hypercall with code 0.
Where ring 0 is emulated instruction by instruction (nested KVM-PVM), the
Hermit kernel stops at an instruction the host cannot emulate; then the
test checks how far it got (its own boot messages, through the uhyve UART
hypercall) and that the VMM named the failing instruction: RIP and bytes.

The time from VMM start to the first console byte is recorded as a test
property (``first_output_s``), never asserted.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from vmm.exitstatus import ExitReason
from vmm.hostinfo import host_info
from vmm.machine import Machine, MachineConfig

REPO = Path(__file__).resolve().parents[2]
HERMIT_DIR = Path(os.environ.get("MICROVM_HERMIT_DIR", REPO / ".." / "shared" / "guests" / "hermit"))
SHA256 = {
    "hello_world": "9ec5d6747c4ac7e1899d145a18badde148da73a42b7f9e3bfa720ba7b814f4a4",
    "hello_c": "36a3eb9896b5b9ee21b505c35425d15258f2261629d9328435def2182816af87",
    "rusty_demo": "e854349fee4c17b02f3e77ae063afb2ecc8fbf937891e3fbf7b92415431ca18f",
}
#: What each application prints once the kernel has handed over to it.
GREETING = {
    "hello_world": "Hello, world!",
    "hello_c": "Hello World!!!",
    "rusty_demo": "Calculating Pi",
}
KERNEL_ADDRESS = {"hello_world": 0x40000, "hello_c": 0x800000, "rusty_demo": 0x40000}


def image(name: str) -> Path:
    path = HERMIT_DIR / name
    if not path.is_file():
        pytest.skip(f"Hermit test image {path} not found (set MICROVM_HERMIT_DIR)")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256[name], f"{path} is not the expected image"
    return path


def boot(name: str, *, vcpus: int = 1, cmdline: str = "", timeout: float = 120.0):
    cfg = MachineConfig(kernel=image(name), mem_mib=256, vcpus=vcpus, cmdline=cmdline, timeout=timeout, acpi=False)
    with Machine(cfg) as m:  # vmm.boot.load recognises the Hermit note
        assert m.boot.protocol == "hermit"
        first: list[float] = []
        m.console.add_listener(lambda data: first or first.append(time.monotonic()))
        m.start()
        status = m.wait()
        uhyve = m.devices["uhyve"].metrics()
        return status, m.console.text(), (first[0] - m.t0 if first else None), uhyve


def check_outcome(name: str, status, text: str, uhyve: dict) -> None:
    """The full run where ring 0 is native; how far it got and a clear report otherwise."""
    assert status is not None
    assert "Welcome to Hermit 0.6.9" in text, f"no Hermit boot banner; console:\n{text[-2000:]}"
    assert f"Kernel starts at {KERNEL_ADDRESS[name]:x}" in text
    assert uhyve["errors"] == 0, uhyve["last_error"]
    assert uhyve["calls"].get("Uart", 0) > 0  # the kernel's console is uhyve's UART hypercall
    if host_info().ring0_native:
        assert status.reason is ExitReason.GUEST_EXIT, f"{status.describe()}\n{text[-2000:]}"
        assert status.code == 0
        assert GREETING[name] in text
        assert uhyve["calls"].get("Exit") == 1
        return
    # Emulated ring 0: the kernel may stop at an instruction the host cannot emulate.
    if status.reason is ExitReason.GUEST_EXIT:  # a host that emulates everything Hermit uses
        assert status.code == 0 and GREETING[name] in text
        return
    assert status.reason is ExitReason.EMULATION_FAILURE, f"{status.describe()}\n{text[-2000:]}"
    assert status.rip is not None and status.insn_bytes
    assert f"RIP {status.rip:#x}" in status.detail
    assert status.insn_bytes.hex(" ") in status.detail
    # The failing instruction lies inside the loaded kernel image.
    assert KERNEL_ADDRESS[name] <= status.rip < KERNEL_ADDRESS[name] + (16 << 20)


@pytest.mark.parametrize("name", sorted(SHA256))
def test_hermit_image_boots(name, record_property):
    status, text, first_output, uhyve = boot(name)
    record_property("first_output_s", first_output)
    record_property("exit", status.describe() if status else None)
    print(f"{name}: first console output {first_output:.4f} s after VMM start; {status.describe()}")
    assert first_output is not None
    check_outcome(name, status, text, uhyve)


def test_hermit_smp_boot_starts_every_vcpu_in_long_mode():
    """uhyve starts the APs itself: all vCPUs enter at the same entry point."""
    status, text, _, uhyve = boot("hello_world", vcpus=2)
    check_outcome("hello_world", status, text, uhyve)
    if status.reason is ExitReason.EMULATION_FAILURE:
        # The APs wait in _start for their turn; the boot processor is the one that stops.
        assert status.vcpu == 0


def test_arguments_reach_the_application():
    """argv comes from the command line through the Cmdsize/Cmdval hypercalls."""
    status, text, _, uhyve = boot("hello_world", cmdline="--flag 'two words'")
    check_outcome("hello_world", status, text, uhyve)
    if host_info().ring0_native:
        assert uhyve["calls"].get("Cmdsize") == 1 and uhyve["calls"].get("Cmdval") == 1
