"""VMMs a MicroVM can run on: our in-process KVM monitor, or QEMU's microvm machine.

A backend turns a ``VmSpec`` into a running VM and gives back plain data: the
console bytes (a ``vmm.console.ConsoleLog``), an ``ExitStatus`` and metrics.
Everything above (console, panic watching, reports) is shared, so one suite
runs unchanged on both and their results can be compared.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from vmm.console import ConsoleLog
from vmm.exitstatus import ExitReason, ExitStatus

from ..spec import VmSpec


class Backend(Protocol):
    name: str
    #: Every byte the guest printed on its serial console.
    console_log: ConsoleLog

    def build(self) -> None:
        """Check and load everything; after this ``console_log`` is the VM's log."""

    def run(self) -> None:
        """Start the guest (listeners on ``console_log`` are in place by now)."""

    def send_input(self, data: bytes) -> int:
        """Queue ``data`` for the guest's serial input; returns how many bytes were taken."""

    def request_exit(self, reason: ExitReason, detail: str) -> None:
        """End the VM with ``reason`` unless it already ended (the first reason wins)."""

    def wait(self, timeout: float | None) -> ExitStatus | None:
        """The exit status once the VM ended and its output is complete; None on timeout."""

    def close(self) -> None:
        """Kill the VM if it runs and release everything (threads, processes, fds).  Idempotent."""

    def metrics(self) -> dict[str, Any]:
        """Boot time, exits by reason, RSS, wall time (see MicroVM.metrics)."""

    @property
    def boot_time(self) -> float | None:
        """Seconds from start to the guest's boot-timer write, if it wrote one."""


def create_backend(spec: VmSpec, on_exit: Callable[[], None]) -> Backend:
    """A backend for ``spec``; ``on_exit`` is called once the VM ended and all output is in."""
    if spec.backend == "qemu":
        from .qemu import QemuBackend

        return QemuBackend(spec, on_exit)
    from .inproc import InprocBackend

    return InprocBackend(spec, on_exit)
