"""The tiny kit's virtio guests driving real devices end to end, on our VMM and on QEMU microvm.

The guests (guests/tiny/programs/virtio_*.c, blkbench.c) run the kit's ring-3
virtio-mmio driver; each prints TAP and exits with its failure count.  The
host side checks what only the host can see: the bytes in the image file
after the guest flushed, a read-only image left untouched, the device's own
counters.  The same images run on QEMU's microvm machine with its
virtio-mmio devices (modern layout: ``virtio-mmio.force-legacy=false``), with
ACPI (the driver finds QEMU's windows by scanning) and without (QEMU lists
them as ``virtio_mmio.device=`` on the command line), which shows the driver
follows the spec rather than our VMM.

The console, net and vsock guests are echo services: the host talks to them
through the device's host side (the console's Unix socket, a tap in a
private network namespace, vsock's Unix sockets both ways) and checks every
answer.  QEMU has no vsock device here (vhost-vsock needs the host kernel's).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.netns import NetNamespace, TapNetwork, unavailable_reason
from vmm.devices.virtio.spec import BlockSpec, ConsoleSpec, NetSpec, RngSpec, VsockSpec
from vmm.exitstatus import ExitReason
from vmm.guestkit import kit as load_kit
from vmm.machine import Machine, MachineConfig

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")

FORMATS = ("pvh", "bzimage", "multiboot")
SECTOR = 512
IMAGE_SECTORS = 2048
SERIAL = "tiny-virtio-disk"
SEED = 0xC0FFEE
WRITE_SECTOR = 1000
WRITE_SECTORS = 8
BLK_PLAN = 15
RNG_PLAN = 8


@pytest.fixture(scope="module")
def kit():
    mod = load_kit()
    mod.build(["virtio_blk", "virtio_rng", "virtio_console", "virtio_net", "virtio_vsock", "blkbench"])
    return mod


@dataclass
class Run:
    code: int | None
    output: str


def tap(output: str, plan: int) -> dict[int, tuple[bool, str]]:
    """TAP results by number, after checking the plan and the numbering."""
    m = re.search(r"^1\.\.(\d+)$", output, re.MULTILINE)
    assert m and int(m.group(1)) == plan, output
    results = {
        int(r.group(2)): (r.group(1) is None, r.group(3))
        for r in re.finditer(r"^(not )?ok (\d+) - (.*)$", output, re.MULTILINE)
    }
    assert sorted(results) == list(range(1, plan + 1)), output
    return results


def failures(results: dict[int, tuple[bool, str]]) -> list[str]:
    return [name for ok, name in results.values() if not ok]


def run_ours(
    kernel: Path, devices: list, append: str, *, acpi: bool = True, ioeventfd: bool = False
) -> tuple[Run, dict]:
    cfg = MachineConfig(kernel=kernel, cmdline=append, devices=devices, acpi=acpi, timeout=60, ioeventfd=ioeventfd)
    with Machine(cfg) as m:
        m.start()
        status = m.wait(90)
        assert status is not None
        output = m.console.text().replace("\r\n", "\n")
        assert status.reason is ExitReason.GUEST_EXIT, f"{status}\n{output}"
        devs = {name: dev.summary() for name, dev in m.devices.items() if name.startswith("virtio-")}
    return Run(status.code, output), devs


def run_qemu(kernel: Path, device_args: list[str], append: str, *, acpi: bool = True) -> Run:
    machine = "microvm" if acpi else "microvm,acpi=off"
    cmd = [
        QEMU, "-M", machine, "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "128", "-nodefaults",
        "-no-user-config", "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-global", "virtio-mmio.force-legacy=false", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        *device_args, "-kernel", str(kernel), "-append", append,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=90, check=False)
    output = proc.stdout.decode(errors="replace").replace("\r\n", "\n")
    if not proc.returncode & 1:
        pytest.fail(f"QEMU ended without a debug-exit write (status {proc.returncode}): {proc.stderr!r}\n{output}")
    return Run(proc.returncode >> 1, output)


def make_image(path: Path) -> bytes:
    data = os.urandom(IMAGE_SECTORS * SECTOR)
    path.write_bytes(data)
    return data


def blk_append(kit, data: bytes, *, ro: bool = False, crc: int | None = None, serial: str = SERIAL) -> str:
    crc_sectors = 16
    words = [
        f"blk_capacity={len(data) // SECTOR}",
        f"blk_crc={zlib.crc32(data[: crc_sectors * SECTOR]) if crc is None else crc:08x}",
        f"blk_crc_sectors={crc_sectors}",
        f"blk_serial={serial}",
        f"blk_write_sector={WRITE_SECTOR}",
        f"blk_write_sectors={WRITE_SECTORS}",
        f"blk_seed={SEED:x}",
    ]
    if ro:
        words.append("blk_ro")
    return " ".join(words)


def expect_written(kit, before: bytes, after: bytes) -> None:
    """The image holds the guest's pattern at WRITE_SECTOR and is unchanged everywhere else."""
    start, end = WRITE_SECTOR * SECTOR, (WRITE_SECTOR + WRITE_SECTORS) * SECTOR
    assert len(after) == len(before)
    assert after[start:end] == kit.blk_pattern(SEED, end - start)
    assert after[:start] == before[:start] and after[end:] == before[end:]


