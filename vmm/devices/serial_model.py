"""A deliberately simple reference model of the 16550A UART in ``serial.py``.

It is the oracle for the stateful and fuzz tests, so it is written the other
way round from the device: no locks, no IRQ object, no output sink; LSR and
MSR are kept as eagerly updated registers (the device derives them), the IIR
comes from a priority table, and the receiver and host queue are plain lists.
It implements the same documented choices (instantaneous transmission,
character timeout whenever a FIFO-mode receiver holds fewer bytes than the
trigger level, loopback gating the IRQ, wide accesses split into bytes,
offsets outside 0..7 undecoded), read off the datasheet rather than off the
device code.  Where the two disagree, one of them is wrong.

Observable state: the values reads return, ``output`` (transmitted bytes),
``irq_level`` and ``irq_changes`` (every change of the IRQ output, in order),
``rx`` and ``queue``, and ``counters`` with the device's ``SerialStats`` names.
"""

from __future__ import annotations

FIFO_SIZE = 16
TRIGGER_LEVELS = {0: 1, 1: 4, 2: 8, 3: 14}

# Register numbers.
RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)

# LSR bits kept in the register.
DR, OE, THRE, TEMT = 0x01, 0x02, 0x20, 0x40
# MSR delta bits and input bits.
DCTS, DDSR, TERI, DDCD = 0x01, 0x02, 0x04, 0x08
CTS, DSR, RI, DCD = 0x10, 0x20, 0x40, 0x80


