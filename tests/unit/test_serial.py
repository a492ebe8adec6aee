"""The 16550A UART, register by register (PC16550D datasheet behaviour)."""

from __future__ import annotations

import threading

import pytest

from vmm import layout
from vmm.bus import Bus
from vmm.devices.serial import (
    FCR_DMA_MODE,
    FCR_FIFO_ENABLE,
    FCR_RX_FIFO_RESET,
    FCR_TX_FIFO_RESET,
    IER_EDSSI,
    IER_ELSI,
    IER_ERBFI,
    IER_ETBEI,
    IIR_CHARACTER_TIMEOUT,
    IIR_FIFOS_ENABLED,
    IIR_MODEM_STATUS,
    IIR_NO_INTERRUPT,
    IIR_RECEIVED_DATA,
    IIR_RECEIVER_LINE_STATUS,
    IIR_THR_EMPTY,
    LCR_DLAB,
    LSR_DR,
    LSR_OE,
    LSR_TEMT,
    LSR_THRE,
    MCR_DTR,
    MCR_LOOP,
    MCR_OUT1,
    MCR_OUT2,
    MCR_RTS,
    MSR_CTS,
    MSR_DCD,
    MSR_DCTS,
    MSR_DDCD,
    MSR_DDSR,
    MSR_DSR,
    MSR_RI,
    MSR_TERI,
    UART_DLL,
    UART_DLM,
    UART_FCR,
    UART_FIFO_SIZE,
    UART_IER,
    UART_IIR,
    UART_LCR,
    UART_LSR,
    UART_MCR,
    UART_MSR,
    UART_RBR,
    UART_SCR,
    UART_THR,
    Serial,
)
from vmm.devices.serial_bench import bench_uart_register_ops
from vmm.irq import RecordingIrqLine


class Uart:
    """A UART with a recording IRQ line and a byte sink, plus one-byte accessors."""

    def __init__(self, **kwargs: object) -> None:
        self.irq = RecordingIrqLine(layout.COM1_IRQ)
        self.out = bytearray()
        self.dev = Serial(self.irq, self.out.extend, **kwargs)  # type: ignore[arg-type]

    def r(self, offset: int) -> int:
        return self.dev.read(offset, 1)

    def w(self, offset: int, value: int) -> None:
        self.dev.write(offset, 1, value)

    def levels(self) -> list[int]:
        return [level for _, level in self.irq.events]

    def iir(self) -> int:
        return self.r(UART_IIR)


@pytest.fixture
def u() -> Uart:
    return Uart()


def fifo_uart(trigger_bits: int = 0, ier: int = IER_ERBFI) -> Uart:
    u = Uart()
    u.w(UART_FCR, FCR_FIFO_ENABLE | trigger_bits)
    u.w(UART_MCR, MCR_OUT2)
    u.w(UART_IER, ier)
    return u


# ---- reset state -----------------------------------------------------------------


def test_reset_values_match_the_datasheet(u: Uart) -> None:
    assert u.r(UART_IER) == 0
    assert u.iir() == IIR_NO_INTERRUPT
    assert u.r(UART_LCR) == 0
    assert u.r(UART_MCR) == 0
    assert u.r(UART_LSR) == LSR_THRE | LSR_TEMT
    # Inputs of a connected terminal, no deltas.
    assert u.r(UART_MSR) == MSR_CTS | MSR_DSR | MSR_DCD
    assert u.r(UART_SCR) == 0
    assert u.irq.events == []
    assert not u.dev.irq_level


# ---- transmit, divisor latch, plain registers --------------------------------------