# ---- our VMM -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_blk_read_write_flush_on_ours(kit, fmt, tmp_path):
    image = tmp_path / "disk.img"
    before = make_image(image)
    run, devs = run_ours(
        kit.guest_path("virtio_blk", fmt), [BlockSpec(str(image), serial=SERIAL)], blk_append(kit, before)
    )
    results = tap(run.output, BLK_PLAN)
    assert failures(results) == [], run.output
    assert not any("# SKIP" in name for _, name in results.values()), run.output
    assert run.code == 0
    # The pattern reached the file itself (FLUSH is an fsync), nothing else changed.
    expect_written(kit, before, image.read_bytes())
    blk = devs["virtio-blk0"]
    assert blk["faults"] == {} and blk["errors"] == {}, blk
    # The two requests that must fail did, and were counted as what they were.
    assert blk["device"]["errors"] == {"ioerr-capacity": 1, "unsupp-type": 1}, blk
    assert blk["device"]["ops"]["flush"] == 1 and blk["device"]["ops"]["get-id"] == 1


def test_blk_with_notifications_through_ioeventfds(kit, tmp_path):
    """ioeventfd=True: KVM signals an eventfd, the device answers on its own thread."""
    image = tmp_path / "disk.img"
    before = make_image(image)
    run, devs = run_ours(
        kit.guest_path("virtio_blk", "pvh"),
        [BlockSpec(str(image), serial=SERIAL)],
        blk_append(kit, before),
        ioeventfd=True,
    )
    assert failures(tap(run.output, BLK_PLAN)) == [] and run.code == 0, run.output
    expect_written(kit, before, image.read_bytes())
    blk = devs["virtio-blk0"]
    assert blk["notify_path"] == "ioeventfd" and blk["notifications"] >= 10
    assert blk["faults"] == {} and blk["errors"] == {}


def test_blk_found_through_the_cmdline_without_acpi(kit, tmp_path):
    image = tmp_path / "disk.img"
    before = make_image(image)
    run, _ = run_ours(
        kit.guest_path("virtio_blk", "bzimage"),
        [BlockSpec(str(image), serial=SERIAL)],
        blk_append(kit, before),
        acpi=False,
    )
    assert "(found by cmdline, irq 5," in run.output, run.output
    assert failures(tap(run.output, BLK_PLAN)) == [] and run.code == 0, run.output
    expect_written(kit, before, image.read_bytes())


def test_blk_read_only_image_is_untouched(kit, tmp_path):
    image = tmp_path / "disk.img"
    before = make_image(image)
    mtime = image.stat().st_mtime_ns
    run, devs = run_ours(
        kit.guest_path("virtio_blk", "pvh"),
        [BlockSpec(str(image), read_only=True, serial=SERIAL)],
        blk_append(kit, before, ro=True),
    )
    results = tap(run.output, BLK_PLAN)
    assert failures(results) == [] and run.code == 0, run.output
    assert "a write to a read-only disk returns IOERR" in results[11][1]
    assert hashlib.sha256(image.read_bytes()).digest() == hashlib.sha256(before).digest()
    assert image.stat().st_mtime_ns == mtime
    assert devs["virtio-blk0"]["device"]["errors"]["ioerr-read-only"] == 1


