"""The 16550 UART against its reference model, one register access at a time.

Rules interleave guest accesses of any width and offset (``port_accesses``),
whole UART programs (``uart_programs``: zero divisor, DLAB flips, TX and RX
floods, loopback with a full FIFO, FCR resets), host input (``feed``,
``queue_input``), modem-line changes and resets.  After every step the device
and ``UartModel`` must agree on every value read, every byte sent, every
change of the IRQ line and every counter, and the FIFO and host queue stay
within their bounds.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from vmm.devices.serial import UART_FIFO_SIZE, Serial
from vmm.irq import RecordingIrqLine

from ..models.uart import UartModel
from ..oracles import violation
from ..strategies import Access, HostEvent, port_accesses, uart_programs
from .base import FuzzMachine

#: A small host queue, so that "host input larger than the queue" happens within a few steps.
INPUT_QUEUE_LIMIT = 48


class UartMachine(FuzzMachine):
    target = "uart"

    def __init__(self) -> None:
        super().__init__()
        self.irq = RecordingIrqLine(4)
        self.sent = bytearray()
        self.dev = Serial(self.irq, self.sent.extend, input_queue_limit=INPUT_QUEUE_LIMIT)
        self.model = UartModel(input_queue_limit=INPUT_QUEUE_LIMIT)
        self._edges_checked = 0

    # ---- applying one operation to both -------------------------------------------------
    def apply(self, op: Access | HostEvent) -> None:
        if isinstance(op, Access):
            if op.kind == "r":
                with self.step(f"read({op.offset}, {op.size})"):
                    got = self.dev.read(op.offset, op.size)
                want = self.model.read(op.offset, op.size)
                if op.size == 1 and op.offset in (2, 5, 6):
                    self.note(f"read reg {op.offset} = {got:#04x}")
                if got != want:
                    raise violation(
                        "uart-matches-model",
                        f"read({op.offset}, {op.size}) returned {got:#x}, the model says {want:#x}",
                    )
            else:
                value = op.value & ((1 << (8 * op.size)) - 1) if op.size else 0
                with self.step(f"write({op.offset}, {op.size}, {value:#x})"):
                    self.dev.write(op.offset, op.size, value)
                self.model.write(op.offset, op.size, value)
            return
        if op.kind == "feed":
            with self.step(f"feed({len(op.data)} bytes)", allowance=len(op.data)):
                got = self.dev.feed(op.data)
            want = self.model.feed(op.data)
        elif op.kind == "queue":
            with self.step(f"queue_input({len(op.data)} bytes)", allowance=len(op.data)):
                got = self.dev.queue_input(op.data)
            want = self.model.queue_input(op.data)
        elif op.kind == "modem":
            cts, dsr, ri, dcd = op.modem
            with self.step("set_modem_inputs"):
                self.dev.set_modem_inputs(cts=cts, dsr=dsr, ri=ri, dcd=dcd)
            self.model.set_modem_inputs(cts=cts, dsr=dsr, ri=ri, dcd=dcd)
            return
        else:
            with self.step("reset"):
                self.dev.reset()
            self.model.reset()
            return
        if got != want:
            raise violation(
                "uart-matches-model", f"{op.kind}({len(op.data)} bytes) returned {got}, the model says {want}"
            )

    # ---- rules -----------------------------------------------------------------------------
    @rule(op=port_accesses(8))
    def access(self, op: Access) -> None:
        self.apply(op)

    @rule(prog=uart_programs())
    def program(self, prog: list) -> None:
        for op in prog:
            self.apply(op)
            self.check()

    @rule(kind=st.sampled_from(["feed", "queue"]), data=st.binary(max_size=40))
    def host_input(self, kind: str, data: bytes) -> None:
        self.apply(HostEvent(kind, data))

    @rule(lines=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()))
    def modem_lines(self, lines: tuple[bool, bool, bool, bool]) -> None:
        self.apply(HostEvent("modem", modem=lines))

    @rule()
    def reset(self) -> None:
        self.apply(HostEvent("reset"))

    # ---- invariants --------------------------------------------------------------------------
    @invariant()
    def check(self) -> None:
        dev, model = self.dev, self.model
        if self.sent != model.output:
            raise violation(
                "uart-matches-model", f"host output {bytes(self.sent)[-16:]!r} != model {bytes(model.output)[-16:]!r}"
            )
        events = self.irq.events
        if len(events) != len(model.irq_edges) or any(
            bool(events[i][1]) != model.irq_edges[i] for i in range(self._edges_checked, len(events))
        ):
            edges = [bool(level) for _, level in events]
            raise violation("uart-irq-edges", f"IRQ line changes {edges[-8:]} != model {model.irq_edges[-8:]}")
        self._edges_checked = len(events)
        if dev.irq_level != model.irq or self.irq.level != model.irq:
            raise violation("uart-irq-edges", f"IRQ level {dev.irq_level} (line {self.irq.level}) != model {model.irq}")
        stats = vars(dev.stats)
        if stats != model.counters:
            diff = {
                k: (stats.get(k), model.counters.get(k))
                for k in set(stats) | set(model.counters)
                if stats.get(k) != model.counters.get(k)
            }
            raise violation("uart-matches-model", f"counters differ (device, model): {diff}")
        if dev.rx_fifo_level > UART_FIFO_SIZE or dev.rx_fifo_level != len(model.rx):
            raise violation(
                "uart-fifo-bounded",
                f"receiver holds {dev.rx_fifo_level} bytes (model {len(model.rx)}, FIFO {UART_FIFO_SIZE})",
            )
        if dev.pending_input > INPUT_QUEUE_LIMIT or dev.pending_input != len(model.host_queue):
            raise violation(
                "uart-fifo-bounded", f"host queue holds {dev.pending_input} bytes (limit {INPUT_QUEUE_LIMIT})"
            )
        s = dev.stats
        if s.received != s.rx_bytes + s.overruns + s.rx_discarded + dev.rx_fifo_level:
            raise violation("uart-accounting", f"received {s.received} != read + overrun + discarded + queued")
