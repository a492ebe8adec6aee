"""A reference model of the 16550A UART in ``vmm.devices.serial``.

The oracle of the UART state machine.  It follows the PC16550D datasheet and
the choices ``serial.py`` documents (instantaneous transmission, character
timeout whenever a FIFO-mode receiver holds fewer bytes than the trigger
level, OUT2 gating the IRQ and loopback forcing it low, LSR/MSR writes
ignored, offsets outside 0..7 undecoded, wide accesses split into byte cycles
lowest first).  It is written as tables and plain lists, not as a copy of the
device: where the two disagree, one of them is wrong.

Observable: the value each read returns, ``output`` (bytes sent to the host),
``irq_edges`` (every change of the IRQ output, in order), ``rx`` and
``host_queue`` (levels only), and ``counters`` under ``SerialStats`` names.
"""

from __future__ import annotations

FIFO_DEPTH = 16
TRIGGER = (1, 4, 8, 14)

# Register numbers (PC16550D Table II).
RBR, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)
DLAB = 0x80

# Interrupt identifications, highest priority first, with the IER bit that enables each.
ID_LINE_STATUS, ID_RX_DATA, ID_TIMEOUT, ID_THRE, ID_MODEM, ID_NONE = 0x06, 0x04, 0x0C, 0x02, 0x00, 0x01

# MCR bits.
DTR, RTS, OUT1, OUT2, LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
# MSR input bits and their delta bits.
CTS, DSR, RI, DCD = 0x10, 0x20, 0x40, 0x80
DCTS, DDSR, TERI, DDCD = 0x01, 0x02, 0x04, 0x08
#: In loopback the outputs drive the inputs: MCR bit -> MSR bit.
LOOPBACK_WIRING = ((RTS, CTS), (DTR, DSR), (OUT1, RI), (OUT2, DCD))
#: MSR input bit -> delta bit for a change in either direction (RI: trailing edge only).
DELTA_ON_CHANGE = ((CTS, DCTS), (DSR, DDSR), (DCD, DDCD))

COUNTERS = (
    "tx_bytes",
    "loopback_bytes",
    "received",
    "rx_bytes",
    "overruns",
    "rx_discarded",
    "dropped_in_loopback",
    "input_refused",
    "interrupts",
    "ignored_accesses",
    "output_errors",
)


