"""The exec agent protocol: run a command in the guest, get its exit status and output back.

Transport: any byte stream between host and guest; today the serial console
(frames are single text lines, so they survive a tty and interleave safely
with other console output), later a virtio-console port.  A frame is one line:

    @@microvm-agent:1:<kind>:<seq>:<crc32>:<payload>@@\\n

- ``1`` is the protocol version;
- ``kind`` is ``hello`` (guest, once at start), ``exec`` (host request),
  ``result`` (guest answer) or ``error`` (guest: the request could not run);
- ``seq`` is a decimal request number chosen by the host, echoed in the
  answer (0 for hello);
- ``payload`` is base64 (RFC 4648, no line breaks) of a UTF-8 JSON object and
  ``crc32`` is the zlib CRC-32 of the payload text, 8 lower-case hex digits.
  A frame whose CRC does not match is ignored (and counted), so garbled
  console bytes never become a wrong answer.

Payloads: hello ``{"agent": NAME, "version": 1}``; exec ``{"argv": [...]}`` or
``{"sh": "command line"}``, optional ``"stdin"`` (base64) and ``"timeout"``
(seconds); result ``{"returncode": N, "stdout": b64, "stderr": b64}``;
error ``{"message": "..."}``.  One request at a time.

``AgentServer`` is the reference guest side (Python, for guests that have it,
and the protocol's executable specification); a guest agent in C or shell
only has to print the same lines.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import subprocess
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .errors import AgentError, AgentUnavailable

if TYPE_CHECKING:  # pragma: no cover
    from .vm import MicroVM

PROTOCOL_VERSION = 1
FRAME_PREFIX = b"@@microvm-agent:"
FRAME_SUFFIX = b"@@"
KINDS = ("hello", "exec", "result", "error")
#: Longest frame line accepted (bounded memory for a garbled stream).
MAX_FRAME = 16 << 20
_FRAME_RE = re.compile(rb"@@microvm-agent:(\d+):([a-z]+):(\d+):([0-9a-f]{8}):([A-Za-z0-9+/=]*)@@")
#: How long run() waits for the agent's hello when the caller gave no timeout.
DEFAULT_HELLO_TIMEOUT = 10.0


@dataclass
class Frame:
    kind: str
    seq: int
    payload: dict[str, Any]
    version: int = PROTOCOL_VERSION


def encode_frame(kind: str, seq: int, payload: dict[str, Any]) -> bytes:
    if kind not in KINDS:
        raise ValueError(f"agent frame: unknown kind {kind!r}")
    body = base64.b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode("ascii")
    crc = zlib.crc32(body.encode("ascii")) & 0xFFFFFFFF
    return f"@@microvm-agent:{PROTOCOL_VERSION}:{kind}:{seq}:{crc:08x}:{body}@@\n".encode("ascii")


class FrameDecoder:
    """Finds frames in a byte stream fed in arbitrary chunks, ignoring everything else."""

    def __init__(self) -> None:
        self._line = bytearray()
        self.bad_frames = 0

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                self._line += data[start:]
                if len(self._line) > MAX_FRAME:
                    self._line.clear()
                    self.bad_frames += 1
                break
            self._line += data[start:nl]
            start = nl + 1
            line = bytes(self._line)
            self._line.clear()
            if FRAME_PREFIX in line:
                frame = self._decode(line)
                if frame is None:
                    self.bad_frames += 1
                else:
                    frames.append(frame)
        return frames

    @staticmethod
    def _decode(line: bytes) -> Frame | None:
        m = _FRAME_RE.search(line)
        if m is None:
            return None
        version, kind, seq, crc, body = m.groups()
        if int(version) != PROTOCOL_VERSION or kind.decode() not in KINDS:
            return None
        if zlib.crc32(body) & 0xFFFFFFFF != int(crc, 16):
            return None
        try:
            payload = json.loads(base64.b64decode(body, validate=True))
        except (binascii.Error, ValueError):
            return None
        if not isinstance(payload, dict):
            return None
        return Frame(kind.decode(), int(seq), payload)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    try:
        return base64.b64decode(text or "", validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise AgentError(f"exec agent: {what} is not valid base64") from None


class AgentClient:
    """The host side, over a MicroVM's console (``MicroVM.run``)."""

    def __init__(self, vm: MicroVM) -> None:
        self._vm = vm
        self._decoder = FrameDecoder()
        self._cond = threading.Condition()
        self._hello: Frame | None = None
        self._answers: dict[int, Frame] = {}
        self._seq = 0
        self._ended = False
        vm.add_output_listener(self._feed)

    def _feed(self, data: bytes) -> None:
        frames = self._decoder.feed(data)
        if frames:
            with self._cond:
                for f in frames:
                    if f.kind == "hello" and self._hello is None:
                        self._hello = f
                    elif f.kind in ("result", "error"):
                        self._answers[f.seq] = f
                self._cond.notify_all()

    def _wait_for(self, what: str, ready: Callable[[], bool], deadline: float) -> bool:
        with self._cond:
            while not ready():
                if self._vm.exit_status is not None:
                    return ready()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                # Wake periodically to notice the VM's end (the console has no hook into this lock).
                self._cond.wait(min(left, 0.05))
            return True

    def run(self, cmd: str | Sequence[str], timeout: float | None = None, *, check: bool = False,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        vm = self._vm
        budget = timeout if timeout is not None else vm.spec.timeout
        deadline = time.monotonic() + budget
        hello_budget = min(budget, timeout if timeout is not None else DEFAULT_HELLO_TIMEOUT)
        if not self._wait_for("hello", lambda: self._hello is not None, time.monotonic() + hello_budget):
            status = vm.exit_status
            why = (
                f"the VM ended ({status.describe()})"
                if status is not None
                else f"no hello frame on its console within {hello_budget:g} s"
            )
            raise AgentUnavailable(
                f"{vm.name}: run({cmd!r}): this guest does not run the exec agent: {why}. "
                "A guest with the agent prints '@@microvm-agent:1:hello:...' on its console at start "
                "(see pytest_microvm.agent for the protocol)"
            )
        self._seq += 1
        seq = self._seq
        request: dict[str, Any] = {"sh": cmd} if isinstance(cmd, str) else {"argv": list(cmd)}
        if input is not None:
            request["stdin"] = _b64(input)
        request["timeout"] = max(deadline - time.monotonic(), 0.001)
        vm.console.send(encode_frame("exec", seq, request).decode("ascii"))
        if not self._wait_for("answer", lambda: seq in self._answers, deadline):
            status = vm.exit_status
            if status is not None:
                raise AgentError(f"{vm.name}: run({cmd!r}): the VM ended before the agent answered ({status.describe()})")
            raise AgentError(f"{vm.name}: run({cmd!r}): no answer from the exec agent within {budget:g} s")
        frame = self._answers.pop(seq)
        if frame.kind == "error":
            raise AgentError(f"{vm.name}: run({cmd!r}): the exec agent refused: {frame.payload.get('message', '?')}")
        rc = frame.payload.get("returncode")
        if not isinstance(rc, int):
            raise AgentError(f"{vm.name}: run({cmd!r}): the agent's answer has no integer returncode")
        result = subprocess.CompletedProcess(
            cmd, rc, _unb64(frame.payload.get("stdout"), "stdout"), _unb64(frame.payload.get("stderr"), "stderr")
        )
        if check:
            result.check_returncode()
        return result


class AgentServer:
    """Reference guest side: reads frames from ``read``, runs them, writes answers with ``write``.

    ``run_command`` executes one request; the default runs it with subprocess
    (what a guest with Python would do).
    """

    def __init__(self, read: Callable[[], bytes], write: Callable[[bytes], Any], name: str = "reference") -> None:
        self._read = read
        self._write = write
        self._decoder = FrameDecoder()
        self.name = name

    def serve(self) -> None:
        self._write(encode_frame("hello", 0, {"agent": self.name, "version": PROTOCOL_VERSION}))
        while True:
            data = self._read()
            if not data:
                return
            for frame in self._decoder.feed(data):
                if frame.kind == "exec":
                    self._write(self.handle(frame))

    def handle(self, frame: Frame) -> bytes:
        req = frame.payload
        try:
            if "argv" in req:
                argv = req["argv"]
                if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
                    raise ValueError("argv must be a non-empty list of strings")
                shell = False
                args: Any = argv
            elif isinstance(req.get("sh"), str):
                args, shell = req["sh"], True
            else:
                raise ValueError("a request needs argv or sh")
            stdin = base64.b64decode(req.get("stdin", ""), validate=True)
            timeout = req.get("timeout")
            proc = subprocess.run(args, shell=shell, input=stdin, capture_output=True, check=False,
                                  timeout=float(timeout) if timeout else None)
        except Exception as exc:
            return encode_frame("error", frame.seq, {"message": f"{type(exc).__name__}: {exc}"})
        return encode_frame(
            "result", frame.seq,
            {"returncode": proc.returncode, "stdout": _b64(proc.stdout), "stderr": _b64(proc.stderr)},
        )
