"""Fuzz programs through real KVM exits: the fuzz-agent tiny guest, on this VMM and on QEMU.

A program is a list of ``AgentOp`` (port or virtio-mmio reads and writes of
any width).  It is serialised into the initrd of the ``fuzzagent`` tiny guest
(``guests/tiny/programs/fuzzagent.c``), which runs it from ring 3, so every
access is a real port-I/O or MMIO exit, and prints what each read returned.

Three ways to run the same program:

* ``run_microvm(ops)``: this VMM, with a virtio-rng device in slot 0;
* ``expected_reads(ops)``: in process, against ``UartModel`` and
  ``TransportModel`` started in the state the guest leaves the devices in;
* ``run_qemu(ops)``: QEMU's microvm machine (``-enable-kvm``, a virtio-rng
  device on a modern virtio-mmio transport, the ISA serial port).

``compare_with_qemu`` reports the reads where this VMM and QEMU differ,
minus the ``QEMU_ALLOWLIST`` of deliberate differences, each explained.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from vmm import layout

from .models.uart import UartModel
from .models.virtio import REG, TransportModel
from .strategies import VIRTIO_MMIO_REGISTERS, interesting_ints, uart_values, virtio_register_values

FZAG_MAGIC = 0x47415A46
PORT_READ, PORT_WRITE, VIRTIO_READ, VIRTIO_WRITE = 1, 2, 3, 4
_HEADER = struct.Struct("<IIII")
_OP = struct.Struct("<BBHIQQ")
#: virtio-rng's device ID (§5): the window the agent looks for.
RNG_DEVICE_ID = 4
#: QEMU microvm's virtio-mmio transports: 24 windows of 512 bytes from 0xfeb00000.
QEMU_VIRTIO_BASE, QEMU_VIRTIO_STRIDE, QEMU_VIRTIO_COUNT = 0xFEB00000, 0x200, 24
#: The writes serial_init() (guests/tiny/lib/serial.c) makes before main(), and one THR write of the banner.
SERIAL_INIT = ((1, 0), (3, 0x80), (0, 1), (1, 0), (3, 0x03), (4, 0x03), (2, 0x07), (0, 0x0A))


@dataclass(frozen=True)
class AgentOp:
    kind: int
    size: int
    addr: int
    value: int = 0

    @property
    def is_read(self) -> bool:
        return self.kind in (PORT_READ, VIRTIO_READ)


def serialize(ops: list[AgentOp]) -> bytes:
    out = [_HEADER.pack(FZAG_MAGIC, 1, len(ops), 0)]
    out += [_OP.pack(op.kind, op.size, 0, 0, op.addr, op.value & ((1 << (8 * op.size)) - 1)) for op in ops]
    return b"".join(out)


# ---- strategies -------------------------------------------------------------------------------------
def _uart_op() -> st.SearchStrategy[AgentOp]:
    return st.builds(
        lambda write, off, size, v: AgentOp(PORT_WRITE if write else PORT_READ, size, layout.COM1_PORT + off, v),
        st.booleans(),
        st.integers(0, 7),
        st.sampled_from([1, 1, 1, 2, 4]),
        st.one_of(uart_values(), interesting_ints(32)),
    )


def _virtio_op() -> st.SearchStrategy[AgentOp]:
    # QueueNotify is left out: what a kick does depends on ring memory, which programs do not set up.
    regs = [r for r in VIRTIO_MMIO_REGISTERS if r != REG["queue_notify"]]
    offsets = st.one_of(st.sampled_from(regs), st.sampled_from(regs).map(lambda r: r + 1), st.integers(0x100, 0x120))
    return st.builds(
        lambda write, off, size, v: AgentOp(VIRTIO_WRITE if write else VIRTIO_READ, size, off, v),
        st.booleans(),
        offsets,
        st.sampled_from([4, 4, 4, 1, 2, 8]),
        virtio_register_values(),
    ).filter(lambda op: op.addr + op.size <= 0x200)


def agent_programs(*, uart: bool = True, virtio: bool = True, max_ops: int = 40) -> st.SearchStrategy[list[AgentOp]]:
    """Programs of UART port accesses and virtio-mmio register accesses (checklist 1, 3-5, 19-21)."""
    parts = ([_uart_op()] if uart else []) + ([_virtio_op()] if virtio else [])
    return st.lists(st.one_of(*parts), min_size=1, max_size=max_ops)


# ---- in process ------------------------------------------------------------------------------------
def expected_reads(ops: list[AgentOp]) -> list[int]:
    """What each read should return, from the reference models in the guest's starting state."""
    from vmm.devices.virtio.mmio import VirtioMmioTransport
    from vmm.devices.virtio.rng import VirtioRng
    from vmm.irq import RecordingIrqLine
    from vmm.memory import GuestMemory, x86_ram_layout

    uart = UartModel()
    for reg, value in SERIAL_INIT:
        uart.write(reg, 1, value)
    # The guest's memory map decides which ring addresses QueueReady accepts.
    mem = GuestMemory(x86_ram_layout(AGENT_MEM_MIB << 20, layout.MMIO_GAP_START, layout.MMIO_GAP_END))
    try:
        t = VirtioMmioTransport(VirtioRng(), mem, RecordingIrqLine())
        virtio = TransportModel(RNG_DEVICE_ID, t.offered_features, [q.max_size for q in t.queues], b"")
        reads = []
        for op in ops:
            if op.kind == PORT_READ:
                reads.append(uart.read(op.addr - layout.COM1_PORT, op.size))
            elif op.kind == PORT_WRITE:
                uart.write(op.addr - layout.COM1_PORT, op.size, op.value & ((1 << (8 * op.size)) - 1))
            elif op.kind == VIRTIO_READ:
                reads.append(virtio.read(op.addr, op.size))
            else:
                virtio.write(op.addr, op.size, op.value & ((1 << (8 * op.size)) - 1), mem)
        return reads
    finally:
        mem.close()