def test_blk_guest_reports_wrong_expectations(kit, tmp_path):
    """The checks can fail: a wrong checksum, serial and mode come back as exactly those failures."""
    image = tmp_path / "disk.img"
    data = make_image(image)
    append = blk_append(kit, data, crc=zlib.crc32(data[: 16 * SECTOR]) ^ 1, serial="wrong-serial", ro=True)
    run, _ = run_ours(kit.guest_path("virtio_blk", "pvh"), [BlockSpec(str(image), serial=SERIAL)], append)
    failed = failures(tap(run.output, BLK_PLAN))
    assert failed == [
        "VIRTIO_BLK_F_RO matches the mode # blk_ro, device writable",
        failed[1],
        failed[2],
        failed[3],
        failed[4],
    ], run.output
    assert failed[1].startswith("crc32 of the first sectors matches blk_crc # 16 sectors")
    assert failed[2] == f'GET_ID returns blk_serial # status OK, id "{SERIAL}", expected "wrong-serial"'
    # In blk_ro mode the guest expects its write to fail; on a writable disk it succeeds.
    assert failed[3].startswith("a write to a read-only disk returns IOERR # sector 1000: status OK")
    assert failed[4].startswith("the sectors read as before")
    assert run.code == 5


def test_blk_guest_without_a_disk(kit):
    run, _ = run_ours(kit.guest_path("virtio_blk", "pvh"), [RngSpec()], "")
    results = tap(run.output, BLK_PLAN)
    assert results[1] == (False, "virtio-blk device found # no virtio device with ID 2 (1 devices found)")
    assert run.code == BLK_PLAN


@pytest.mark.parametrize("fmt", FORMATS)
def test_rng_on_ours(kit, fmt):
    run, devs = run_ours(kit.guest_path("virtio_rng", fmt), [RngSpec()], "rng_bytes=256")
    assert failures(tap(run.output, RNG_PLAN)) == [] and run.code == 0, run.output
    rng = devs["virtio-rng0"]
    assert rng["faults"] == {} and rng["errors"] == {}
    assert rng["device"]["requests"] == 3 and rng["device"]["bytes_written"] == 3 * 256


def test_rng_found_behind_a_disk(kit, tmp_path):
    """Two devices: the driver picks the one with the right DeviceID from the scan."""
    image = tmp_path / "disk.img"
    make_image(image)
    run, _ = run_ours(kit.guest_path("virtio_rng", "pvh"), [BlockSpec(str(image)), RngSpec()], "")
    assert "device at 0xd0001000 (found by scan" in run.output
    assert failures(tap(run.output, RNG_PLAN)) == [] and run.code == 0, run.output


def test_blkbench_on_ours(kit, tmp_path):
    image = tmp_path / "bench.img"
    block = bytes(range(256)) * 16
    image.write_bytes(block * 256)  # 1 MiB of identical 4 KiB blocks
    run, devs = run_ours(kit.guest_path("blkbench", "pvh"), [BlockSpec(str(image))], "ops=300 depth=8")
    assert run.code == 0, run.output
    for phase in ("seqread", "randread", "seqwrite", "randwrite"):
        assert f"blkbench: begin {phase}\nblkbench: end {phase}\n" in run.output
        assert f"blkbench: {phase} ops=300 bytes=1228800 errors=0 depth=8" in run.output
    assert devs["virtio-blk0"]["device"]["ops"] == {"in": 600, "out": 600}
    # The writes wrote back blocks the reads had read: every block is still the same.
    assert image.read_bytes() == block * 256


