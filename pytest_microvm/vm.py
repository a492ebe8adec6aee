"""MicroVM: one guest as a test sees it, on either backend; MicroVMFactory owns them.

A MicroVM is configured when made and runs from ``start()``.  Its console is
pexpect-compatible, its output and exit status are plain data, and its
teardown is guaranteed by the factory that made it: every VM is killed and
reaped when the test ends, pass or fail.
"""

from __future__ import annotations

import itertools
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from vmm.exitstatus import ExitReason, ExitStatus

from .backends import Backend, create_backend
from .console import TAIL_CHARS, Console
from .errors import BackendError, MicroVMError, WaitTimeout
from .panic import PanicWatcher
from .spec import VmSpec

#: Extra seconds ``wait()`` allows past the VM's own timeout before giving up on the backend.
WAIT_GRACE_S = 10.0


class MicroVM:
    """A microVM for one test.  Use ``microvm_factory`` or the ``microvm`` fixture to get one."""

    def __init__(self, spec: VmSpec, name: str = "vm0", make_dir: Callable[[str], Path] | None = None) -> None:
        self.spec = spec
        self.name = name
        self._make_dir = make_dir
        self._workdir: Path | None = None
        self._backend: Backend | None = None
        self._console: Console | None = None
        self._panic: PanicWatcher | None = None
        self._listeners: list[Callable[[bytes], None]] = []
        self._agent: Any = None
        self._started = False
        self._closed = False
        self._lock = threading.Lock()

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> MicroVM:
        """Load the kernel and start the guest; returns self."""
        with self._lock:
            if self._started:
                raise MicroVMError(f"{self.name}: already started (make a new VM with microvm_factory)")
            if self._closed:
                raise MicroVMError(f"{self.name}: already closed")
            self._started = True
        backend = create_backend(self.spec, self._on_exit)
        try:
            backend.build()
        except BaseException:
            backend.close()
            raise
        self._backend = backend
        self._console = Console(self, self._send, timeout=self.spec.timeout)
        self._panic = PanicWatcher(self.spec.panic_patterns, self._on_panic)
        backend.console_log.add_listener(self._console.feed, replay=True)
        backend.console_log.add_listener(self._panic.feed, replay=True)
        for fn in self._listeners:
            backend.console_log.add_listener(fn, replay=True)
        backend.run()
        return self

    def add_output_listener(self, fn: Callable[[bytes], None]) -> None:
        """Call ``fn`` with every chunk of console output (from the first byte, even if added late)."""
        if self._backend is not None:
            self._backend.console_log.add_listener(fn, replay=True)
        else:
            self._listeners.append(fn)

    def _on_exit(self) -> None:
        if self._console is not None:
            self._console.mark_eof()

    def _on_panic(self, line: str) -> None:
        if self._backend is not None:
            self._backend.request_exit(ExitReason.GUEST_PANIC, f"panic on the console: {line.strip()}")

    def _send(self, data: bytes) -> int:
        backend = self._require_started("console.send")
        deadline = time.monotonic() + self.spec.timeout
        sent = 0
        view = memoryview(data)
        while sent < len(data):
            if self.exit_status is not None:
                raise MicroVMError(
                    f"{self.name}: cannot type on the console: the VM ended ({self.exit_status.describe()})"
                )
            n = backend.send_input(bytes(view[sent:]))
            sent += n
            if sent < len(data):
                if time.monotonic() > deadline:
                    raise MicroVMError(
                        f"{self.name}: the guest read only {sent} of {len(data)} bytes typed on its console "
                        f"within {self.spec.timeout:g} s"
                    )
                time.sleep(0.001)
        return sent

    def _require_started(self, what: str) -> Backend:
        if self._backend is None:
            raise MicroVMError(f"{self.name}: {what} needs a started VM (call .start() first)")
        return self._backend

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """Wait until the VM ends and return its ExitStatus (``.reason``, ``.code``, ``.detail``).

        With ``timeout`` None the VM's own timeout bounds the wait.  If ``timeout``
        seconds pass first, raises ``WaitTimeout`` (the VM keeps running).
        """
        backend = self._require_started("wait()")
        limit = self.spec.timeout + WAIT_GRACE_S if timeout is None else timeout
        status = backend.wait(limit)
        if status is None:
            tail = self.serial_output[-TAIL_CHARS:]
            raise WaitTimeout(
                f"{self.name}: still running after {limit:g} s; last {len(tail)} characters of output:\n{tail}"
            )
        return status

    def kill(self, detail: str = "killed by the test") -> ExitStatus:
        """End the VM now (if still running) and return its exit status."""
        backend = self._require_started("kill()")
        backend.request_exit(ExitReason.KILLED, detail)
        return self.wait()

    def close(self) -> None:
        """Kill if running, reap threads or processes, release memory.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._backend is not None:
            self._backend.close()
            if self._console is not None:
                self._console.mark_eof()

    def __enter__(self) -> MicroVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def workdir(self) -> Path:
        """A directory of this VM's own (per test and per xdist worker), made on first use."""
        if self._workdir is None:
            if self._make_dir is not None:
                self._workdir = self._make_dir(self.name)
            else:
                import tempfile

                self._workdir = Path(tempfile.mkdtemp(prefix=f"microvm-{self.name}-"))
        return self._workdir

    # ---- state and results ------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._backend is not None

    @property
    def running(self) -> bool:
        return self._backend is not None and self.exit_status is None

    @property
    def backend(self) -> Backend:
        return self._require_started("backend")

    @property
    def console(self) -> Console:
        """The serial console (pexpect-compatible: expect, sendline, before, after, match)."""
        self._require_started("console")
        assert self._console is not None
        return self._console

    @property
    def exit_status(self) -> ExitStatus | None:
        """How the VM ended, or None while it runs (or before start)."""
        if self._backend is None:
            return None
        return self._backend.wait(0)

    @property
    def exit_code(self) -> int | None:
        """The guest's own exit code (debug-exit port), or None if it gave none or still runs."""
        st = self.exit_status
        return None if st is None else st.code

    @property
    def serial_output(self) -> str:
        """Everything the guest printed so far (bounded to the newest 16 MiB)."""
        if self._backend is None:
            return ""
        return self._backend.console_log.text()

    @property
    def boot_time(self) -> float | None:
        return None if self._backend is None else self._backend.boot_time

    @property
    def panic_line(self) -> str | None:
        return None if self._panic is None else self._panic.panic_line

    @property
    def metrics(self) -> dict[str, Any]:
        """Boot-timer time, wall time, exits by reason, peak RSS, console bytes (plain data)."""
        if self._backend is None:
            return {}
        m = dict(self._backend.metrics())
        m["backend"] = self.spec.backend
        return m

    # ---- exec agent ---------------------------------------------------------------------------------
    def run(self, cmd: str | Sequence[str], timeout: float | None = None, *, check: bool = False,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` in the guest through the exec agent; a CompletedProcess-like result.

        Needs a guest that runs the agent (see pytest_microvm.agent); other guests
        raise ``AgentUnavailable`` once it is clear none answers.
        """
        self._require_started("run()")
        if self._agent is None:
            from .agent import AgentClient

            self._agent = AgentClient(self)
        return self._agent.run(cmd, timeout=timeout, check=check, input=input)

    def snapshot(self, path: str | Path) -> Path:
        """Save this running VM into directory ``path`` (our VMM only); it keeps running.

        Start new VMs from it with ``microvm_factory(restore=path)`` or the marker's
        ``restore=`` argument: each continues independently from this moment.
        """
        backend = self._require_started("snapshot()")
        snap = getattr(backend, "snapshot", None)
        if snap is None:
            raise BackendError(f"snapshot(): the {backend.name} backend cannot take snapshots; use backend kvm")
        return snap(Path(path))

    def __repr__(self) -> str:
        state = "not started" if self._backend is None else (
            "running" if self.exit_status is None else self.exit_status.describe()
        )
        return f"<MicroVM {self.name} {self.spec.kernel_name} on {self.spec.backend}: {state}>"


class MicroVMFactory:
    """Makes MicroVMs for one test and guarantees their teardown (``microvm_factory``)."""

    def __init__(
        self,
        base: VmSpec,
        make_dir: Callable[[str], Path] | None,
        apply: Callable[[VmSpec, dict[str, Any]], VmSpec],
    ) -> None:
        self.base = base
        self._make_dir = make_dir
        self._apply = apply
        self.vms: list[MicroVM] = []
        self._names = itertools.count()

    def __call__(self, *, name: str | None = None, **overrides: Any) -> MicroVM:
        """A configured, not yet started MicroVM (kernel=, initrd=, append=, mem_mib=, vcpus=, timeout=, backend=)."""
        spec = self._apply(self.base, overrides)
        vm_name = name if name is not None else f"vm{next(self._names)}"
        if any(vm.name == vm_name for vm in self.vms):
            raise MicroVMError(f"microvm_factory: a VM named {vm_name!r} already exists in this test")
        vm = MicroVM(spec, vm_name, self._make_dir)
        self.vms.append(vm)
        return vm

    def close_all(self) -> list[BaseException]:
        """Kill and reap every VM; returns the errors met (teardown goes on past them)."""
        errors: list[BaseException] = []
        for vm in self.vms:
            try:
                vm.close()
            except BaseException as exc:
                errors.append(exc)
        return errors
