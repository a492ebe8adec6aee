"""A pexpect-compatible view of a VM's serial console.

Built on ``pexpect.spawnbase.SpawnBase``, so ``expect``, ``expect_exact``,
``expect_list``, ``before``/``after``/``match``, ``TIMEOUT``/``EOF`` in pattern
lists and ``readline`` behave as they do for ``pexpect.spawn``.  The bytes
come from the VM's ``ConsoleLog`` (replayed from the first byte, so nothing
printed before the first ``expect`` is lost); EOF is the end of the VM.

Waits never hang: the default timeout is the VM's own timeout, and a wait
that fails raises ``ConsoleTimeout`` (a ``pexpect.TIMEOUT``) or ``VmEnded``
(a ``pexpect.EOF``) whose message names the pattern, how the VM ended and
the last lines of output.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import pexpect
from pexpect.spawnbase import SpawnBase

from .errors import ConsoleTimeout, VmEnded

if TYPE_CHECKING:  # pragma: no cover
    from .vm import MicroVM

#: Bytes of output not yet consumed by expect that the console keeps (older ones are dropped).
PENDING_LIMIT = 16 << 20
#: Characters of output shown in a failed wait's message.
TAIL_CHARS = 2000


def describe_pattern(p: Any) -> str:
    if p is pexpect.EOF:
        return "EOF"
    if p is pexpect.TIMEOUT:
        return "TIMEOUT"
    pattern = getattr(p, "pattern", p)
    if isinstance(pattern, bytes):
        pattern = pattern.decode("utf-8", "replace")
    return repr(pattern)


class Console(SpawnBase):
    """The serial console of one MicroVM (``vm.console``)."""

    def __init__(
        self,
        vm: MicroVM,
        send: Callable[[bytes], int],
        *,
        timeout: float,
        encoding: str | None = "utf-8",
        codec_errors: str = "replace",
    ) -> None:
        super().__init__(
            timeout=timeout, maxread=65536, searchwindowsize=None, encoding=encoding, codec_errors=codec_errors
        )
        self._vm = vm
        self._send = send
        self._cond = threading.Condition()
        self._pending = bytearray()
        self._eof = False
        #: Bytes dropped because nobody read them and PENDING_LIMIT was reached.
        self.dropped = 0
        self.linesep = "\n" if encoding is not None else b"\n"
        self.name = f"<console of {vm.name}>"

    # ---- feeding (backend side) -----------------------------------------------------
    def feed(self, data: bytes) -> None:
        with self._cond:
            self._pending += data
            excess = len(self._pending) - PENDING_LIMIT
            if excess > 0:
                del self._pending[:excess]
                self.dropped += excess
            self._cond.notify_all()

    def mark_eof(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    # ---- SpawnBase ------------------------------------------------------------------------
    def read_nonblocking(self, size: int = 1, timeout: float | None = -1) -> Any:
        if timeout == -1:
            timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._pending and not self._eof:
                if deadline is None:
                    self._cond.wait()
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise pexpect.TIMEOUT("Timeout exceeded.")
                self._cond.wait(left)
            if not self._pending:
                self.flag_eof = True
                raise pexpect.EOF("End of file: the VM ended.")
            data = bytes(self._pending[:size])
            del self._pending[:size]
        s = self._decoder.decode(data, final=False)
        self._log(s, "read")
        return s

    def send(self, s: Any) -> int:
        """Type ``s`` on the guest's serial input; returns the number of bytes sent."""
        s = self._coerce_send_string(s)
        self._log(s, "send")
        data = self._encoder.encode(s, final=False)
        return self._send(data)

    def sendline(self, s: Any = "") -> int:
        """Type ``s`` and the line separator (``linesep``, "\\n" by default)."""
        s = self._coerce_send_string(s)
        return self.send(s + self.linesep)

    def sendcontrol(self, char: str) -> int:
        """Type Ctrl-``char`` (``sendcontrol("c")`` sends 0x03)."""
        char = char.lower()
        code = ord(char) & 0x1F if char.isalpha() else {"@": 0, "[": 27, "\\": 28, "]": 29, "^": 30, "_": 31, "?": 127}[char]
        return self.send(bytes([code]) if self.encoding is None else chr(code))

    def write(self, s: Any) -> None:
        self.send(s)

    def writelines(self, sequence: Any) -> None:
        for s in sequence:
            self.send(s)

    def isalive(self) -> bool:
        return self._vm.exit_status is None

    def expect_list(self, pattern_list: Any, timeout: float | None = -1, searchwindowsize: int = -1,
                    async_: bool = False, **kw: Any) -> Any:
        try:
            return super().expect_list(pattern_list, timeout, searchwindowsize, async_, **kw)
        except (pexpect.TIMEOUT, pexpect.EOF) as exc:
            raise self._explain(exc, pattern_list, timeout) from None

    def expect_exact(self, pattern_list: Any, timeout: float | None = -1, searchwindowsize: int = -1,
                     async_: bool = False, **kw: Any) -> Any:
        try:
            return super().expect_exact(pattern_list, timeout, searchwindowsize, async_, **kw)
        except (pexpect.TIMEOUT, pexpect.EOF) as exc:
            if not isinstance(pattern_list, (list, tuple)):
                pattern_list = [pattern_list]
            raise self._explain(exc, pattern_list, timeout) from None

    # ---- messages ---------------------------------------------------------------------------
    def _explain(self, exc: Exception, patterns: Any, timeout: float | None) -> Exception:
        if isinstance(exc, (ConsoleTimeout, VmEnded)):
            return exc
        wanted = " or ".join(describe_pattern(p) for p in patterns if p not in (pexpect.EOF, pexpect.TIMEOUT))
        tail = self._vm.serial_output[-TAIL_CHARS:]
        shown = f"last {len(tail)} characters of output" if tail else "no output yet"
        if isinstance(exc, pexpect.TIMEOUT):
            secs = self.timeout if timeout == -1 else timeout
            msg = f"{self._vm.name}: console: {wanted} did not appear within {secs:g} s (the VM is still running)"
            return ConsoleTimeout(f"{msg}; {shown}:\n{tail}")
        status = self._vm.exit_status
        how = status.describe() if status is not None else "ended"
        msg = f"{self._vm.name}: console: the VM ended ({how}) before {wanted} appeared"
        return VmEnded(f"{msg}; {shown}:\n{tail}", status)

    def __str__(self) -> str:
        return self.name