def test_blkbench_writes_reach_the_image(kit, tmp_path):
    image = tmp_path / "bench.img"
    image.write_bytes(bytes(1 << 20))
    run, _ = run_ours(kit.guest_path("blkbench", "pvh"), [BlockSpec(str(image))], "ops=256 depth=8 phases=seqwrite")
    assert "blkbench: seqwrite ops=256 bytes=1048576 errors=0 depth=8" in run.output and run.code == 0, run.output
    # Each slot's buffer holds 0x11 * (slot + 1); the sequential phase covered every block once.
    fills = {bytes([0x11 * (s + 1)]) * 4096 for s in range(8)}
    data = image.read_bytes()
    assert all(data[i : i + 4096] in fills for i in range(0, len(data), 4096))


@pytest.mark.parametrize("ioeventfd", [False, True], ids=["exits", "ioeventfd"])
def test_used_index_never_steps_back_seen_from_another_vcpu(kit, tmp_path, ioeventfd):
    """While vCPU 0 completes requests, vCPU 1 reads used.idx in a loop: it must only move forwards.

    The device writes the index while the other vCPU runs, so the write must be
    one 16-bit store.  ``struct.pack_into`` zeroes its target first: with it,
    runs here saw tens to hundreds of steps back whenever the two vCPU threads
    ran at the same time (a loaded host may serialise them, and then nothing
    can be seen; the test never fails a correct device).  With ioeventfds the
    device writes from its own thread while vCPU 0 runs too.
    """
    image = tmp_path / "bench.img"
    image.write_bytes(bytes(1 << 20))
    cfg = MachineConfig(
        kernel=kit.guest_path("blkbench", "pvh"),
        cmdline="watch ops=8000 depth=1 phases=seqread,seqwrite,randread",
        devices=[BlockSpec(str(image))],
        vcpus=2,
        timeout=120,
        ioeventfd=ioeventfd,
    )
    with Machine(cfg) as m:
        m.start()
        status = m.wait(150)
        output = m.console.text()
    m_ = re.search(r"blkbench: watch: (\d+) reads of used\.idx, (\d+) steps back", output)
    assert m_, output
    assert int(m_.group(1)) > 0 and int(m_.group(2)) == 0, output
    assert status is not None and status.code == 0, output


# ---- QEMU microvm ----------------------------------------------------------------------
def qemu_blk_args(image: Path, *, ro: bool = False) -> list[str]:
    drive = f"if=none,file={image},format=raw,id=disk0" + (",readonly=on" if ro else "")
    return ["-drive", drive, "-device", f"virtio-blk-device,drive=disk0,serial={SERIAL}"]


@needs_qemu
@pytest.mark.parametrize("fmt,acpi", [("pvh", True), ("pvh", False), ("bzimage", False), ("multiboot", True)])
def test_blk_read_write_flush_on_qemu(kit, fmt, acpi, tmp_path):
    image = tmp_path / "disk.img"
    before = make_image(image)
    run = run_qemu(kit.guest_path("virtio_blk", fmt), qemu_blk_args(image), blk_append(kit, before), acpi=acpi)
    results = tap(run.output, BLK_PLAN)
    assert failures(results) == [] and run.code == 0, run.output
    assert not any("# SKIP" in name for _, name in results.values()), run.output
    assert ("found by cmdline" if not acpi and fmt != "multiboot" else "found by scan") in run.output
    expect_written(kit, before, image.read_bytes())


@needs_qemu
def test_blk_read_only_on_qemu(kit, tmp_path):
    image = tmp_path / "disk.img"
    before = make_image(image)
    run = run_qemu(kit.guest_path("virtio_blk", "pvh"), qemu_blk_args(image, ro=True), blk_append(kit, before, ro=True))
    assert failures(tap(run.output, BLK_PLAN)) == [] and run.code == 0, run.output
    assert image.read_bytes() == before


@needs_qemu
@pytest.mark.parametrize("acpi", [True, False])
def test_rng_on_qemu(kit, acpi):
    run = run_qemu(kit.guest_path("virtio_rng", "pvh"), ["-device", "virtio-rng-device"], "", acpi=acpi)
    assert failures(tap(run.output, RNG_PLAN)) == [] and run.code == 0, run.output


@needs_qemu
def test_blkbench_on_qemu(kit, tmp_path):
    image = tmp_path / "bench.img"
    image.write_bytes(bytes(1 << 20))
    run = run_qemu(kit.guest_path("blkbench", "pvh"), qemu_blk_args(image), "ops=300 depth=8")
    assert run.code == 0, run.output
    for phase in ("seqread", "randread", "seqwrite", "randwrite"):
        assert f"blkbench: {phase} ops=300 bytes=1228800 errors=0 depth=8" in run.output


