"""A 16550A UART (National/TI PC16550D), the guest's console.

Modelled on the PC16550D datasheet; section names below ("Register
Description", "FIFO Interrupt Mode Operation", ...) refer to it.  The device
knows its registers, an ``IrqLine`` (the INTR pin, gated by OUT2 as on a PC)
and an ``output`` sink for transmitted bytes; it never touches KVM.

Choices where the datasheet leaves room, or where a VMM has no wire:

* Transmission is instantaneous: THR and the transmitter are always empty, so
  LSR.THRE and LSR.TEMT always read 1, and a THR write re-arms the THRE
  interrupt at once.  The write first clears the THRE interrupt (the IRQ line
  drops if nothing else is pending) and then sets it again, so a guest on an
  edge-triggered pin sees a fresh edge per character, as with a real chip.
* The baud divisor (DLL/DLM, 0 included), word length, parity, stop bits,
  break control and DMA mode are stored and read back but change no byte.
* The character timeout of FIFO mode (IIR = 0x0C) has no clock to count:
  bytes arrive all at once, so four character times of silence have always
  passed by the time the guest looks.  Hence in FIFO mode, with ERBFI set,
  an RX FIFO holding fewer bytes than the trigger level reports a character
  timeout, and one holding at least the trigger level reports received data
  available (0x04).  Either asserts INTR; the trigger level decides which
  identification the guest reads.
* Overrun (LSR.OE): in FIFO mode a byte arriving at a full 16-byte FIFO is
  dropped; in 16450 (non-FIFO) mode it replaces the unread RBR byte, whose
  character is destroyed ("Line Status Register", bit 1).  Either way one
  byte is lost, counted in ``stats.overruns``; the FIFO never grows.
* Loopback (MCR.LOOP): TX goes to RX, DTR/RTS/OUT1/OUT2 drive DSR/CTS/RI/DCD
  (with delta bits and the modem-status interrupt), nothing reaches the host
  output, and the serial input is disconnected: ``feed()`` bytes are lost
  (``stats.dropped_in_loopback``) while ``queue_input()`` bytes wait in the
  host queue.  The output pins are forced inactive in loopback, so OUT2 no
  longer enables the PC's IRQ buffer: the IRQ line is low while LOOP is set.
* Writes to LSR and MSR are ignored (the datasheet reserves LSR writes for
  factory test) and counted in ``stats.ignored_accesses``.
* Reading RBR with nothing received returns 0.
* Wide accesses are split into byte cycles at consecutive offsets, lowest
  first (see ``byteio``); offsets outside 0..7 are not decoded: they read
  0xFF and ignore writes (each such byte counts as an ignored access).

Host side: ``output`` receives transmitted bytes; ``feed()`` puts bytes on
the line at once (overrun semantics); ``queue_input()`` parks up to
``input_queue_limit`` bytes in a host queue that refills the receiver as the
guest drains it, so long input reaches a reading guest without loss.

Locking: every register access and host call holds the device lock.  The
IRQ line is driven under it (so levels never reorder between threads); the
output sink is called after it is released, under a separate output lock
taken first, so bytes reach the sink in THR-write order and a sink may call
back into the device (``feed`` from an echoing console) without deadlock.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Callable

from ..irq import IrqLine
from .byteio import UNDECODED_BYTE, split_read, split_write, valid_size

# ---- register offsets (PC16550D Table II, "Summary of Registers") -----------
UART_RBR = 0  #: Receiver Buffer Register (read, DLAB=0)
UART_THR = 0  #: Transmitter Holding Register (write, DLAB=0)
UART_DLL = 0  #: Divisor Latch LS (DLAB=1)
UART_IER = 1  #: Interrupt Enable Register (DLAB=0)
UART_DLM = 1  #: Divisor Latch MS (DLAB=1)
UART_IIR = 2  #: Interrupt Identification Register (read)
UART_FCR = 2  #: FIFO Control Register (write)
UART_LCR = 3  #: Line Control Register
UART_MCR = 4  #: Modem Control Register
UART_LSR = 5  #: Line Status Register
UART_MSR = 6  #: Modem Status Register
UART_SCR = 7  #: Scratch Register
UART_REGISTER_COUNT = 8

# ---- IER ("Interrupt Enable Register"); bits 4-7 are always 0 ---------------
IER_ERBFI = 0x01  #: received data available (and character timeout)
IER_ETBEI = 0x02  #: transmitter holding register empty
IER_ELSI = 0x04  #: receiver line status
IER_EDSSI = 0x08  #: modem status
IER_MASK = 0x0F

# ---- IIR ("Interrupt Identification Register", Table IV) --------------------
IIR_NO_INTERRUPT = 0x01  #: bit 0 set: no interrupt pending
IIR_RECEIVER_LINE_STATUS = 0x06  #: priority 1 (highest)
IIR_RECEIVED_DATA = 0x04  #: priority 2
IIR_CHARACTER_TIMEOUT = 0x0C  #: priority 2
IIR_THR_EMPTY = 0x02  #: priority 3
IIR_MODEM_STATUS = 0x00  #: priority 4 (lowest)
IIR_FIFOS_ENABLED = 0xC0  #: bits 7:6 set while FCR bit 0 is set

# ---- FCR ("FIFO Control Register") ----------------------------------------
FCR_FIFO_ENABLE = 0x01
FCR_RX_FIFO_RESET = 0x02
FCR_TX_FIFO_RESET = 0x04
FCR_DMA_MODE = 0x08
FCR_TRIGGER_SHIFT = 6
#: RCVR FIFO trigger levels selected by FCR bits 7:6.
RX_TRIGGER_LEVELS = (1, 4, 8, 14)

# ---- LCR ("Line Control Register") ----------------------------------------
LCR_DLAB = 0x80  #: divisor latch access bit

# ---- MCR ("MODEM Control Register"); bits 5-7 are always 0 ------------------
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08  #: on a PC, enables the INTR buffer to the interrupt controller
MCR_LOOP = 0x10
MCR_MASK = 0x1F

# ---- LSR ("Line Status Register") -----------------------------------------
LSR_DR = 0x01  #: data ready
LSR_OE = 0x02  #: overrun error
LSR_PE = 0x04  #: parity error
LSR_FE = 0x08  #: framing error
LSR_BI = 0x10  #: break interrupt
LSR_THRE = 0x20  #: transmitter holding register empty
LSR_TEMT = 0x40  #: transmitter empty
LSR_RX_FIFO_ERROR = 0x80  #: FIFO mode: a PE/FE/BI byte is in the FIFO
#: The bits a LSR read clears; any of them set is a receiver line status condition.
LSR_ERROR_BITS = LSR_OE | LSR_PE | LSR_FE | LSR_BI | LSR_RX_FIFO_ERROR

# ---- MSR ("MODEM Status Register") ----------------------------------------
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04  #: trailing edge of ring indicator (RI went from 1 to 0)
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTA_BITS = 0x0F

#: Receiver and transmitter FIFO depth.
UART_FIFO_SIZE = 16
#: Default cap on host input waiting to enter the receiver.
DEFAULT_INPUT_QUEUE_LIMIT = 64 * 1024
#: Divisor after reset: 9600 baud from the PC's 1.8432 MHz clock.
DEFAULT_DIVISOR = 12
#: Modem inputs outside loopback: a connected terminal (CTS, DSR, DCD asserted).
DEFAULT_MODEM_INPUTS = MSR_CTS | MSR_DSR | MSR_DCD

OutputSink = Callable[[bytes], object]


@dataclass
class SerialStats:
    """Counters for metrics.  Accounting identity (checked by the tests):
    ``received == rx_bytes + overruns + rx_discarded + <bytes in the RX FIFO>``.
    """

    #: Bytes transmitted to the host output.
    tx_bytes: int = 0
    #: Bytes transmitted in loopback (looped back into the receiver instead).
    loopback_bytes: int = 0
    #: Bytes that reached the receiver (from the line, the host queue or loopback).
    received: int = 0
    #: Bytes the guest read from RBR.
    rx_bytes: int = 0
    #: Received bytes lost to overrun.
    overruns: int = 0
    #: Bytes discarded from the receiver by an FCR FIFO reset/mode change or reset().
    rx_discarded: int = 0
    #: ``feed()`` bytes lost because loopback disconnects the serial input.
    dropped_in_loopback: int = 0
    #: ``queue_input()`` bytes refused because the host queue was full.
    input_refused: int = 0
    #: Rising edges of the IRQ output.
    interrupts: int = 0
    #: Writes to LSR/MSR, undecoded offsets and access widths outside 1..8.
    ignored_accesses: int = 0
    #: Exceptions raised by the output sink (the bytes are lost, the vCPU goes on).
    output_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Serial:
    """A 16550A UART behind eight I/O ports (register ``SIZE`` ports on the bus)."""

    SIZE = UART_REGISTER_COUNT

    def __init__(
        self,
        irq: IrqLine,
        output: OutputSink | None = None,
        *,
        input_queue_limit: int = DEFAULT_INPUT_QUEUE_LIMIT,
    ) -> None:
        if input_queue_limit < 0:
            raise ValueError(f"serial: input_queue_limit {input_queue_limit} is negative")
        self._irq = irq
        self._output = output
        self._input_queue_limit = input_queue_limit
        self._lock = threading.Lock()
        self._output_lock = threading.RLock()
        self.stats = SerialStats()
        #: The last exception the output sink raised, as one line (for the machine's report).
        self.last_output_error: str | None = None
        self._host_queue = bytearray()
        self._pending_out = bytearray()
        self._rx = bytearray()
        self._irq_level = False
        self._external_modem_inputs = DEFAULT_MODEM_INPUTS
        self._reset_registers()

    # ---- bus protocol -------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if not valid_size(size):
                self.stats.ignored_accesses += 1
                return 0
            return split_read(self._read_byte, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        out = b""
        self._lock.acquire()
        try:
            if valid_size(size):
                split_write(self._write_byte, offset, size, value)
            else:
                self.stats.ignored_accesses += 1
            if self._pending_out:
                out = bytes(self._pending_out)
                self._pending_out.clear()
                # Taken before the state lock is released: sink calls keep THR order.
                self._output_lock.acquire()
        finally:
            self._lock.release()
        if out:
            try:
                self._emit(out)
            finally:
                self._output_lock.release()

    # ---- host side ------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Put ``data`` on the serial input line at once.

        Returns how many of its bytes were received without loss; the others
        were overrun (LSR.OE set) or, in loopback, never reached the receiver.
        """
        data = bytes(memoryview(data))
        with self._lock:
            if self._mcr & MCR_LOOP:
                self.stats.dropped_in_loopback += len(data)
                return 0
            lost_before = self.stats.overruns
            for byte in data:
                self._receive(byte)
            self._update_irq()
            return len(data) - (self.stats.overruns - lost_before)

    def queue_input(self, data: bytes) -> int:
        """Queue ``data`` for the receiver; it enters as the guest drains the FIFO.

        Takes at most what fits under ``input_queue_limit`` pending bytes and
        returns how many bytes it took.
        """
        data = bytes(memoryview(data))
        with self._lock:
            room = max(0, self._input_queue_limit - len(self._host_queue))
            taken = min(room, len(data))
            self._host_queue += data[:taken]
            self.stats.input_refused += len(data) - taken
            self._refill()
            self._update_irq()
            return taken

    # ---- snapshots ---------------------------------------------------------------

    _STATE_FIELDS = (
        "_ier", "_lcr", "_mcr", "_scr", "_dll", "_dlm", "_fifo_enabled", "_trigger",
        "_lsr_errors", "_msr_delta", "_thre_pending", "_external_modem_inputs",
    )

    def save_state(self) -> dict:
        """Registers, receiver FIFO and pending host input, as plain data (for snapshots)."""
        with self._lock:
            state = {name.lstrip("_"): getattr(self, name) for name in self._STATE_FIELDS}
            state["rx"] = bytes(self._rx).hex()
            state["host_queue"] = bytes(self._host_queue).hex()
            return state

    def load_state(self, state: dict) -> None:
        """Restore what ``save_state`` returned, and the interrupt line it implies."""
        with self._lock:
            for name in self._STATE_FIELDS:
                setattr(self, name, state[name.lstrip("_")])
            self._rx = bytearray(bytes.fromhex(state["rx"]))
            self._host_queue = bytearray(bytes.fromhex(state["host_queue"]))
            self._update_irq()

    def set_modem_inputs(self, *, cts: bool, dsr: bool, ri: bool, dcd: bool) -> None:
        """Drive the CTS/DSR/RI/DCD inputs (seen by the guest outside loopback)."""
        with self._lock:
            old = self._modem_inputs()
            self._external_modem_inputs = (
                (MSR_CTS if cts else 0)
                | (MSR_DSR if dsr else 0)
                | (MSR_RI if ri else 0)
                | (MSR_DCD if dcd else 0)
            )
            self._note_modem_change(old, self._modem_inputs())
            self._update_irq()

    def reset(self) -> None:
        """Master reset: registers to their datasheet reset values, receiver emptied.

        The host input queue survives (it is the host's, not the chip's) and
        refills the receiver.
        """
        with self._lock:
            self._discard_rx()
            self._reset_registers()
            self._refill()
            self._update_irq()

    def metrics(self) -> dict[str, int]:
        """Counters and levels, for the machine's metrics."""
        with self._lock:
            return {
                **self.stats.as_dict(),
                "rx_fifo_level": len(self._rx),
                "pending_input": len(self._host_queue),
            }

    @property
    def irq_level(self) -> bool:
        """The level this device drives on its IRQ line (INTR gated by OUT2, low in loopback)."""
        return self._irq_level

    @property
    def intr(self) -> bool:
        """The chip's INTR pin: an enabled interrupt condition is pending."""
        with self._lock:
            return self._interrupt_id() != IIR_NO_INTERRUPT

    @property
    def rx_fifo_level(self) -> int:
        """Bytes waiting in the receiver (RBR or RX FIFO)."""
        return len(self._rx)

    @property
    def pending_input(self) -> int:
        """Bytes waiting in the host input queue."""
        return len(self._host_queue)

    @property
    def fifo_enabled(self) -> bool:
        return self._fifo_enabled

    @property
    def rx_trigger_level(self) -> int:
        return self._trigger

    # ---- registers ------------------------------------------------------------

    def _reset_registers(self) -> None:
        # PC16550D Table III, "UART Reset Configuration".
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._dll = DEFAULT_DIVISOR & 0xFF
        self._dlm = DEFAULT_DIVISOR >> 8
        self._fifo_enabled = False
        self._trigger = RX_TRIGGER_LEVELS[0]
        self._lsr_errors = 0
        self._msr_delta = 0
        self._thre_pending = False

    def _read_byte(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == UART_RBR:
            value = self._dll if dlab else self._read_rbr()
        elif offset == UART_IER:
            value = self._dlm if dlab else self._ier
        elif offset == UART_IIR:
            value = self._interrupt_id()
            if value == IIR_THR_EMPTY:
                # Reading IIR clears a THRE interrupt it reports (Table IV).
                self._thre_pending = False
            if self._fifo_enabled:
                value |= IIR_FIFOS_ENABLED
        elif offset == UART_LCR:
            value = self._lcr
        elif offset == UART_MCR:
            value = self._mcr
        elif offset == UART_LSR:
            value = self._lsr()
            self._lsr_errors = 0
        elif offset == UART_MSR:
            value = self._msr_delta | self._modem_inputs()
            self._msr_delta = 0
        elif offset == UART_SCR:
            value = self._scr
        else:
            self.stats.ignored_accesses += 1
            return UNDECODED_BYTE
        self._update_irq()
        return value

    def _write_byte(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == UART_THR:
            if dlab:
                self._dll = value
            else:
                self._transmit(value)
        elif offset == UART_IER:
            if dlab:
                self._dlm = value
            else:
                self._write_ier(value)
        elif offset == UART_FCR:
            self._write_fcr(value)
        elif offset == UART_LCR:
            self._lcr = value
        elif offset == UART_MCR:
            self._write_mcr(value)
        elif offset == UART_SCR:
            self._scr = value
        else:
            # LSR, MSR (read-only here) and undecoded offsets.
            self.stats.ignored_accesses += 1
            return
        self._update_irq()

    def _read_rbr(self) -> int:
        if not self._rx:
            return 0
        value = self._rx[0]
        del self._rx[0]
        self.stats.rx_bytes += 1
        self._refill()
        return value

    def _transmit(self, value: int) -> None:
        # Writing THR clears the THRE interrupt ...
        self._thre_pending = False
        self._update_irq()
        if self._mcr & MCR_LOOP:
            self.stats.loopback_bytes += 1
            self._receive(value)
        else:
            self._pending_out.append(value)
            self.stats.tx_bytes += 1
        # ... and the character leaves at once, so THR is empty again.
        self._thre_pending = True

    def _write_ier(self, value: int) -> None:
        value &= IER_MASK
        if value & IER_ETBEI and not self._ier & IER_ETBEI:
            # Enabling ETBEI while THR is empty (always, here) raises THRE.
            self._thre_pending = True
        self._ier = value

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_FIFO_ENABLE)
        if enable != self._fifo_enabled:
            # Changing between FIFO and 16450 mode clears the FIFOs.
            self._discard_rx()
            self._fifo_enabled = enable
        if enable:
            # The other bits are programmed only together with FCR bit 0.
            if value & FCR_RX_FIFO_RESET:
                self._discard_rx()
            # FCR_TX_FIFO_RESET: the transmitter is always empty; nothing to clear.
            self._trigger = RX_TRIGGER_LEVELS[(value >> FCR_TRIGGER_SHIFT) & 0x3]
        self._refill()

    def _write_mcr(self, value: int) -> None:
        old_inputs = self._modem_inputs()
        was_loop = self._mcr & MCR_LOOP
        self._mcr = value & MCR_MASK
        self._note_modem_change(old_inputs, self._modem_inputs())
        if was_loop and not self._mcr & MCR_LOOP:
            self._refill()

    def _lsr(self) -> int:
        value = LSR_THRE | LSR_TEMT | self._lsr_errors
        if self._rx:
            value |= LSR_DR
        return value

    def _modem_inputs(self) -> int:
        """CTS/DSR/RI/DCD as MSR bits 4-7: the outputs in loopback, else the host's."""
        mcr = self._mcr
        if not mcr & MCR_LOOP:
            return self._external_modem_inputs
        return (
            (MSR_CTS if mcr & MCR_RTS else 0)
            | (MSR_DSR if mcr & MCR_DTR else 0)
            | (MSR_RI if mcr & MCR_OUT1 else 0)
            | (MSR_DCD if mcr & MCR_OUT2 else 0)
        )

    def _note_modem_change(self, old: int, new: int) -> None:
        changed = old ^ new
        if changed & MSR_CTS:
            self._msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_delta |= MSR_DDSR
        if changed & MSR_DCD:
            self._msr_delta |= MSR_DDCD
        if old & MSR_RI and not new & MSR_RI:
            self._msr_delta |= MSR_TERI

    # ---- receiver ---------------------------------------------------------------

    def _rx_capacity(self) -> int:
        return UART_FIFO_SIZE if self._fifo_enabled else 1

    def _receive(self, value: int) -> None:
        """One character arrives at the receiver."""
        self.stats.received += 1
        if len(self._rx) < self._rx_capacity():
            self._rx.append(value)
            return
        self._lsr_errors |= LSR_OE
        self.stats.overruns += 1
        if not self._fifo_enabled:
            # 16450 mode: the new character overwrites the unread one.
            self._rx[0] = value

    def _refill(self) -> None:
        """Move host-queued bytes into the receiver while it has room."""
        if self._mcr & MCR_LOOP or not self._host_queue:
            return
        take = min(self._rx_capacity() - len(self._rx), len(self._host_queue))
        if take > 0:
            self._rx += self._host_queue[:take]
            del self._host_queue[:take]
            self.stats.received += take

    def _discard_rx(self) -> None:
        self.stats.rx_discarded += len(self._rx)
        self._rx.clear()

    # ---- interrupts ---------------------------------------------------------------

    def _interrupt_id(self) -> int:
        """The highest-priority enabled pending interrupt, as IIR bits 3:0."""
        ier = self._ier
        if ier & IER_ELSI and self._lsr_errors:
            return IIR_RECEIVER_LINE_STATUS
        if ier & IER_ERBFI and self._rx:
            if not self._fifo_enabled or len(self._rx) >= self._trigger:
                return IIR_RECEIVED_DATA
            return IIR_CHARACTER_TIMEOUT
        if ier & IER_ETBEI and self._thre_pending:
            return IIR_THR_EMPTY
        if ier & IER_EDSSI and self._msr_delta:
            return IIR_MODEM_STATUS
        return IIR_NO_INTERRUPT

    def _update_irq(self) -> None:
        level = self._interrupt_id() != IIR_NO_INTERRUPT and (self._mcr & (MCR_OUT2 | MCR_LOOP)) == MCR_OUT2
        if level != self._irq_level:
            self._irq_level = level
            if level:
                self.stats.interrupts += 1
            self._irq.set_level(level)

    # ---- output ---------------------------------------------------------------------

    def _emit(self, data: bytes) -> None:
        if self._output is None:
            return
        try:
            self._output(data)
        except Exception as exc:  # a host sink failure must not kill the vCPU thread
            self.stats.output_errors += 1
            self.last_output_error = f"serial output sink failed: {type(exc).__name__}: {exc}"
