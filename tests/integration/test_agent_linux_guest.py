"""The reference Linux guest's exec agent, end to end in a booted Debian kernel.

Stock Linux cannot finish booting on a host that emulates guest ring 0 under
KVM (docs/host-kvm.md), so this boots it under QEMU's TCG, which emulates the
whole machine in software and runs anywhere (about three seconds to the
agent's hello).  What is checked is the guest side: init.sh starting
microvm-agent from ``microvm.agent=DEVICE`` on the serial console or on a
virtio console or port (hvc0, vport0p1; modules loaded by init), and the agent answering the
plugin's own client (pytest_microvm.agent.AgentClient).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import types
from pathlib import Path

import pytest

from pytest_microvm import agent
from pytest_microvm.errors import AgentTimeout

pytestmark = pytest.mark.slow

#: Seconds for TCG to boot to the agent's hello (about 3 on the development host).
HELLO_TIMEOUT = 120.0


def host_tsc_khz() -> int:
    """The host's TSC rate, near enough: TCG's guest TSC counts host TSC ticks.

    QEMU's microvm machine has no HPET or ACPI PM timer and TCG runs the PIT
    calibration loop too unevenly, so without this the kernel sometimes finds
    no way to calibrate the TSC and hangs early in boot; ``tsc_early_khz``
    skips the calibration.
    """
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    return 2_000_000


class TcgGuest:
    """qemu-system-x86_64 -M microvm,accel=tcg with the agent's port on stdio: what AgentClient needs of a VM."""

    def __init__(self, guest, device: str, tmp) -> None:
        qemu = shutil.which("qemu-system-x86_64")
        if qemu is None:
            pytest.fail("qemu-system-x86_64 is not installed", pytrace=False)
        self.name = f"linux-tcg-{device}"
        self.spec = types.SimpleNamespace(timeout=HELLO_TIMEOUT)
        self.exit_status = None
        self.serial_log = tmp / "serial.log"
        argv = [qemu, "-M", "microvm,accel=tcg", "-cpu", "max", "-m", "256", "-nodefaults", "-no-user-config",
                "-display", "none", "-no-reboot", "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
                "-append", f"console=ttyS0 quiet panic=-1 tsc_early_khz={host_tsc_khz()} microvm.agent={device}"]
        if device == "ttyS0":
            argv += ["-serial", "stdio"]
        else:
            port = "virtconsole" if device.startswith("hvc") else "virtserialport"
            argv += ["-serial", f"file:{self.serial_log}", "-device", "virtio-serial-device",
                     "-chardev", "stdio,id=agent", "-device", f"{port},chardev=agent"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.output = bytearray()
        self._listeners = []
        self._lock = threading.Lock()
        self.console = types.SimpleNamespace(send=self._send)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _send(self, text: str) -> int:
        data = text.encode()
        self.proc.stdin.write(data)
        self.proc.stdin.flush()
        return len(data)

    def _read(self) -> None:
        while True:
            data = self.proc.stdout.read1(1 << 16)
            if not data:
                self.exit_status = types.SimpleNamespace(describe=lambda: f"QEMU exited ({self.proc.poll()})")
                return
            with self._lock:
                self.output += data
                listeners = list(self._listeners)
            for fn in listeners:
                fn(data)

    def add_output_listener(self, fn) -> None:
        with self._lock:
            self._listeners.append(fn)
            fn(bytes(self.output))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._reader.join()


@pytest.fixture(params=["ttyS0", "hvc0", "vport0p1"])
def linux_guest(request, debian_linux, tmp_path):
    g = TcgGuest(debian_linux, request.param, tmp_path)
    yield g
    g.close()


def test_run_in_the_linux_guest(linux_guest):
    client = agent.AgentClient(linux_guest)
    r = client.run("uname -s; cat /proc/cmdline; echo err >&2; exit 3", timeout=HELLO_TIMEOUT)
    assert r.returncode == 3
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "Linux" and f"microvm.agent={linux_guest.name.rsplit('-', 1)[1]}" in lines[1]
    assert r.stderr == b"err\n"
    assert client.run(["cat"], input=bytes(range(256)) * 64).stdout == bytes(range(256)) * 64
    assert client.run("kill -TERM $$").returncode == 143
    with pytest.raises(AgentTimeout, match="TimeoutExpired: the command ran longer than its timeout"):
        client.run("sleep 60 & sleep 60", timeout=1)
    # The timeout took the whole process group: no sleep is left behind.
    assert client.run("ps -o args | grep -c '^sleep 60'", timeout=30).stdout == b"0\n"
    if not linux_guest.name.endswith("hvc0"):  # QEMU's virtconsole drops what stdio cannot take at once
        r = client.run(f"head -c {(4 << 20) + 5} /dev/zero", timeout=60)
        assert (len(r.stdout), r.stdout_truncated) == (4 << 20, 5)
    if not linux_guest.name.endswith("ttyS0"):
        log = linux_guest.serial_log.read_text(errors="replace")
        assert "microvm-initramfs: loaded virtio_console" in log