@needs_qemu
def test_used_index_never_steps_back_on_qemu(kit, tmp_path):
    image = tmp_path / "bench.img"
    image.write_bytes(bytes(1 << 20))
    run = run_qemu(
        kit.guest_path("blkbench", "pvh"),
        [*qemu_blk_args(image), "-smp", "2"],
        "watch ops=8000 depth=1 phases=seqread,seqwrite,randread",
    )
    assert re.search(r"blkbench: watch: [1-9]\d* reads of used\.idx, 0 steps back", run.output), run.output
    assert run.code == 0, run.output


# ---- console, net and vsock: echo services ---------------------------------------------------
class Lines:
    """Line reader over a stream socket with a deadline."""

    def __init__(self, sock: socket.socket, timeout: float = 20.0) -> None:
        self.sock = sock
        self.buf = b""
        sock.settimeout(timeout)

    def readline(self) -> bytes:
        while b"\n" not in self.buf:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError(f"connection closed; unread {self.buf!r}")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line


@contextlib.contextmanager
def running(kernel: Path, devices: list, append: str, *, build=Machine):
    """A started machine; on leaving, waits for the guest to end and closes it."""
    m = build(MachineConfig(kernel=kernel, cmdline=append, devices=devices, timeout=60))
    with m:
        m.start()
        yield m
        m.wait(70)


def wait_console(m: Machine, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in m.console.text():
        assert m.running and time.monotonic() < deadline, m.console.text()
        time.sleep(0.005)


def test_console_echo_on_ours(kit, tmp_path):
    path = str(tmp_path / "console.sock")
    with running(kit.guest_path("virtio_console", "pvh"), [ConsoleSpec(path)], "") as m:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        lines = Lines(client)
        assert lines.readline() == b"console: ready"
        client.sendall(b"hello\r\nsecond ")
        assert lines.readline() == b"echo: hello"
        client.sendall(b"line\n" + b"x" * 300 + b"\nexit 7\n")
        assert lines.readline() == b"echo: second line"
        assert lines.readline() == b"echo: " + b"x" * 200  # lines are cut at 200 bytes
        assert lines.readline() == b"echo: exit 7"
        client.close()
    assert m.status is not None and m.status.code == 7, m.console.text()
    summary = m.devices["virtio-console0"].summary()
    assert summary["faults"] == {} and summary["errors"] == {} and summary["device"]["errors"] == {}


@needs_qemu
def test_console_echo_on_qemu(kit, tmp_path):
    path = tmp_path / "console.sock"
    cmd = [
        QEMU, "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "128", "-nodefaults",
        "-no-user-config", "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-global", "virtio-mmio.force-legacy=false", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        "-chardev", f"socket,id=con0,path={path},server=on,wait=on",
        "-device", "virtio-serial-device", "-device", "virtconsole,chardev=con0",
        "-kernel", str(kit.guest_path("virtio_console", "pvh")),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not path.exists():  # QEMU starts the guest once we are connected (wait=on)
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.01)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        lines = Lines(client)
        assert lines.readline() == b"console: ready"
        client.sendall(b"from the host\nexit 5\n")
        assert lines.readline() == b"echo: from the host"
        assert lines.readline() == b"echo: exit 5"
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == (5 << 1) | 1, out.decode(errors="replace")


def needs_netns():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"needs a private network namespace with a tap: {reason}")


def net_append(net: TapNetwork) -> str:
    return f"net_host_mac={net.host_mac} net_host_ip={net.host_ip} net_guest_ip={net.guest_ip} net_port=5000"


def udp_echo_session(net: TapNetwork, host: socket.socket) -> None:
    """The guest's greeting, two echoes, the last of which ends it."""
    host.settimeout(20)
    assert host.recvfrom(2048) == (b"hello from the guest", (net.guest_ip, 4000))
    host.sendto(b"ping " + bytes(range(256)) * 4, (net.guest_ip, 4000))
    assert host.recvfrom(2048) == (b"echo: ping " + bytes(range(256)) * 4, (net.guest_ip, 4000))
    host.sendto(b"exit", (net.guest_ip, 4000))
    assert host.recvfrom(2048) == (b"echo: exit", (net.guest_ip, 4000))