def test_thr_write_reaches_the_host_at_once(u: Uart) -> None:
    for b in b"hi\n":
        u.w(UART_THR, b)
        assert u.r(UART_LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT
    assert bytes(u.out) == b"hi\n"
    assert u.dev.stats.tx_bytes == 3


def test_dlab_switches_offsets_0_and_1_to_the_divisor_latch(u: Uart) -> None:
    u.w(UART_IER, IER_ERBFI)
    u.w(UART_LCR, LCR_DLAB | 0x03)
    u.w(UART_DLL, 0x01)
    u.w(UART_DLM, 0x00)
    assert u.r(UART_DLL) == 0x01 and u.r(UART_DLM) == 0x00
    assert u.out == b""  # the DLL write did not transmit
    u.w(UART_LCR, 0x03)
    assert u.r(UART_IER) == IER_ERBFI  # the DLM write did not touch IER
    u.w(UART_THR, ord("x"))
    assert u.out == b"x"
    u.w(UART_LCR, LCR_DLAB)
    assert (u.r(UART_DLL), u.r(UART_DLM)) == (0x01, 0x00)


def test_zero_divisor_does_not_stop_the_transmitter(u: Uart) -> None:
    u.w(UART_LCR, LCR_DLAB)
    u.w(UART_DLL, 0)
    u.w(UART_DLM, 0)
    u.w(UART_LCR, 0x03)
    u.w(UART_THR, ord("z"))
    assert u.out == b"z"


def test_dlab_does_not_hide_iir_fcr_and_the_rest(u: Uart) -> None:
    u.w(UART_LCR, LCR_DLAB)
    u.w(UART_FCR, FCR_FIFO_ENABLE)
    assert u.iir() == IIR_FIFOS_ENABLED | IIR_NO_INTERRUPT
    u.w(UART_SCR, 0x5A)
    assert u.r(UART_SCR) == 0x5A
    assert u.r(UART_LCR) == LCR_DLAB


def test_ier_reserved_bits_are_ignored(u: Uart) -> None:
    u.w(UART_IER, 0xF0)
    assert u.r(UART_IER) == 0
    u.w(UART_IER, 0xFF)
    assert u.r(UART_IER) == 0x0F


def test_mcr_reserved_bits_read_zero(u: Uart) -> None:
    u.w(UART_MCR, 0xE3)
    assert u.r(UART_MCR) == MCR_DTR | MCR_RTS


def test_lcr_and_scr_hold_any_byte(u: Uart) -> None:
    for v in (0x00, 0x1B, 0x7F):
        u.w(UART_LCR, v)
        assert u.r(UART_LCR) == v
    for v in (0x00, 0xA5, 0xFF):
        u.w(UART_SCR, v)
        assert u.r(UART_SCR) == v


def test_writes_to_lsr_and_msr_are_ignored_and_counted(u: Uart) -> None:
    u.w(UART_LSR, 0xFF)
    u.w(UART_MSR, 0xFF)
    assert u.r(UART_LSR) == LSR_THRE | LSR_TEMT
    assert u.r(UART_MSR) == MSR_CTS | MSR_DSR | MSR_DCD
    assert u.dev.stats.ignored_accesses == 2


# ---- receiver, 16450 mode ---------------------------------------------------------


def test_received_byte_sets_dr_until_read(u: Uart) -> None:
    assert u.dev.feed(b"A") == 1
    assert u.r(UART_LSR) & LSR_DR
    assert u.r(UART_RBR) == ord("A")
    assert not u.r(UART_LSR) & LSR_DR
    assert u.r(UART_RBR) == 0  # nothing received: reads 0
    assert u.dev.stats.rx_bytes == 1


def test_non_fifo_overrun_replaces_the_unread_byte(u: Uart) -> None:
    assert u.dev.feed(b"ab") == 1
    assert u.dev.rx_fifo_level == 1
    assert u.dev.stats.overruns == 1
    lsr = u.r(UART_LSR)
    assert lsr & (LSR_OE | LSR_DR) == LSR_OE | LSR_DR
    assert u.r(UART_LSR) & LSR_OE == 0  # LSR read cleared OE
    assert u.r(UART_RBR) == ord("b")


# ---- FIFOs --------------------------------------------------------------------------


def test_fifo_enable_shows_in_iir_bits_7_6(u: Uart) -> None:
    u.w(UART_FCR, FCR_FIFO_ENABLE)
    assert u.iir() & 0xC0 == IIR_FIFOS_ENABLED
    assert u.dev.fifo_enabled
    u.w(UART_FCR, 0)
    assert u.iir() & 0xC0 == 0


def test_rx_fifo_holds_16_bytes_and_drops_the_rest_with_oe(u: Uart) -> None:
    u.w(UART_FCR, FCR_FIFO_ENABLE)
    data = bytes(range(100, 120))
    assert u.dev.feed(data) == UART_FIFO_SIZE
    assert u.dev.rx_fifo_level == UART_FIFO_SIZE
    assert u.dev.stats.overruns == 4
    assert u.r(UART_LSR) & LSR_OE
    got = bytes(u.r(UART_RBR) for _ in range(UART_FIFO_SIZE))
    assert got == data[:UART_FIFO_SIZE]  # the late bytes were dropped, not the early ones
    assert not u.r(UART_LSR) & (LSR_DR | LSR_OE)


def test_fifo_never_grows_under_a_flood(u: Uart) -> None:
    u.w(UART_FCR, FCR_FIFO_ENABLE)
    for _ in range(100):
        u.dev.feed(b"x" * 1000)
        assert u.dev.rx_fifo_level <= UART_FIFO_SIZE
    assert u.dev.stats.overruns == 100 * 1000 - UART_FIFO_SIZE


def test_fcr_rx_reset_empties_the_fifo(u: Uart) -> None:
    u.w(UART_FCR, FCR_FIFO_ENABLE)
    u.dev.feed(b"12345")
    u.w(UART_FCR, FCR_FIFO_ENABLE | FCR_RX_FIFO_RESET)
    assert u.dev.rx_fifo_level == 0
    assert not u.r(UART_LSR) & LSR_DR
    assert u.dev.stats.rx_discarded == 5
    assert u.dev.fifo_enabled  # the reset bit self-clears; FIFOs stay on


def test_fcr_tx_reset_and_dma_mode_leave_the_transmitter_working(u: Uart) -> None:
    u.w(UART_FCR, FCR_FIFO_ENABLE | FCR_TX_FIFO_RESET | FCR_DMA_MODE)
    assert u.r(UART_LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT
    u.w(UART_THR, ord("k"))
    assert u.out == b"k"


def test_switching_fifo_mode_clears_the_receiver(u: Uart) -> None:
    u.dev.feed(b"a")
    u.w(UART_FCR, FCR_FIFO_ENABLE)
    assert u.dev.rx_fifo_level == 0
    u.dev.feed(b"bcd")
    u.w(UART_FCR, 0)
    assert u.dev.rx_fifo_level == 0
    assert u.dev.stats.rx_discarded == 4


def test_fcr_bits_are_not_programmed_without_bit_0(u: Uart) -> None:
    u.w(UART_FCR, FCR_FIFO_ENABLE | (2 << 6))
    assert u.dev.rx_trigger_level == 8
    u.dev.feed(b"abc")
    u.w(UART_FCR, FCR_FIFO_ENABLE | (2 << 6))  # same mode: no clear, FIFO keeps bytes
    assert u.dev.rx_fifo_level == 3
    u.w(UART_FCR, 3 << 6)  # FIFO disable: trigger bits ignored, FIFO cleared
    assert u.dev.rx_trigger_level == 8
    assert not u.dev.fifo_enabled


@pytest.mark.parametrize("bits, level", [(0, 1), (1, 4), (2, 8), (3, 14)])
def test_trigger_level_decides_data_available_versus_timeout(bits: int, level: int) -> None:
    u = fifo_uart(trigger_bits=bits << 6)
    assert u.dev.rx_trigger_level == level
    if level > 1:
        u.dev.feed(b"x" * (level - 1))
        # Below the trigger: the character timeout reports the data (and interrupts).
        assert u.iir() == IIR_FIFOS_ENABLED | IIR_CHARACTER_TIMEOUT
        assert u.dev.irq_level
    u.dev.feed(b"y")
    assert u.iir() == IIR_FIFOS_ENABLED | IIR_RECEIVED_DATA
    assert u.dev.irq_level
    u.r(UART_RBR)
    expected = IIR_CHARACTER_TIMEOUT if level > 1 else IIR_NO_INTERRUPT
    assert u.iir() == IIR_FIFOS_ENABLED | expected
    for _ in range(level - 1):
        u.r(UART_RBR)
    assert u.iir() == IIR_FIFOS_ENABLED | IIR_NO_INTERRUPT
    assert not u.dev.irq_level


def test_non_fifo_mode_reports_data_available_for_one_byte(u: Uart) -> None:
    u.w(UART_MCR, MCR_OUT2)
    u.w(UART_IER, IER_ERBFI)
    u.dev.feed(b"q")
    assert u.iir() == IIR_RECEIVED_DATA


# ---- interrupts -----------------------------------------------------------------------


def test_intr_follows_the_received_data_condition(u: Uart) -> None:
    u.w(UART_MCR, MCR_OUT2)
    u.w(UART_IER, IER_ERBFI)
    assert u.levels() == []
    u.dev.feed(b"a")
    assert u.levels() == [1]
    u.r(UART_RBR)
    assert u.levels() == [1, 0]
    assert u.dev.stats.interrupts == 1


def test_out2_gates_the_irq_line_like_a_pc(u: Uart) -> None:
    u.w(UART_IER, IER_ERBFI)
    u.dev.feed(b"a")
    assert u.dev.intr  # the chip's INTR pin is asserted ...
    assert not u.dev.irq_level and u.levels() == []  # ... but OUT2 keeps it off the bus
    u.w(UART_MCR, MCR_OUT2)
    assert u.levels() == [1]
    u.w(UART_MCR, 0)
    assert u.levels() == [1, 0]


def test_disabled_interrupts_do_not_raise_the_line(u: Uart) -> None:
    u.w(UART_MCR, MCR_OUT2)
    u.dev.feed(b"a")
    u.w(UART_THR, ord("b"))
    u.dev.set_modem_inputs(cts=False, dsr=True, ri=False, dcd=True)
    assert u.iir() == IIR_NO_INTERRUPT
    assert u.levels() == []


def test_thre_interrupt_arms_when_etbei_is_enabled_with_thr_empty(u: Uart) -> None:
    u.w(UART_MCR, MCR_OUT2)
    u.w(UART_IER, IER_ETBEI)
    assert u.levels() == [1]
    assert u.iir() == IIR_THR_EMPTY  # reading IIR that reports THRE clears it
    assert u.levels() == [1, 0]
    assert u.iir() == IIR_NO_INTERRUPT
    u.w(UART_IER, IER_ETBEI)  # no rising edge of ETBEI: nothing re-armed
    assert u.iir() == IIR_NO_INTERRUPT
    u.w(UART_IER, 0)
    u.w(UART_IER, IER_ETBEI)  # rising edge again: re-armed
    assert u.iir() == IIR_THR_EMPTY


def test_thr_write_clears_then_rearms_thre_with_a_fresh_edge(u: Uart) -> None:
    u.w(UART_MCR, MCR_OUT2)
    u.w(UART_IER, IER_ETBEI)
    assert u.levels() == [1]
    u.w(UART_THR, ord("a"))  # without reading IIR first
    assert u.levels() == [1, 0, 1]
    assert u.iir() == IIR_THR_EMPTY
    u.w(UART_THR, ord("b"))  # after IIR cleared it
    assert u.levels() == [1, 0, 1, 0, 1]
    assert u.out == b"ab"
    assert u.dev.stats.interrupts == 3


def test_thre_interrupt_disappears_with_etbei(u: Uart) -> None:
    u.w(UART_MCR, MCR_OUT2)
    u.w(UART_IER, IER_ETBEI)
    u.w(UART_IER, 0)
    assert u.levels() == [1, 0]
    assert u.iir() == IIR_NO_INTERRUPT


def test_iir_read_keeps_thre_pending_when_it_reports_something_else(u: Uart) -> None:
    u.w(UART_MCR, MCR_OUT2)
    u.w(UART_IER, IER_ERBFI | IER_ETBEI)
    u.dev.feed(b"d")
    assert u.iir() == IIR_RECEIVED_DATA
    u.r(UART_RBR)
    assert u.iir() == IIR_THR_EMPTY  # still pending: the earlier read did not report it
    assert u.iir() == IIR_NO_INTERRUPT


def test_iir_priority_order_and_read_to_clear() -> None:
    u = fifo_uart(ier=IER_ERBFI | IER_ETBEI | IER_ELSI | IER_EDSSI)
    u.dev.feed(bytes(17))  # 16 bytes + an overrun: line status and data available
    u.dev.set_modem_inputs(cts=False, dsr=True, ri=False, dcd=True)  # modem status
    fifo = IIR_FIFOS_ENABLED
    assert u.iir() == fifo | IIR_RECEIVER_LINE_STATUS
    assert u.iir() == fifo | IIR_RECEIVER_LINE_STATUS  # IIR does not clear it ...
    assert u.r(UART_LSR) & LSR_OE  # ... reading LSR does
    assert u.iir() == fifo | IIR_RECEIVED_DATA
    for _ in range(UART_FIFO_SIZE):
        u.r(UART_RBR)
    assert u.iir() == fifo | IIR_THR_EMPTY
    assert u.iir() == fifo | IIR_MODEM_STATUS  # the THRE report was cleared by the read
    assert u.iir() == fifo | IIR_MODEM_STATUS  # IIR does not clear modem status ...
    assert u.r(UART_MSR) & MSR_DCTS  # ... reading MSR does
    assert u.iir() == fifo | IIR_NO_INTERRUPT
    assert not u.dev.irq_level


def test_line_status_interrupt_needs_elsi_and_clears_on_lsr_read(u: Uart) -> None:
    u.w(UART_MCR, MCR_OUT2)
    u.w(UART_IER, IER_ELSI)
    u.dev.feed(b"ab")  # 16450 mode: overrun on the second byte
    assert u.iir() == IIR_RECEIVER_LINE_STATUS
    assert u.levels() == [1]
    assert u.r(UART_LSR) & LSR_OE
    assert u.levels() == [1, 0]
    assert u.iir() == IIR_NO_INTERRUPT
    assert u.r(UART_LSR) & LSR_DR  # the byte itself is still there


def test_msr_deltas_set_on_change_and_clear_on_read(u: Uart) -> None:
    u.w(UART_MCR, MCR_OUT2)
    u.w(UART_IER, IER_EDSSI)
    u.dev.set_modem_inputs(cts=True, dsr=True, ri=True, dcd=True)  # RI rising: no TERI
    assert u.r(UART_MSR) == MSR_CTS | MSR_DSR | MSR_RI | MSR_DCD
    assert u.levels() == []
    u.dev.set_modem_inputs(cts=False, dsr=False, ri=False, dcd=False)  # RI falling: TERI
    assert u.levels() == [1]
    assert u.iir() == IIR_MODEM_STATUS
    assert u.r(UART_MSR) == MSR_DCTS | MSR_DDSR | MSR_TERI | MSR_DDCD
    assert u.r(UART_MSR) == 0
    assert u.levels() == [1, 0]


# ---- loopback ------------------------------------------------------------------------------


def test_loopback_sends_tx_to_rx_and_nothing_to_the_host(u: Uart) -> None:
    u.w(UART_MCR, MCR_LOOP)
    u.w(UART_THR, 0x55)
    assert u.out == b""
    assert u.r(UART_LSR) & LSR_DR
    assert u.r(UART_RBR) == 0x55
    assert u.dev.stats.loopback_bytes == 1 and u.dev.stats.tx_bytes == 0


def test_loopback_connects_modem_outputs_to_inputs(u: Uart) -> None:
    # Linux's 8250 probe: MCR = LOOP|OUT2|RTS must read back MSR[7:4] = DCD|CTS.
    u.w(UART_MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS)
    assert u.r(UART_MSR) & 0xF0 == MSR_DCD | MSR_CTS
    u.w(UART_MCR, MCR_LOOP | MCR_DTR | MCR_OUT1)
    msr = u.r(UART_MSR)
    assert msr & 0xF0 == MSR_DSR | MSR_RI
    assert msr & 0x0F == MSR_DCTS | MSR_DDSR | MSR_DDCD  # CTS, DCD fell; DSR rose
    u.w(UART_MCR, MCR_LOOP)
    assert u.r(UART_MSR) == MSR_DDSR | MSR_TERI  # RI fell: trailing edge


def test_loopback_forces_the_irq_line_low(u: Uart) -> None:
    u.w(UART_MCR, MCR_OUT2)
    u.w(UART_IER, IER_ERBFI)
    u.w(UART_MCR, MCR_OUT2 | MCR_LOOP)
    u.w(UART_THR, 1)
    assert u.dev.intr  # the interrupt is pending inside the chip ...
    assert u.iir() == IIR_RECEIVED_DATA
    assert u.levels() == []  # ... but the OUT2 pin is forced inactive
    u.w(UART_MCR, MCR_OUT2)
    assert u.levels() == [1]


def test_loopback_disconnects_the_serial_input(u: Uart) -> None:
    u.w(UART_MCR, MCR_LOOP)
    assert u.dev.feed(b"lost") == 0
    assert u.dev.stats.dropped_in_loopback == 4
    assert u.dev.queue_input(b"kept") == 4
    assert u.dev.rx_fifo_level == 0 and u.dev.pending_input == 4
    u.w(UART_MCR, 0)
    assert u.r(UART_RBR) == ord("k")


def test_loopback_with_a_full_fifo_overruns(u: Uart) -> None:
    u.w(UART_FCR, FCR_FIFO_ENABLE)
    u.w(UART_MCR, MCR_LOOP)
    for i in range(20):
        u.w(UART_THR, i)
    assert u.dev.rx_fifo_level == UART_FIFO_SIZE
    assert u.dev.stats.overruns == 4
    assert u.r(UART_LSR) & LSR_OE
    assert [u.r(UART_RBR) for _ in range(UART_FIFO_SIZE)] == list(range(16))


# ---- odd accesses --------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [8, 9, 15, 0x100, -1])
def test_offsets_outside_the_chip_are_not_decoded(u: Uart, offset: int) -> None:
    assert u.dev.read(offset, 1) == 0xFF
    u.dev.write(offset, 1, 0x41)
    assert u.out == b""
    assert u.dev.stats.ignored_accesses == 2
    assert u.r(UART_SCR) == 0


def test_wide_write_is_byte_cycles_at_consecutive_offsets(u: Uart) -> None:
    u.dev.write(UART_THR, 2, (IER_ERBFI << 8) | ord("W"))
    assert u.out == b"W"
    assert u.r(UART_IER) == IER_ERBFI
    u.dev.write(UART_MCR, 4, 0x5A_66_77_0B)  # MCR=0x0B, LSR and MSR ignored, SCR=0x5A
    assert (u.r(UART_MCR), u.r(UART_SCR)) == (0x0B, 0x5A)
    assert u.dev.stats.ignored_accesses == 2


def test_wide_read_is_byte_cycles_with_their_side_effects(u: Uart) -> None:
    u.w(UART_SCR, 0x77)
    u.dev.feed(b"ab")  # overrun in 16450 mode
    value = u.dev.read(UART_LSR, 2)
    assert value & 0xFF == LSR_THRE | LSR_TEMT | LSR_OE | LSR_DR
    assert value >> 8 == MSR_CTS | MSR_DSR | MSR_DCD
    assert not u.r(UART_LSR) & LSR_OE  # the LSR byte cycle cleared OE
    assert u.dev.read(UART_MSR, 4) == 0xFFFF_7700 | (MSR_CTS | MSR_DSR | MSR_DCD)
    whole = u.dev.read(0, 8).to_bytes(8, "little")
    assert whole[0] == ord("b") and whole[7] == 0x77


@pytest.mark.parametrize("size", [0, -1, 9, 16])
def test_bad_widths_are_ignored(u: Uart, size: int) -> None:
    assert u.dev.read(UART_SCR, size) == 0
    u.dev.write(UART_THR, size, 0x41)
    assert u.out == b""
    assert u.dev.stats.ignored_accesses == 2


def test_through_the_port_bus(u: Uart) -> None:
    bus = Bus("pio")
    bus.register(layout.COM1_PORT, Serial.SIZE, u.dev, "com1")
    bus.write(layout.COM1_PORT + UART_SCR, 1, 0x12)
    assert bus.read(layout.COM1_PORT + UART_SCR, 1) == 0x12
    bus.write_bytes(layout.COM1_PORT, b"ok")  # 2-byte out: THR then IER
    assert u.out == b"o" and u.r(UART_IER) == ord("k") & 0x0F
    assert bus.read(layout.COM1_PORT + 8, 1) == 0xFF  # nothing beyond the chip
    assert bus.read(layout.COM1_PORT + UART_SCR, 2) == 0xFF12  # last byte not decoded


# ---- host input queue ------------------------------------------------------------------------


def test_queued_input_reaches_a_reading_guest_without_loss() -> None:
    u = fifo_uart(trigger_bits=3 << 6)  # trigger 14, like a Linux console
    line = bytes((i * 7 + 32) % 95 + 32 for i in range(700)) + b"\n"
    assert u.dev.queue_input(line) == len(line)
    assert u.dev.rx_fifo_level == UART_FIFO_SIZE
    got = bytearray()
    while u.r(UART_LSR) & LSR_DR:
        got.append(u.r(UART_RBR))
    assert bytes(got) == line
    assert u.dev.stats.overruns == 0
    assert u.dev.pending_input == 0
    assert not u.dev.irq_level


def test_queued_input_is_delivered_in_16450_mode_too(u: Uart) -> None:
    u.dev.queue_input(b"hello")
    assert bytes(u.r(UART_RBR) for _ in range(5)) == b"hello"
    assert u.dev.stats.overruns == 0


def test_queue_input_is_bounded() -> None:
    u = Uart(input_queue_limit=100)
    assert u.dev.queue_input(bytes(150)) == 100
    assert u.dev.rx_fifo_level == 1 and u.dev.pending_input == 99
    assert u.dev.queue_input(bytes(10)) == 1
    assert u.dev.queue_input(b"z") == 0
    assert u.dev.stats.input_refused == 50 + 9 + 1
    u.r(UART_RBR)
    assert u.dev.queue_input(b"zz") == 1


def test_queue_input_refills_after_fifo_reset() -> None:
    u = fifo_uart()
    u.dev.queue_input(bytes(range(40)))
    u.w(UART_FCR, FCR_FIFO_ENABLE | FCR_RX_FIFO_RESET)
    assert u.dev.stats.rx_discarded == 16
    assert u.r(UART_RBR) == 16


def test_feed_overruns_while_queued_input_waits() -> None:
    u = fifo_uart()
    u.dev.queue_input(bytes(20))
    assert u.dev.feed(b"!") == 0
    assert u.dev.stats.overruns == 1


def test_accounting_identity_holds() -> None:
    u = fifo_uart()
    u.dev.feed(bytes(30))
    u.dev.queue_input(bytes(10))
    for _ in range(5):
        u.r(UART_RBR)
    u.w(UART_FCR, FCR_FIFO_ENABLE | FCR_RX_FIFO_RESET)
    u.w(UART_MCR, MCR_LOOP)
    u.w(UART_THR, 1)
    s = u.dev.stats
    assert s.received == s.rx_bytes + s.overruns + s.rx_discarded + u.dev.rx_fifo_level
    assert s.received == 30 + 10 + 1 - 0  # every arrival counted once


# ---- reset, sink errors, threads --------------------------------------------------------------


def test_reset_restores_registers_and_keeps_host_input() -> None:
    u = fifo_uart(ier=IER_ERBFI | IER_ETBEI)
    u.w(UART_LCR, 0x9B)
    u.dev.queue_input(b"0123456789abcdefXYZ")
    assert u.dev.irq_level
    u.dev.reset()
    assert not u.dev.irq_level and u.levels()[-1] == 0
    assert (u.r(UART_IER), u.r(UART_LCR), u.r(UART_MCR)) == (0, 0, 0)
    assert u.iir() == IIR_NO_INTERRUPT
    assert not u.dev.fifo_enabled
    assert u.r(UART_RBR) == ord("X")  # the FIFO's 16 bytes were discarded; the queue went on
    assert u.dev.stats.rx_discarded == 16


def test_output_sink_failure_is_counted_not_raised() -> None:
    def broken(_: bytes) -> None:
        raise BrokenPipeError("console closed")

    dev = Serial(RecordingIrqLine(), broken)
    dev.write(UART_THR, 1, ord("a"))
    dev.write(UART_THR, 1, ord("b"))
    assert dev.stats.output_errors == 2
    assert dev.last_output_error is not None and "BrokenPipeError" in dev.last_output_error
    assert dev.stats.tx_bytes == 2


def test_output_sink_may_call_back_into_the_device() -> None:
    dev: Serial

    def echo(data: bytes) -> None:
        dev.feed(data)

    dev = Serial(RecordingIrqLine(), echo)
    dev.write(UART_FCR, 1, FCR_FIFO_ENABLE)
    dev.write(UART_THR, 1, ord("e"))
    assert dev.read(UART_RBR, 1) == ord("e")


def test_concurrent_writers_lose_no_bytes() -> None:
    out = bytearray()
    dev = Serial(RecordingIrqLine(), out.extend)
    dev.write(UART_MCR, 1, MCR_OUT2)
    dev.write(UART_IER, 1, IER_ETBEI | IER_ERBFI)

    def writer(ch: int) -> None:
        for _ in range(2000):
            dev.write(UART_THR, 1, ch)
            dev.read(UART_IIR, 1)

    def feeder() -> None:
        for _ in range(500):
            dev.queue_input(b"ab")
            while dev.read(UART_LSR, 1) & LSR_DR:
                dev.read(UART_RBR, 1)

    threads = [threading.Thread(target=writer, args=(c,)) for c in b"wxyz"]
    threads.append(threading.Thread(target=feeder))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 8000
    assert {c: out.count(c) for c in b"wxyz"} == {c: 2000 for c in b"wxyz"}
    assert dev.stats.tx_bytes == 8000
    assert dev.stats.rx_bytes == 1000 and dev.stats.overruns == 0


def test_bench_reports_operations() -> None:
    result = bench_uart_register_ops(rounds=200)
    assert result.operations == 1600
    assert result.tx_bytes == 200 and result.rx_bytes == 200
    assert result.operations_per_second > 0
    with pytest.raises(ValueError, match="rounds"):
        bench_uart_register_ops(rounds=0)


def test_metrics_report_counters_and_levels() -> None:
    u = Uart(input_queue_limit=64)
    u.w(UART_THR, ord("a"))
    u.dev.queue_input(b"xyz")
    m = u.dev.metrics()
    assert m["tx_bytes"] == 1 and m["received"] == 1
    assert m["rx_fifo_level"] == 1 and m["pending_input"] == 2