class UartModel:
    def __init__(self, input_queue_limit: int = 64 * 1024) -> None:
        self.input_queue_limit = input_queue_limit
        self.queue: list[int] = []
        self.output: list[int] = []
        self.irq_level = False
        self.irq_changes: list[bool] = []
        self.host_inputs = CTS | DSR | DCD
        self.counters = {
            name: 0
            for name in (
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
        }
        self.rx: list[int] = []
        self.power_on()

    def power_on(self) -> None:
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.dll = 12
        self.dlm = 0
        self.fifo_on = False
        self.trigger = 1
        self.lsr = THRE | TEMT
        self.msr = self.host_inputs
        self.thre_interrupt = False

    # ---- derived state -------------------------------------------------------

    @property
    def loop(self) -> bool:
        return bool(self.mcr & 0x10)

    @property
    def capacity(self) -> int:
        return FIFO_SIZE if self.fifo_on else 1

    def iir_id(self) -> int:
        n = len(self.rx)
        table = [
            (0x04, self.lsr & 0x9E != 0, 0x06),
            (0x01, n > 0 and (not self.fifo_on or n >= self.trigger), 0x04),
            (0x01, self.fifo_on and 0 < n < self.trigger, 0x0C),
            (0x02, self.thre_interrupt, 0x02),
            (0x08, self.msr & 0x0F != 0, 0x00),
        ]
        for enable_bit, condition, ident in table:
            if self.ier & enable_bit and condition:
                return ident
        return 0x01

    def settle(self) -> None:
        """Recompute the IRQ output; record a change."""
        out2_drives_irq = self.mcr & 0x08 and not self.loop
        level = bool(self.iir_id() != 0x01 and out2_drives_irq)
        if level != self.irq_level:
            self.irq_level = level
            self.irq_changes.append(level)
            if level:
                self.counters["interrupts"] += 1

    def set_inputs(self, new: int) -> None:
        old = self.msr & 0xF0
        delta = self.msr & 0x0F
        if (old ^ new) & CTS:
            delta |= DCTS
        if (old ^ new) & DSR:
            delta |= DDSR
        if (old ^ new) & DCD:
            delta |= DDCD
        if old & RI and not new & RI:
            delta |= TERI
        self.msr = new | delta

    def loop_inputs(self) -> int:
        m = self.mcr
        return (CTS if m & 2 else 0) | (DSR if m & 1 else 0) | (RI if m & 4 else 0) | (DCD if m & 8 else 0)

    # ---- receiver -------------------------------------------------------------

    def sync_dr(self) -> None:
        if self.rx:
            self.lsr |= DR
        else:
            self.lsr &= ~DR

    def arrive(self, byte: int) -> None:
        self.counters["received"] += 1
        if len(self.rx) >= self.capacity:
            self.counters["overruns"] += 1
            self.lsr |= OE
            if not self.fifo_on:
                self.rx = [byte]
        else:
            self.rx.append(byte)
        self.sync_dr()

    def pull_from_queue(self) -> None:
        while not self.loop and self.queue and len(self.rx) < self.capacity:
            self.rx.append(self.queue.pop(0))
            self.counters["received"] += 1
        self.sync_dr()

    def flush_rx(self) -> None:
        self.counters["rx_discarded"] += len(self.rx)
        self.rx = []
        self.sync_dr()

    # ---- byte registers ----------------------------------------------------------

    def read_byte(self, reg: int) -> int:
        dlab = self.lcr & 0x80
        if reg == RBR_THR_DLL and dlab:
            result = self.dll
        elif reg == RBR_THR_DLL:
            result = 0
            if self.rx:
                result = self.rx.pop(0)
                self.counters["rx_bytes"] += 1
            self.sync_dr()
            self.pull_from_queue()
        elif reg == IER_DLM:
            result = self.dlm if dlab else self.ier
        elif reg == IIR_FCR:
            result = self.iir_id()
            if result == 0x02:
                self.thre_interrupt = False
            if self.fifo_on:
                result += 0xC0
        elif reg == LCR:
            result = self.lcr
        elif reg == MCR:
            result = self.mcr
        elif reg == LSR:
            result = self.lsr
            self.lsr &= ~0x9E
        elif reg == MSR:
            result = self.msr
            self.msr &= 0xF0
        elif reg == SCR:
            result = self.scr
        else:
            self.counters["ignored_accesses"] += 1
            return 0xFF
        self.settle()
        return result

    def write_byte(self, reg: int, value: int) -> None:
        dlab = self.lcr & 0x80
        if reg == RBR_THR_DLL and dlab:
            self.dll = value
        elif reg == RBR_THR_DLL:
            self.thre_interrupt = False
            self.settle()
            if self.loop:
                self.counters["loopback_bytes"] += 1
                self.arrive(value)
            else:
                self.counters["tx_bytes"] += 1
                self.output.append(value)
            self.thre_interrupt = True
        elif reg == IER_DLM and dlab:
            self.dlm = value
        elif reg == IER_DLM:
            if value & 0x02 and not self.ier & 0x02:
                self.thre_interrupt = True
            self.ier = value & 0x0F
        elif reg == IIR_FCR:
            if bool(value & 1) != self.fifo_on:
                self.flush_rx()
                self.fifo_on = bool(value & 1)
            if value & 1:
                if value & 2:
                    self.flush_rx()
                self.trigger = TRIGGER_LEVELS[value >> 6]
            self.pull_from_queue()
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self.mcr = value & 0x1F
            self.set_inputs(self.loop_inputs() if self.loop else self.host_inputs)
            self.pull_from_queue()
        elif reg == SCR:
            self.scr = value
        else:
            self.counters["ignored_accesses"] += 1
            return
        self.settle()

    # ---- what the bus and the host do ----------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if size not in range(1, 9):
            self.counters["ignored_accesses"] += 1
            return 0
        result = 0
        for i in range(size):
            result |= self.read_byte(offset + i) << (8 * i)
        return result

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in range(1, 9):
            self.counters["ignored_accesses"] += 1
            return
        for i in range(size):
            self.write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def feed(self, data: bytes) -> int:
        if self.loop:
            self.counters["dropped_in_loopback"] += len(data)
            return 0
        lost = self.counters["overruns"]
        for byte in data:
            self.arrive(byte)
        self.settle()
        return len(data) - (self.counters["overruns"] - lost)

    def queue_input(self, data: bytes) -> int:
        taken = max(0, min(len(data), self.input_queue_limit - len(self.queue)))
        self.queue.extend(data[:taken])
        self.counters["input_refused"] += len(data) - taken
        self.pull_from_queue()
        self.settle()
        return taken

    def set_modem_inputs(self, *, cts: bool, dsr: bool, ri: bool, dcd: bool) -> None:
        self.host_inputs = (CTS if cts else 0) | (DSR if dsr else 0) | (RI if ri else 0) | (DCD if dcd else 0)
        if not self.loop:
            self.set_inputs(self.host_inputs)
        self.settle()

    def reset(self) -> None:
        self.flush_rx()
        self.power_on()
        self.pull_from_queue()
        self.settle()