# ---- through real exits ---------------------------------------------------------------------------------
AGENT_MEM_MIB = 64
_RESULT = re.compile(r"^r (\d+) ([0-9a-f]+)\r?$", re.M)


@dataclass
class AgentRun:
    reads: list[int]
    exit_code: int | None
    console: str

    @property
    def complete(self) -> bool:
        return "fuzzagent: end" in self.console


def parse_console(text: str, exit_code: int | None) -> AgentRun:
    tail = text[text.rfind("fuzzagent: results") :] if "fuzzagent: results" in text else ""
    reads = [int(v, 16) for _, v in _RESULT.findall(tail)]
    return AgentRun(reads, exit_code, text)


def agent_image(fmt: str = "pvh") -> Path:
    from vmm.guestkit import tiny_guest

    return tiny_guest("fuzzagent", fmt)


def run_microvm(ops: list[AgentOp], *, timeout: float = 60.0) -> AgentRun:
    """Boot the agent on this VMM with virtio-rng in slot 0; the program travels as the initrd."""
    from vmm.devices.virtio.spec import RngSpec
    from vmm.machine import Machine, MachineConfig

    base, _ = layout.virtio_mmio_slot(0)
    with tempfile.NamedTemporaryFile(prefix="fuzzagent-", suffix=".bin") as f:
        f.write(serialize(ops))
        f.flush()
        cmdline = f"fz_vbase={base:#x} fz_vstride={layout.VIRTIO_MMIO_SIZE:#x} fz_vcount=1 fz_vdev={RNG_DEVICE_ID}"
        config = MachineConfig(
            kernel=agent_image(),
            initrd=f.name,
            cmdline=cmdline,
            mem_mib=AGENT_MEM_MIB,
            timeout=timeout,
            devices=[RngSpec()],
        )
        with Machine(config) as m:
            m.start()
            status = m.wait()
            text = m.console.text()
    return parse_console(text, status.code if status is not None else None)


def qemu_available() -> bool:
    return shutil.which("qemu-system-x86_64") is not None and os.access("/dev/kvm", os.R_OK | os.W_OK)