class UartModel:
    """The UART as the guest and the host see it."""

    def __init__(self, input_queue_limit: int = 64 * 1024) -> None:
        self.input_queue_limit = input_queue_limit
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.output = bytearray()
        self.irq_edges: list[bool] = []
        self.irq = False
        self.rx: list[int] = []
        self.host_queue: list[int] = []
        self.line_inputs = CTS | DSR | DCD
        self._power_on()

    def _power_on(self) -> None:
        self.regs = {"ier": 0, "lcr": 0, "mcr": 0, "scr": 0, "dll": 12, "dlm": 0}
        self.fifo = False
        self.trigger = 1
        self.line_errors = 0  # LSR bits 1-4, 7: only OE can happen here
        self.msr_delta = 0
        self.thre = False

    # ---- derived state -----------------------------------------------------
    @property
    def capacity(self) -> int:
        return FIFO_DEPTH if self.fifo else 1

    @property
    def loop(self) -> bool:
        return bool(self.regs["mcr"] & LOOP)

    def inputs(self) -> int:
        if not self.loop:
            return self.line_inputs
        mcr = self.regs["mcr"]
        return sum(msr for out, msr in LOOPBACK_WIRING if mcr & out)

    def interrupt_id(self) -> int:
        ier = self.regs["ier"]
        pending = [
            (ier & 0x04 and self.line_errors, ID_LINE_STATUS),
            (ier & 0x01 and self.rx and (not self.fifo or len(self.rx) >= self.trigger), ID_RX_DATA),
            (ier & 0x01 and self.rx, ID_TIMEOUT),
            (ier & 0x02 and self.thre, ID_THRE),
            (ier & 0x08 and self.msr_delta, ID_MODEM),
        ]
        for cond, ident in pending:
            if cond:
                return ident
        return ID_NONE

    def lsr(self) -> int:
        return 0x60 | self.line_errors | (0x01 if self.rx else 0)

    # ---- bookkeeping ---------------------------------------------------------
    def _irq_update(self) -> None:
        level = self.interrupt_id() != ID_NONE and self.regs["mcr"] & (OUT2 | LOOP) == OUT2
        if level != self.irq:
            self.irq = level
            self.irq_edges.append(level)
            if level:
                self.counters["interrupts"] += 1

    def _modem_change(self, before: int) -> None:
        after = self.inputs()
        for bit, delta in DELTA_ON_CHANGE:
            if (before ^ after) & bit:
                self.msr_delta |= delta
        if before & RI and not after & RI:
            self.msr_delta |= TERI

    def _arrive(self, byte: int) -> None:
        self.counters["received"] += 1
        if len(self.rx) < self.capacity:
            self.rx.append(byte)
            return
        self.line_errors |= 0x02
        self.counters["overruns"] += 1
        if not self.fifo:
            self.rx[0] = byte

    def _refill(self) -> None:
        if self.loop:
            return
        while self.host_queue and len(self.rx) < self.capacity:
            self.rx.append(self.host_queue.pop(0))
            self.counters["received"] += 1

    def _drop_rx(self) -> None:
        self.counters["rx_discarded"] += len(self.rx)
        self.rx.clear()

    # ---- guest side -------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if not 1 <= size <= 8:
            self.counters["ignored_accesses"] += 1
            return 0
        return sum(self._read_byte(offset + i) << (8 * i) for i in range(size))

    def write(self, offset: int, size: int, value: int) -> None:
        if not 1 <= size <= 8:
            self.counters["ignored_accesses"] += 1
            return
        for i in range(size):
            self._write_byte(offset + i, value >> (8 * i) & 0xFF)

    def _read_byte(self, reg: int) -> int:
        if not 0 <= reg < 8:
            self.counters["ignored_accesses"] += 1
            return 0xFF
        dlab = self.regs["lcr"] & DLAB
        if reg == RBR and dlab:
            value = self.regs["dll"]
        elif reg == RBR:
            value = 0
            if self.rx:
                value = self.rx.pop(0)
                self.counters["rx_bytes"] += 1
                self._refill()
        elif reg == IER:
            value = self.regs["dlm"] if dlab else self.regs["ier"]
        elif reg == IIR:
            value = self.interrupt_id()
            if value == ID_THRE:
                self.thre = False
            value |= 0xC0 if self.fifo else 0
        elif reg == LSR:
            value = self.lsr()
            self.line_errors = 0
        elif reg == MSR:
            value = self.msr_delta | self.inputs()
            self.msr_delta = 0
        else:
            value = self.regs[{LCR: "lcr", MCR: "mcr", SCR: "scr"}[reg]]
        self._irq_update()
        return value

    def _write_byte(self, reg: int, value: int) -> None:
        if not 0 <= reg < 8 or reg in (LSR, MSR):
            self.counters["ignored_accesses"] += 1
            return
        dlab = self.regs["lcr"] & DLAB
        if reg == RBR and dlab:
            self.regs["dll"] = value
        elif reg == RBR:
            self.thre = False
            self._irq_update()
            if self.loop:
                self.counters["loopback_bytes"] += 1
                self._arrive(value)
            else:
                self.output.append(value)
                self.counters["tx_bytes"] += 1
            self.thre = True
        elif reg == IER and dlab:
            self.regs["dlm"] = value
        elif reg == IER:
            value &= 0x0F
            if value & 0x02 and not self.regs["ier"] & 0x02:
                self.thre = True
            self.regs["ier"] = value
        elif reg == IIR:  # FCR
            enable = bool(value & 0x01)
            if enable != self.fifo:
                self._drop_rx()
                self.fifo = enable
            if enable:
                if value & 0x02:
                    self._drop_rx()
                self.trigger = TRIGGER[value >> 6]
            self._refill()
        elif reg == LCR:
            self.regs["lcr"] = value
        elif reg == MCR:
            before = self.inputs()
            was_loop = self.loop
            self.regs["mcr"] = value & 0x1F
            self._modem_change(before)
            if was_loop and not self.loop:
                self._refill()
        else:
            self.regs["scr"] = value
        self._irq_update()

    # ---- host side ----------------------------------------------------------------
    def feed(self, data: bytes) -> int:
        if self.loop:
            self.counters["dropped_in_loopback"] += len(data)
            return 0
        before = self.counters["overruns"]
        for b in data:
            self._arrive(b)
        self._irq_update()
        return len(data) - (self.counters["overruns"] - before)

    def queue_input(self, data: bytes) -> int:
        room = max(0, self.input_queue_limit - len(self.host_queue))
        taken = min(room, len(data))
        self.host_queue.extend(data[:taken])
        self.counters["input_refused"] += len(data) - taken
        self._refill()
        self._irq_update()
        return taken

    def set_modem_inputs(self, *, cts: bool, dsr: bool, ri: bool, dcd: bool) -> None:
        before = self.inputs()
        self.line_inputs = (CTS if cts else 0) | (DSR if dsr else 0) | (RI if ri else 0) | (DCD if dcd else 0)
        self._modem_change(before)
        self._irq_update()

    def reset(self) -> None:
        self._drop_rx()
        self._power_on()
        self._refill()
        self._irq_update()