def test_net_udp_echo_on_ours(kit):
    needs_netns()
    with NetNamespace() as ns:
        net = TapNetwork.create(ns)
        host = ns.socket()
        host.bind((net.host_ip, 5000))
        devices = [NetSpec(tap=net.name, mac=net.guest_mac)]
        # The tap is opened in the namespace: the machine is built by the namespace's thread.
        build = lambda cfg: ns.run(Machine, cfg)  # noqa: E731
        with running(kit.guest_path("virtio_net", "pvh"), devices, net_append(net), build=build) as m:
            net.wait_operational()
            udp_echo_session(net, host)
        host.close()
    assert m.status is not None and m.status.code == 0, m.console.text()
    assert "virtio_net: mac 52:54:00:00:00:02, link up" in m.console.text()
    summary = m.devices["virtio-net0"].summary()
    assert summary["device"]["errors"] == {} and summary["device"]["ops"] == {"tx": 3, "rx": 2}


@needs_qemu
def test_net_udp_echo_on_qemu(kit):
    needs_netns()
    with NetNamespace() as ns:
        net = TapNetwork.create(ns)
        host = ns.socket()
        host.bind((net.host_ip, 5000))
        cmd = [
            QEMU, "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "128", "-nodefaults",
            "-no-user-config", "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
            "-global", "virtio-mmio.force-legacy=false", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-netdev", f"tap,id=net0,ifname={net.name},script=no,downscript=no",
            "-device", f"virtio-net-device,netdev=net0,mac={net.guest_mac}",
            "-kernel", str(kit.guest_path("virtio_net", "pvh")), "-append", net_append(net),
        ]  # fmt: skip
        proc = ns.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            net.wait_operational()
            udp_echo_session(net, host)
            out, _ = proc.communicate(timeout=30)
        finally:
            proc.kill()
            proc.wait()
            host.close()
    assert proc.returncode == 1, out.decode(errors="replace")  # exit code 0
    assert b"virtio_net: 2 echoed, 0 other frames ignored" in out


def test_vsock_echo_both_ways_on_ours(kit, tmp_path):
    path = str(tmp_path / "v.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + "_5000")
    listener.listen(1)
    listener.settimeout(20)
    append = "vsock_connect=5000 vsock_listen=6000"
    with running(kit.guest_path("virtio_vsock", "pvh"), [VsockSpec(cid=7, path=path)], append) as m:
        # The guest connects to host port 5000: a connection on <path>_5000.
        conn, _ = listener.accept()
        lines = Lines(conn)
        assert lines.readline() == b"vsock: connected 49152"
        conn.sendall(b"ping\n" + b"y" * 100 + b"\nsecond\n")
        assert [lines.readline() for _ in range(3)] == [b"echo: ping", b"echo: " + b"y" * 100, b"echo: second"]
        conn.close()  # SHUTDOWN to the guest, which answers RST and goes on to listen
        wait_console(m, "virtio_vsock: listening on port 6000")
        # The host connects to guest port 6000 through <path> (Firecracker's CONNECT protocol).
        host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host.connect(path)
        lines = Lines(host)
        host.sendall(b"CONNECT 6000\n")
        ok = lines.readline()
        assert re.fullmatch(rb"OK \d+", ok), ok
        assert lines.readline() == b"vsock: accepted 6000"
        host.sendall(b"pong\n")
        assert lines.readline() == b"echo: pong"
        host.shutdown(socket.SHUT_WR)
        assert host.recv(100) == b""  # the guest's RST closes our side
        host.close()
    listener.close()
    assert m.status is not None and m.status.code == 0, m.console.text()
    assert "virtio_vsock: guest cid 7" in m.console.text()
    summary = m.devices["virtio-vsock0"].summary()
    assert summary["faults"] == {} and summary["device"]["errors"] == {}, summary
    assert summary["device"]["connections"] == {}
