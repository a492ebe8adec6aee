"""The in-process backend: our own VMM (``vmm.machine.Machine``), vCPU threads in this process.

Nothing outlives the process: if a pytest-xdist worker dies, its VMs die with it.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from vmm.console import ConsoleLog
from vmm.exitstatus import ExitReason, ExitStatus

from ..spec import VmSpec


class InprocBackend:
    name = "kvm"

    def __init__(self, spec: VmSpec, on_exit: Callable[[], None]) -> None:
        self.spec = spec
        self._on_exit = on_exit
        self.machine: Any = None
        self.console_log = ConsoleLog()
        self._watcher: threading.Thread | None = None
        self._early_status: ExitStatus | None = None
        self._closed = False

    def build(self) -> None:
        from vmm.machine import Machine, MachineConfig

        spec = self.spec
        if spec.restore is not None:
            machine = Machine.restore(spec.restore, timeout=spec.timeout)
        else:
            config = MachineConfig(
                kernel=spec.resolve_kernel(),
                initrd=spec.initrd,
                cmdline=spec.append,
                mem_mib=spec.mem_mib,
                vcpus=spec.vcpus,
                timeout=spec.timeout,
                devices=list(spec.devices),
            )
            machine = Machine(config, t0=time.monotonic())
        # One log for the VM's whole life: the machine's own.
        self.console_log = machine.console
        self.machine = machine

    def run(self) -> None:
        """Start the vCPUs (after listeners are attached, so no byte is missed)."""
        self.machine.start()
        self._watcher = threading.Thread(target=self._watch, name="microvm-exit-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        self.machine.wait()
        self._on_exit()

    def snapshot(self, path: Any) -> Any:
        return self.machine.snapshot(path)

    def send_input(self, data: bytes) -> int:
        if self.machine is None or not self.machine.running:
            return 0
        return self.machine.send_input(data)

    def request_exit(self, reason: ExitReason, detail: str) -> None:
        if self.machine is not None:
            self.machine.request_exit(reason, detail=detail)

    def wait(self, timeout: float | None) -> ExitStatus | None:
        if self.machine is None:
            return None
        status = self.machine.wait(timeout)
        if status is None:
            return None
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout)
        return status

    @property
    def running(self) -> bool:
        return self.machine is not None and self.machine.running

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.machine is not None:
            self.machine.close()
            if self._watcher is not None:
                self._watcher.join()

    @property
    def boot_time(self) -> float | None:
        return None if self.machine is None else self.machine.boot_time

    def metrics(self) -> dict[str, Any]:
        if self.machine is None:
            return {}
        return self.machine.metrics()
