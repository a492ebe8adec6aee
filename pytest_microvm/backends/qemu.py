"""The QEMU backend: ``qemu-system-x86_64 -M microvm`` in a child process, same MicroVM interface.

What QEMU gives us and how it maps onto ``ExitStatus``:

- the console is the QEMU process's stdio chardev on ISA serial (pipes; a
  reader thread feeds a ``ConsoleLog``), so the console and panic watching
  are the same code as for the in-process VMM;
- exit codes come from ``isa-debug-exit`` at 0xf4 (4 bytes wide): a guest
  write of V makes QEMU exit with ``(V << 1) | 1``, decoded back to V; only
  V & 0x7f survives the 8-bit process status;
- a triple fault makes KVM return KVM_EXIT_SHUTDOWN, which QEMU treats like a
  reset request (``-no-reboot``: it exits 0).  We tell the two apart with
  QEMU's ``kvm_run_exit`` trace event, read from a pipe: the last exit
  reason before an exit-0 is 8 (KVM_EXIT_SHUTDOWN) for a triple fault.  The
  same trace gives the exit counts by reason for metrics;
- a KVM internal error (emulation failure) makes QEMU print "KVM internal
  error" and pause; the stderr reader sees it and ends the process;
- Firecracker's boot-timer port (0x3f0) is an ``isa-debugcon`` on a socket:
  the byte 123 arriving there is the boot time.

The child dies with its parent: it is started through ``setpriv
--pdeathsig KILL`` (PR_SET_PDEATHSIG) in a session of its own, so a crashed
pytest worker leaves no QEMU behind and a Ctrl-C in the terminal reaches
pytest (which kills its VMs) rather than QEMU directly.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from vmm import layout
from vmm.console import ConsoleLog
from vmm.exitstatus import ExitReason, ExitStatus

from ..errors import BackendError, BackendNotInstalled
from ..spec import SpecError, VmSpec

#: struct kvm_run exit reasons (linux/kvm.h) as named in metrics, the same names our VMM uses.
KVM_EXIT_NAMES = {
    0: "unknown", 1: "exception", 2: "io", 3: "hypercall", 4: "debug", 5: "hlt", 6: "mmio",
    7: "irq_window_open", 8: "shutdown", 9: "fail_entry", 10: "intr", 11: "set_tpr",
    12: "tpr_access", 17: "internal_error", 24: "system_event",
}
KVM_EXIT_SHUTDOWN = 8
#: The CPU model that works on hosts whose KVM refuses IA32_ARCH_CAPABILITIES (MSR 0x10a).
CPU_FALLBACK = "host,-arch-capabilities"
_MSR_ARCH_CAPS_ERROR = re.compile(r"failed to set MSR 0x10a")
_TRACE_RE = re.compile(rb"kvm_run_exit cpu_index (\d+), reason (\d+)")
#: How long QEMU may take to notice an emulation failure's register dump before we end it.
INTERNAL_ERROR_GRACE_S = 0.2


def find_binary(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise BackendNotInstalled(
            f"--microvm-backend=qemu: {binary} is not installed or not on PATH "
            "(Debian: apt-get install qemu-system-x86; or set --microvm-qemu-binary)"
        )
    return path


@functools.cache
def resolve_cpu(binary: str, requested: str) -> str:
    """The -cpu value to use: ``requested``, or for "auto" the first model this host's KVM accepts."""
    if requested != "auto":
        return requested
    cache = _cpu_cache_file()
    key = f"{binary}:{_boot_id()}"
    if cache is not None:
        try:
            data = json.loads(cache.read_text())
            if key in data:
                return data[key]
        except (OSError, ValueError):
            pass
    errors = []
    chosen = None
    for cpu in ("host", CPU_FALLBACK):
        ok, err = _probe_cpu(binary, cpu)
        if ok:
            chosen = cpu
            break
        errors.append(f"-cpu {cpu}: {err}")
        if not _MSR_ARCH_CAPS_ERROR.search(err):
            break
    if chosen is None:
        raise BackendError(f"{binary} cannot start a KVM microvm here: " + "; ".join(errors))
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            try:
                data = json.loads(cache.read_text())
            except (OSError, ValueError):
                data = {}
            data[key] = chosen
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(cache)
        except OSError:
            pass
    return chosen


