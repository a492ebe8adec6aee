"""In-process UART throughput: register operations per second, no VM involved.

Measures the device model alone (locking, byte splitting, interrupt
evaluation, output sink), which bounds what the serial console can do once
the cost of a VM exit is added.  ``bench/`` reports it next to exit costs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from ..irq import RecordingIrqLine
from .serial import (
    FCR_FIFO_ENABLE,
    IER_ERBFI,
    IER_ETBEI,
    MCR_OUT2,
    UART_FCR,
    UART_IER,
    UART_IIR,
    UART_LSR,
    UART_MCR,
    UART_RBR,
    UART_THR,
    Serial,
)


@dataclass
class UartBenchResult:
    #: Register accesses performed (each one a bus-level read or write).
    operations: int
    seconds: float
    operations_per_second: float
    #: Bytes the guest side transmitted and received during the run.
    tx_bytes: int
    rx_bytes: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def bench_uart_register_ops(rounds: int = 20_000) -> UartBenchResult:
    """Run ``rounds`` rounds of a console driver's access pattern and time them.

    One round is 8 register accesses: transmit (poll LSR, write THR), take the
    THRE interrupt (read IIR), receive a host byte (read IIR, LSR, RBR, LSR)
    and re-enable the transmit interrupt (write IER).
    """
    if rounds < 1:
        raise ValueError(f"bench_uart_register_ops: rounds must be at least 1, got {rounds}")
    sink = bytearray()
    uart = Serial(RecordingIrqLine(), sink.extend)
    uart.write(UART_FCR, 1, FCR_FIFO_ENABLE)
    uart.write(UART_MCR, 1, MCR_OUT2)
    uart.write(UART_IER, 1, IER_ERBFI | IER_ETBEI)
    payload = bytes(range(32, 127))
    uart.queue_input(payload * (rounds // len(payload) + 1))
    read, write = uart.read, uart.write
    start = time.perf_counter()
    for i in range(rounds):
        read(UART_LSR, 1)
        write(UART_THR, 1, payload[i % len(payload)])
        read(UART_IIR, 1)
        read(UART_IIR, 1)
        read(UART_LSR, 1)
        read(UART_RBR, 1)
        read(UART_LSR, 1)
        write(UART_IER, 1, IER_ERBFI | IER_ETBEI)
    seconds = time.perf_counter() - start
    operations = rounds * 8
    return UartBenchResult(
        operations=operations,
        seconds=seconds,
        operations_per_second=operations / seconds if seconds > 0 else float("inf"),
        tx_bytes=uart.stats.tx_bytes,
        rx_bytes=uart.stats.rx_bytes,
    )
