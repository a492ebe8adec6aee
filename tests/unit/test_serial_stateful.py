"""The UART against its reference model, under random interleavings.

Hypothesis drives register reads and writes of every width and offset (the
legal ones most of the time), host ``feed``/``queue_input``, modem input
changes and resets, and after every step compares everything observable
(read values, host output, every IRQ line transition, counters, FIFO and
queue levels) with ``vmm.devices.serial_model.UartModel`` and checks the
invariants that hold whatever the model says.

The ``ci`` settings profile bounds the run to a few seconds; longer runs
use ``run_state_machine_as_test(UartAgainstModel, settings=...)``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from vmm.devices.serial import (
    IIR_NO_INTERRUPT,
    LCR_DLAB,
    MCR_LOOP,
    MCR_OUT2,
    UART_FIFO_SIZE,
    Serial,
)
from vmm.devices.serial_model import UartModel
from vmm.irq import RecordingIrqLine

settings.register_profile(
    "ci",
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

#: Small, so tests reach the host-queue cap.
QUEUE_LIMIT = 48

#: Register values that steer the UART into its interesting states.
INTERESTING_BYTES = [
    0x00,
    0x01,
    0x02,
    0x03,
    0x07,
    0x0F,
    0x10,
    0x18,
    0x1F,
    0x41,
    0x47,
    0x80,
    0x83,
    0x87,
    0xC1,
    0xC7,
    0xFF,
]

#: Mostly the eight registers, sometimes what no driver sends.
offsets = st.one_of(st.integers(0, 7), st.integers(0, 7), st.sampled_from([-1, 8, 9, 15, 0x10000]))
sizes = st.one_of(st.just(1), st.just(1), st.sampled_from([2, 4, 8]), st.sampled_from([0, 3, 9, -1]))
byte_values = st.one_of(st.sampled_from(INTERESTING_BYTES), st.integers(0, 255))
wide_values = st.one_of(byte_values, st.integers(0, 2**64 - 1), st.integers(-(2**63), -1))
#: FCR values: FIFO on/off, each reset bit alone and together, every trigger level.
fcr_values = st.sampled_from([0x00, 0x01, 0x03, 0x05, 0x07, 0x41, 0x81, 0xC1, 0xC3, 0x06])
#: MCR values: OUT2 (IRQ gate) and LOOP on and off, with and without the other outputs.
mcr_values = st.sampled_from([0x00, 0x08, 0x0B, 0x0F, 0x10, 0x18, 0x1B, 0x1F, 0x03])


class UartAgainstModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.irq = RecordingIrqLine(4)
        self.out = bytearray()
        self.dev = Serial(self.irq, self.out.extend, input_queue_limit=QUEUE_LIMIT)
        self.model = UartModel(input_queue_limit=QUEUE_LIMIT)

    def both_write(self, offset: int, size: int, value: int) -> None:
        self.dev.write(offset, size, value)
        self.model.write(offset, size, value)

    def both_read(self, offset: int, size: int) -> int:
        value = self.dev.read(offset, size)
        assert value == self.model.read(offset, size)
        return value

    # ---- guest accesses -------------------------------------------------------

    @initialize(ier=st.integers(0, 15), fcr=fcr_values, mcr=mcr_values)
    def driver_setup(self, ier: int, fcr: int, mcr: int) -> None:
        """Start where drivers go: a configured UART, so short runs reach deep states."""
        self.configure(ier, fcr, mcr)

    @rule(ier=st.integers(0, 15), fcr=fcr_values, mcr=mcr_values)
    def configure(self, ier: int, fcr: int, mcr: int) -> None:
        """A driver's setup sequence: 8N1, FIFO control, modem control, interrupts."""
        for offset, value in ((3, 0x03), (2, fcr), (4, mcr), (1, ier)):
            self.both_write(offset, 1, value)

    @rule(offset=offsets, size=sizes)
    def read(self, offset: int, size: int) -> None:
        self.both_read(offset, size)

    @rule(offset=st.sampled_from([2, 5, 6]))
    def read_status(self, offset: int) -> None:
        """IIR, LSR, MSR: the read-to-clear registers."""
        self.both_read(offset, 1)

    @rule(offset=offsets, size=sizes, value=st.one_of(byte_values, wide_values))
    def write(self, offset: int, size: int, value: int) -> None:
        self.both_write(offset, size, value)

    @rule(ier=st.integers(0, 15))
    def write_ier(self, ier: int) -> None:
        self.both_write(3, 1, self.model.lcr & ~LCR_DLAB)
        self.both_write(1, 1, ier)

    @rule(data=st.binary(max_size=8))
    def transmit_string(self, data: bytes) -> None:
        """What a console driver does: THR writes with DLAB clear."""
        for b in data:
            self.both_write(0, 1, b)

    @precondition(lambda self: self.model.lcr & LCR_DLAB == 0)
    @rule()
    def drain_receiver(self) -> None:
        """A driver's receive loop: read RBR while LSR.DR."""
        for _ in range(QUEUE_LIMIT + UART_FIFO_SIZE + 1):
            if not self.both_read(5, 1) & 0x01:
                break
            self.both_read(0, 1)

    # ---- host side ------------------------------------------------------------------

    @rule(data=st.one_of(st.binary(min_size=1, max_size=3), st.binary(max_size=40)))
    def feed(self, data: bytes) -> None:
        assert self.dev.feed(data) == self.model.feed(data)

    @rule(data=st.binary(max_size=60))
    def queue_input(self, data: bytes) -> None:
        assert self.dev.queue_input(data) == self.model.queue_input(data)

    @rule(cts=st.booleans(), dsr=st.booleans(), ri=st.booleans(), dcd=st.booleans())
    def modem_inputs(self, cts: bool, dsr: bool, ri: bool, dcd: bool) -> None:
        self.dev.set_modem_inputs(cts=cts, dsr=dsr, ri=ri, dcd=dcd)
        self.model.set_modem_inputs(cts=cts, dsr=dsr, ri=ri, dcd=dcd)

    @rule()
    def reset(self) -> None:
        self.dev.reset()
        self.model.reset()

    # ---- agreement with the model --------------------------------------------------------

    @invariant()
    def same_output(self) -> None:
        assert bytes(self.out) == bytes(self.model.output)

    @invariant()
    def same_irq_transitions(self) -> None:
        assert [level for _, level in self.irq.events] == [int(x) for x in self.model.irq_changes]
        assert self.irq.level == self.dev.irq_level == self.model.irq_level

    @invariant()
    def same_counters(self) -> None:
        assert self.dev.stats.as_dict() == self.model.counters

    @invariant()
    def same_levels(self) -> None:
        assert self.dev.rx_fifo_level == len(self.model.rx)
        assert self.dev.pending_input == len(self.model.queue)
        assert self.dev.fifo_enabled == self.model.fifo_on

    # ---- invariants of their own -----------------------------------------------------------

    @invariant()
    def iir_priority(self) -> None:
        # The device's pending identification, without a side-effecting IIR read.
        assert self.dev._interrupt_id() == self.model.iir_id()

    @invariant()
    def irq_level_is_pending_and_enabled_and_out2(self) -> None:
        pending = self.model.iir_id() != IIR_NO_INTERRUPT
        gate = bool(self.model.mcr & MCR_OUT2) and not self.model.mcr & MCR_LOOP
        assert self.irq.level == (pending and gate)
        assert self.dev.intr == pending

    @invariant()
    def receiver_is_bounded(self) -> None:
        assert self.dev.rx_fifo_level <= (UART_FIFO_SIZE if self.dev.fifo_enabled else 1)
        assert self.dev.pending_input <= QUEUE_LIMIT

    @invariant()
    def overrun_accounting(self) -> None:
        s = self.dev.stats
        assert s.received == s.rx_bytes + s.overruns + s.rx_discarded + self.dev.rx_fifo_level
        assert s.interrupts == sum(1 for _, level in self.irq.events if level)

    @invariant()
    def queue_waits_only_behind_a_full_receiver(self) -> None:
        if self.dev.pending_input and not self.model.mcr & MCR_LOOP:
            assert self.dev.rx_fifo_level == (UART_FIFO_SIZE if self.dev.fifo_enabled else 1)


TestUartAgainstModel = UartAgainstModel.TestCase
TestUartAgainstModel.settings = settings.get_profile("ci")