def _probe_cpu(binary: str, cpu: str) -> tuple[bool, str]:
    """Start QEMU paused with ``-cpu cpu`` and quit it through QMP: did KVM accept the vCPU?"""
    argv = [binary, "-M", "microvm", "-enable-kvm", "-cpu", cpu, "-nodefaults", "-no-user-config",
            "-display", "none", "-S", "-qmp", "stdio", "-m", "16"]
    qmp = b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n'
    try:
        proc = subprocess.run(argv, input=qmp, capture_output=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return False, "no answer within 30 s"
    err = proc.stderr.decode("utf-8", "replace").strip()
    if proc.returncode == 0:
        return True, ""
    return False, err.splitlines()[0] if err else f"exit status {proc.returncode}"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _cpu_cache_file() -> Path | None:
    from vmm.cache import cache_root

    return cache_root() / "qemu-cpu.json"


def decode_exit(returncode: int, stderr_text: str, last_exit_reason: int | None, binary: str) -> ExitStatus:
    """ExitStatus for a QEMU process that ended by itself (not killed by us)."""
    prog = os.path.basename(binary)
    errors = [
        line for line in stderr_text.splitlines()
        if line.startswith(f"{prog}:") and "warning:" not in line
    ]
    if returncode < 0:
        sig = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        return ExitStatus(ExitReason.VMM_ERROR, detail=f"QEMU died from {sig}: {_last(errors, stderr_text)}")
    if errors:
        return ExitStatus(ExitReason.VMM_ERROR, detail=f"QEMU failed (exit status {returncode}): {errors[0]}")
    if returncode & 1:
        code = returncode >> 1
        return ExitStatus(
            ExitReason.GUEST_EXIT, code=code,
            detail=f"isa-debug-exit: QEMU exit status {returncode} = ({code} << 1) | 1",
        )
    if returncode == 0:
        if last_exit_reason == KVM_EXIT_SHUTDOWN:
            return ExitStatus(ExitReason.TRIPLE_FAULT, detail="KVM_EXIT_SHUTDOWN (triple fault) under QEMU")
        return ExitStatus(ExitReason.POWEROFF, detail="QEMU exited 0: the guest powered off or asked for a reset")
    return ExitStatus(ExitReason.VMM_ERROR, detail=f"QEMU exit status {returncode}: {_last(errors, stderr_text)}")


def _last(errors: list[str], stderr_text: str) -> str:
    if errors:
        return errors[-1]
    lines = [ln for ln in stderr_text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def qemu_device_args(devices) -> list[str]:
    """QEMU arguments for our virtio device specs, on QEMU's virtio-mmio transport."""
    argv: list[str] = []
    serial_bus = False
    for i, dev in enumerate(devices):
        kind = dev.kind
        if kind == "blk":
            drive = f"if=none,id=disk{i},file={dev.path},format=raw" + (",readonly=on" if dev.read_only else "")
            argv += ["-drive", drive, "-device", f"virtio-blk-device,drive=disk{i}"
                     + (f",serial={dev.serial}" if dev.serial else "")]
        elif kind == "rng":
            argv += ["-object", f"rng-random,id=rng{i},filename=/dev/urandom",
                     "-device", f"virtio-rng-device,rng=rng{i}"]
        elif kind == "net":
            argv += ["-netdev", f"tap,id=net{i},ifname={dev.tap},script=no,downscript=no",
                     "-device", f"virtio-net-device,netdev=net{i}" + (f",mac={dev.mac}" if getattr(dev, "mac", None) else "")]
        elif kind == "console":
            if not serial_bus:
                argv += ["-device", "virtio-serial-device"]
                serial_bus = True
            argv += ["-chardev", f"socket,id=vcon{i},path={dev.socket},server=on,wait=off",
                     "-device", f"virtconsole,chardev=vcon{i}"]
        else:
            raise SpecError(
                f"{kind}=: the qemu backend cannot provide this device in the form our VMM does "
                "(QEMU's vsock is vhost-vsock, not Firecracker's Unix-socket form); use backend kvm"
            )
    return argv


class QemuBackend:
    name = "qemu"

    def __init__(self, spec: VmSpec, on_exit: Callable[[], None]) -> None:
        self.spec = spec
        self._on_exit = on_exit
        self.console_log = ConsoleLog()
        self.proc: subprocess.Popen[bytes] | None = None
        self.argv: list[str] = []
        self._lock = threading.Lock()
        self._requested: tuple[ExitReason, str] | None = None
        self._status: ExitStatus | None = None
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._timer: threading.Timer | None = None
        self._stderr = bytearray()
        self._exits: Counter[str] = Counter()
        self._last_exit: int | None = None
        self._boot_sock: socket.socket | None = None
        self._rusage: Any = None
        self._closed = False
        self.t0 = time.monotonic()
        self.t_started: float | None = None
        self.t_boot: float | None = None
        self.t_ended: float | None = None

    # ---- construction --------------------------------------------------------------------
    def build(self) -> None:
        spec = self.spec
        self.binary = find_binary(spec.qemu.binary)
        self.kernel = spec.resolve_kernel()
        self.cpu = resolve_cpu(self.binary, spec.qemu.cpu)
        if spec.restore is not None:
            raise SpecError("restore=: snapshots are a feature of our VMM (backend kvm), not of the qemu backend")
        self.device_args = qemu_device_args(spec.devices)

    def _command(self, boot_fd: int, trace_fd: int) -> list[str]:
        spec = self.spec
        machine = "microvm" + (f",{spec.qemu.machine}" if spec.qemu.machine else "")
        argv = [
            self.binary, "-M", machine, "-enable-kvm", "-cpu", self.cpu,
            "-m", str(spec.mem_mib), "-smp", str(spec.vcpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
            "-device", f"isa-debug-exit,iobase={layout.DEBUG_EXIT_PORT:#x},iosize=4",
            "-chardev", f"socket,id=boottimer,fd={boot_fd}",
            "-device", f"isa-debugcon,iobase={layout.BOOT_TIMER_PORT:#x},chardev=boottimer",
            "-trace", "kvm_run_exit", "-D", f"/dev/fd/{trace_fd}",
            "-kernel", str(self.kernel),
        ]
        if spec.initrd:
            argv += ["-initrd", str(spec.initrd)]
        if spec.append:
            argv += ["-append", spec.append]
        argv += self.device_args
        argv += list(spec.qemu.extra_args)
        return argv

    # ---- running -----------------------------------------------------------------------------
    def run(self) -> None:
        boot_host, boot_guest = socket.socketpair()
        trace_r, trace_w = os.pipe()
        self.argv = self._command(boot_guest.fileno(), trace_w)
        launcher: list[str] = []
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            launcher = [setpriv, "--pdeathsig", "KILL", "--"]
        self.t_started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                launcher + self.argv,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(boot_guest.fileno(), trace_w), start_new_session=True,
            )
        except OSError as exc:
            boot_host.close()
            os.close(trace_r)
            raise BackendError(f"cannot start {self.binary}: {exc}") from exc
        finally:
            boot_guest.close()
            os.close(trace_w)
        self._boot_sock = boot_host
        self._spawn(self._read_console, "console")
        self._spawn(self._read_stderr, "stderr")
        self._spawn(lambda: self._read_trace(trace_r), "trace")
        self._spawn(self._read_boot_timer, "boot-timer")
        reaper = threading.Thread(target=self._reap, name="qemu-reaper", daemon=True)
        reaper.start()
        self._reaper = reaper
        if self.spec.timeout:
            self._timer = threading.Timer(self.spec.timeout, self._on_timeout)
            self._timer.daemon = True
            self._timer.start()

    def _spawn(self, fn: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=fn, name=f"qemu-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    @staticmethod
    def _pump(fd: int, sink: Callable[[bytes], None]) -> None:
        """Hand everything read from ``fd`` to ``sink`` until EOF or an error."""
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                return
            if not data:
                return
            sink(data)

    def _read_console(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        self._pump(self.proc.stdout.fileno(), self.console_log.write)

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        self._pump(self.proc.stderr.fileno(), self._on_stderr)

    def _on_stderr(self, data: bytes) -> None:
        if len(self._stderr) < 1 << 20:
            self._stderr += data
        if b"KVM internal error" in self._stderr and self._requested is None:
            text = self._stderr.decode("utf-8", "replace")
            emulation = "Suberror: 1" in text or "emulation failure" in text
            reason = ExitReason.EMULATION_FAILURE if emulation else ExitReason.KVM_ERROR
            first = next(ln for ln in text.splitlines() if "KVM internal error" in ln)
            rip = re.search(r"\b[RE]IP=([0-9a-f]+)", text)
            detail = f"QEMU: {first.strip()}" + (f" at RIP {int(rip.group(1), 16):#x}" if rip else "")
            timer = threading.Timer(INTERNAL_ERROR_GRACE_S, self.request_exit, (reason, detail))
            timer.daemon = True
            timer.start()

    def _read_trace(self, fd: int) -> None:
        tail = b""
        try:
            while True:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    return
                if not data:
                    return
                chunk = tail + data
                cut = chunk.rfind(b"\n") + 1
                tail = chunk[cut:]
                for m in _TRACE_RE.finditer(chunk, 0, cut):
                    reason = int(m.group(2))
                    self._exits[KVM_EXIT_NAMES.get(reason, str(reason))] += 1
                    self._last_exit = reason
        finally:
            os.close(fd)

    def _read_boot_timer(self) -> None:
        sock = self._boot_sock
        assert sock is not None
        while True:
            try:
                data = sock.recv(4096)
            except OSError:
                return
            if not data:
                return
            if self.t_boot is None and layout.BOOT_TIMER_MAGIC in data:
                self.t_boot = time.monotonic()

    def _reap(self) -> None:
        proc = self.proc
        assert proc is not None
        try:
            _, wstatus, rusage = os.wait4(proc.pid, 0)
            returncode = os.waitstatus_to_exitcode(wstatus)
            proc.returncode = returncode
            self._rusage = rusage
        except ChildProcessError:
            returncode = proc.wait()
        self.t_ended = time.monotonic()
        if self._timer is not None:
            self._timer.cancel()
        for t in self._threads:
            if t.name != "qemu-boot-timer":
                t.join()
        if self._boot_sock is not None:
            self._boot_sock.close()
        with self._lock:
            requested = self._requested
            if requested is not None:
                reason, detail = requested
                self._status = ExitStatus(reason, detail=detail)
            else:
                stderr_text = self._stderr.decode("utf-8", "replace")
                self._status = decode_exit(returncode, stderr_text, self._last_exit, self.binary)
                if self._status.reason is ExitReason.VMM_ERROR and _MSR_ARCH_CAPS_ERROR.search(stderr_text):
                    self._status.detail += f" (this host's KVM needs --microvm-qemu-cpu={CPU_FALLBACK})"
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self._done.set()
        self._on_exit()

    def _on_timeout(self) -> None:
        self.request_exit(ExitReason.TIMEOUT, f"the VM ran longer than its timeout of {self.spec.timeout:g} s")

    # ---- control -----------------------------------------------------------------------------
    def send_input(self, data: bytes) -> int:
        proc = self.proc
        if proc is None or proc.stdin is None or self._done.is_set():
            return 0
        try:
            proc.stdin.write(data)
            proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            return 0
        return len(data)

    def request_exit(self, reason: ExitReason, detail: str) -> None:
        with self._lock:
            if self._requested is not None or self._done.is_set() or self.proc is None:
                return
            if self.proc.returncode is not None:
                return
            self._requested = (reason, detail)
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def wait(self, timeout: float | None) -> ExitStatus | None:
        if self.proc is None:
            return None
        if not self._done.wait(timeout):
            return None
        return self._status

    @property
    def running(self) -> bool:
        return self.proc is not None and not self._done.is_set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.proc is not None:
            self.request_exit(ExitReason.KILLED, "killed by the host")
            self._done.wait()
            self._reaper.join()
        if self._timer is not None:
            self._timer.cancel()

    # ---- results ---------------------------------------------------------------------------------
    @property
    def boot_time(self) -> float | None:
        return None if self.t_boot is None else self.t_boot - self.t0

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def metrics(self) -> dict[str, Any]:
        end = self.t_ended if self.t_ended is not None else time.monotonic()
        rss = None
        if self._rusage is not None:
            rss = self._rusage.ru_maxrss
        elif self.proc is not None and self.proc.returncode is None:
            rss = _vm_hwm_kib(self.proc.pid)
        return {
            "boot_time_s": self.boot_time,
            "wall_time_s": end - self.t0,
            "run_time_s": None if self.t_started is None else end - self.t_started,
            "exits": dict(self._exits),
            "peak_rss_kib": rss,
            "console_bytes": self.console_log.total,
            "qemu_pid": self.pid,
            "qemu_command": " ".join(self.argv),
        }


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None