def run_qemu(ops: list[AgentOp], *, timeout: float = 60.0) -> AgentRun:
    """The same program on QEMU's microvm machine (KVM, modern virtio-mmio, ISA serial, isa-debug-exit)."""
    with tempfile.TemporaryDirectory(prefix="fuzzagent-qemu-") as tmp:
        prog = Path(tmp) / "program.bin"
        prog.write_bytes(serialize(ops))
        cmdline = f"fz_vbase={QEMU_VIRTIO_BASE:#x} fz_vstride={QEMU_VIRTIO_STRIDE:#x} fz_vcount={QEMU_VIRTIO_COUNT} fz_vdev={RNG_DEVICE_ID}"
        cmd = [
            "qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,pit=off,pic=off", "-enable-kvm",
            "-cpu", "host,-arch-capabilities", "-m", f"{AGENT_MEM_MIB}M", "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "stdio", "-kernel", str(agent_image()), "-initrd", str(prog),
            "-append", cmdline, "-global", "virtio-mmio.force-legacy=false", "-device", "virtio-rng-device",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode("latin-1")
            return AgentRun([], None, out)
    text = proc.stdout.decode("latin-1")
    code = proc.returncode >> 1 if proc.returncode & 1 else None  # isa-debug-exit reports (V << 1) | 1
    return parse_console(text, code)


# ---- differences from QEMU --------------------------------------------------------------------------------
#: Deliberate differences from QEMU: (kind, register or offset predicate) -> why.
QEMU_ALLOWLIST: dict[str, str] = {
    "virtio:vendor": "VendorID is ours ('PYVM'); QEMU reports its own ('QEMU').",
    "virtio:device_features": "The offered feature sets differ (QEMU offers e.g. NOTIFY_ON_EMPTY, ANY_LAYOUT, RING_RESET, ACCESS_PLATFORM).",
    "virtio:queue_num_max": "QueueNumMax is a per-VMM choice (virtio-rng here: 64; QEMU: 1024).",
    "virtio:status": "QEMU accepts any Status value (FEATURES_OK without negotiation order, cleared bits); we enforce §3.1.1's order and reject cleared bits.",
    "virtio:queue_ready": "QEMU enables a queue at QueueReady=1 in any state; we require FEATURES_OK and a valid ring (else DEVICE_NEEDS_RESET).",
    "virtio:interrupt_status": "Follows from Status: our DEVICE_NEEDS_RESET raises a configuration interrupt where QEMU has none.",
    "virtio:narrow": "QEMU answers 1/2/8-byte and unaligned register reads (warning, value 0 or a partial read); we read 0 and count a fault.",
    "virtio:shm": "SHMLen/SHMBase: no shared memory region; QEMU reads 0 where §4.2.2 asks for all ones (-1) for a missing region.",
    "virtio:config": "Past the end of the configuration space (virtio-rng has none) QEMU reads all ones; we read 0 and count a fault (§4.2.2 leaves it undefined).",
    "virtio:config_generation": "QEMU's ConfigGeneration does not change on a reset or config writes refused; ours follows our model.",
    "uart:iir-timeout": "Character timeout: we report IIR=0x0C at once for a FIFO below its trigger level (no clock); QEMU waits four character times.",
    "uart:thre": "THRE: our transmitter is instantaneous; QEMU's THRE/TEMT and the THRE interrupt follow its transmit timer.",
    "uart:lsr": "LSR after the program: transmit timing (THRE/TEMT) as above.",
    "uart:msr": "Modem inputs outside loopback: ours are a connected terminal (CTS, DSR, DCD); QEMU's depend on its chardev.",
    "uart:wide": "16/32-bit accesses: we split them into byte cycles at consecutive ports; QEMU's serial accepts only the low byte at the first port.",
}

_VIRTIO_NAMES = {v: k for k, v in REG.items()}


def classify(op: AgentOp) -> str:
    """The allowlist key a differing read falls under ("" if none)."""
    if op.kind == VIRTIO_READ:
        if op.addr >= 0x100:
            return "virtio:config"
        if op.size != 4 or op.addr % 4:
            return "virtio:narrow"
        name = _VIRTIO_NAMES.get(op.addr, "")
        if name.startswith("shm"):
            return "virtio:shm"
        key = f"virtio:{name}"
        return key if key in QEMU_ALLOWLIST else ""
    reg = op.addr - layout.COM1_PORT
    if op.size != 1:
        return "uart:wide"
    return {2: "uart:iir-timeout", 5: "uart:lsr", 6: "uart:msr"}.get(reg, "")


@dataclass
class Difference:
    index: int
    op: AgentOp
    ours: int
    qemu: int
    allowed: str

    def describe(self) -> str:
        where = f"port {self.op.addr:#x}" if self.op.kind == PORT_READ else f"virtio +{self.op.addr:#x}"
        why = f" (allowed: {QEMU_ALLOWLIST[self.allowed]})" if self.allowed else ""
        return f"read #{self.index} {where} size {self.op.size}: ours {self.ours:#x}, QEMU {self.qemu:#x}{why}"


def compare_with_qemu(ops: list[AgentOp], ours: AgentRun, qemu: AgentRun) -> list[Difference]:
    """Reads that differ between the two runs, each marked with its allowlist entry (or "")."""
    reads = [op for op in ops if op.is_read]
    out = []
    for i, (op, a, b) in enumerate(zip(reads, ours.reads, qemu.reads)):
        if a != b:
            out.append(Difference(i, op, a, b, classify(op)))
    return out
