"""The Linux guest's exec agent (guests/linux/agent.c) run as a host program, and its C protocol core.

The agent is built with the guest recipe (static, gcc + libc6-dev) and driven
over a pty in raw mode (as on a serial port) or a socket pair ("-": stdin and
stdout) by the plugin's own protocol code, pytest_microvm.agent.  The C core
(guests/agent/agent_proto.c: CRC-32, base64, JSON reader and writer, frames)
is checked against the Python implementation with Hypothesis through
``protocheck``, a host driver of the same core.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import zlib
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pytest_microvm import agent
from pytest_microvm.errors import AgentError, AgentTimeout

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "guests" / "agent"
#: The agent's bounds (guests/linux/agent.c).
OUTPUT_CAP = 4 << 20
LINE_CAP = 16 << 20
#: A bound on every wait here: far above what any request needs, never asserted as a time.
WAIT_S = 30.0


def _linux_recipe():
    from vmm.guestkit import _import

    return _import(ROOT / "guests" / "linux" / "build.py", "microvm_linux_guest_build")


@pytest.fixture(scope="module")
def agent_binary(tmp_path_factory) -> Path:
    return _linux_recipe().build_agent(tmp_path_factory.mktemp("agent") / "microvm-agent")


@pytest.fixture(scope="module")
def protocheck(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("protocheck") / "protocheck"
    subprocess.run(
        ["gcc", "-O1", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-fsanitize=address,undefined",
         "-fno-sanitize-recover=all", "-I", str(CORE), "-o", str(exe), str(CORE / "protocheck.c"),
         str(CORE / "agent_proto.c")],
        check=True,
    )
    return exe


# ---- driving the agent ------------------------------------------------------------------------
class AgentProcess:
    """microvm-agent on a pty (the device path) or a socket pair ("-"), frames in and out."""

    def __init__(self, binary: Path, transport: str, tmp: Path) -> None:
        self.stderr_path = tmp / "agent.stderr"
        stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self._files = [stderr]
        if transport == "pty":
            master, slave = pty.openpty()  # cooked, echoing: the agent must make it raw
            self.proc = subprocess.Popen([str(binary), os.ttyname(slave)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=stderr)
            self._slave = slave
            self.fd = master
        else:
            ours, theirs = socket.socketpair()
            self.proc = subprocess.Popen([str(binary), "-"], stdin=theirs.fileno(), stdout=theirs.fileno(),
                                         stderr=stderr)
            theirs.close()
            self._sock = ours
            self._slave = None
            self.fd = ours.fileno()
        self.decoder = agent.FrameDecoder()
        self.frames: list[agent.Frame] = []
        self.raw = bytearray()
        self.hello = self.next_frame()
        if self._slave is not None:
            os.close(self._slave)  # the agent has the device open by now
            self._slave = None

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            _, w, _ = select.select([], [self.fd], [], WAIT_S)
            assert w, "the agent stopped reading its device"
            n = os.write(self.fd, view[:65536])
            view = view[n:]

    def next_frame(self) -> agent.Frame:
        deadline = time.monotonic() + WAIT_S
        while not self.frames:
            left = deadline - time.monotonic()
            r, _, _ = select.select([self.fd], [], [], max(left, 0))
            if not r:
                raise AssertionError(f"no frame from the agent within {WAIT_S} s; stderr: {self.stderr()}")
            try:
                data = os.read(self.fd, 1 << 20)
            except OSError:
                data = b""
            if not data:
                raise AssertionError(f"the agent closed its device; stderr: {self.stderr()}")
            self.raw += data
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    def request(self, seq: int, payload: dict) -> agent.Frame:
        self.send(agent.encode_frame("exec", seq, payload))
        frame = self.next_frame()
        assert frame.seq == seq, frame
        return frame

    def run(self, payload: dict, seq: int = 1) -> tuple[int, bytes, bytes, dict]:
        frame = self.request(seq, payload)
        assert frame.kind == "result", frame.payload
        p = frame.payload
        return p["returncode"], base64.b64decode(p["stdout"]), base64.b64decode(p["stderr"]), p

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self._slave is not None:
            os.close(self._slave)
        if hasattr(self, "_sock"):
            self._sock.close()
        else:
            os.close(self.fd)
        for f in self._files:
            f.close()


@pytest.fixture(params=["pty", "socketpair"])
def transport(request):
    return request.param


@pytest.fixture
def linux_agent(agent_binary, transport, tmp_path):
    a = AgentProcess(agent_binary, transport, tmp_path)
    yield a
    a.close()


@pytest.fixture
def pty_agent(agent_binary, tmp_path):
    a = AgentProcess(agent_binary, "pty", tmp_path)
    yield a
    a.close()


@pytest.fixture
def sock_agent(agent_binary, tmp_path):
    a = AgentProcess(agent_binary, "socketpair", tmp_path)
    yield a
    a.close()


def _gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (reaped, or a zombie about to be)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.01)
    return False


# ---- requests ------------------------------------------------------------------------------------
def test_hello_comes_first(linux_agent):
    h = linux_agent.hello
    assert (h.kind, h.seq, h.version) == ("hello", 0, 1)
    assert h.payload == {"agent": "microvm-agent-linux", "version": 1}


def test_sh_request_stdout_stderr_and_status(linux_agent):
    rc, out, err, _ = linux_agent.run({"sh": "echo out; echo err >&2; exit 3"})
    assert (rc, out, err) == (3, b"out\n", b"err\n")


def test_argv_request_passes_arguments_verbatim(linux_agent):
    args = ["a b", "", "quote\"'$HOME", "é😀\t\n", "-n"]
    rc, out, _, _ = linux_agent.run({"argv": ["printf", "[%s]\\n", *args]})
    assert rc == 0
    assert out == b"".join(b"[" + a.encode() + b"]\n" for a in args)


def test_stdin_is_fed(linux_agent):
    data = bytes(range(256)) * 1200  # more than a pipe holds
    rc, out, _, _ = linux_agent.run({"argv": ["cat"], "stdin": base64.b64encode(data).decode()})
    assert (rc, out) == (0, data)
    rc, out, _, _ = linux_agent.run({"sh": "sleep 0.05; wc -c", "stdin": base64.b64encode(data).decode()}, seq=2)
    assert (rc, out.strip()) == (0, str(len(data)).encode())


def test_stdin_a_command_does_not_read_is_dropped(linux_agent):
    rc, out, _, _ = linux_agent.run({"sh": "echo ignored", "stdin": base64.b64encode(b"x" * 500_000).decode()})
    assert (rc, out) == (0, b"ignored\n")
    assert linux_agent.run({"sh": "echo next"}, seq=2)[1] == b"next\n"


@pytest.mark.parametrize("code", [0, 1, 42, 255, 256 + 7])
def test_exit_codes(pty_agent, code):
    assert pty_agent.run({"sh": f"exit {code}"})[0] == code & 0xFF


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_signals_are_128_plus_n(pty_agent, sig):
    assert pty_agent.run({"sh": f"kill -{int(sig)} $$"})[0] == 128 + sig


def test_a_program_that_cannot_run_is_an_error_answer(linux_agent):
    f = linux_agent.request(1, {"argv": ["/nonexistent/program"]})
    assert f.kind == "error"
    assert f.payload["message"].startswith("FileNotFoundError: cannot execute /nonexistent/program")
    f = linux_agent.request(2, {"argv": [str(ROOT / "README.md")]})
    assert f.kind == "error" and "Permission denied" in f.payload["message"]
    assert linux_agent.run({"argv": ["true"]}, seq=3)[0] == 0


def test_path_search(pty_agent, tmp_path):
    tool = tmp_path / "bin" / "my-tool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho tool \"$@\"\n")
    tool.chmod(0o755)
    rc, out, _, _ = pty_agent.run({"sh": f"PATH={tool.parent}:$PATH exec env my-tool x"})
    assert (rc, out) == (0, b"tool x\n")


def test_timeout_kills_the_process_group(linux_agent, tmp_path):
    pids = tmp_path / "pids"
    f = linux_agent.request(1, {"sh": f"sleep 100 & echo $! > {pids}; sh -c 'echo $$ >> {pids}; sleep 100'",
                                "timeout": 0.3})
    assert f.kind == "error"
    assert f.payload["message"].startswith("TimeoutExpired: the command ran longer than its timeout of 0.300 s")
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2
    for pid in started:  # the background child and the grandchild, not just the shell
        assert _wait_gone(pid), f"pid {pid} survived the timeout"
    assert linux_agent.run({"sh": "echo after"}, seq=2)[1] == b"after\n"


def test_no_timeout_when_zero_or_null(pty_agent):
    assert pty_agent.run({"sh": "sleep 0.2; echo done", "timeout": 0})[1] == b"done\n"
    assert pty_agent.run({"sh": "echo done", "timeout": None}, seq=2)[1] == b"done\n"


def test_background_process_does_not_hold_the_answer(pty_agent, tmp_path):
    pidfile = tmp_path / "pid"
    rc, out, _, _ = pty_agent.run({"sh": f"sleep 60 & echo $! > {pidfile}; echo started"})
    pid = int(pidfile.read_text())
    try:
        assert (rc, out) == (0, b"started\n")
        assert not _gone(pid)  # still holding the output pipes when the answer came
    finally:
        os.kill(pid, signal.SIGKILL)
    assert _wait_gone(pid)  # reaped by the agent, its subreaper


def test_huge_output_is_truncated_and_reported(sock_agent):
    extra_out, extra_err = 1_000_000, 123
    rc, out, err, p = sock_agent.run(
        {"sh": f"head -c {OUTPUT_CAP + extra_out} /dev/zero; head -c {OUTPUT_CAP + extra_err} /dev/zero >&2"}
    )
    assert rc == 0
    assert (len(out), len(err)) == (OUTPUT_CAP, OUTPUT_CAP)
    assert (p["stdout_truncated"], p["stderr_truncated"]) == (extra_out, extra_err)
    _, out, _, p = sock_agent.run({"sh": "echo small"}, seq=2)
    assert out == b"small\n" and "stdout_truncated" not in p


def test_output_up_to_the_cap_is_complete(pty_agent):
    rc, out, _, p = pty_agent.run({"sh": f"head -c {OUTPUT_CAP} /dev/urandom"})
    assert rc == 0 and len(out) == OUTPUT_CAP and "stdout_truncated" not in p


def test_several_requests_in_one_write(linux_agent):
    linux_agent.send(b"".join(agent.encode_frame("exec", i, {"sh": f"echo {i}"}) for i in range(1, 6)))
    answers = [linux_agent.next_frame() for _ in range(5)]
    assert [(f.seq, base64.b64decode(f.payload["stdout"])) for f in answers] == [(i, f"{i}\n".encode())
                                                                                for i in range(1, 6)]


def test_a_frame_dribbled_byte_by_byte(pty_agent):
    for b in b"console noise " + agent.encode_frame("exec", 9, {"sh": "echo slow"}):
        pty_agent.send(bytes([b]))
    f = pty_agent.next_frame()
    assert (f.seq, base64.b64decode(f.payload["stdout"])) == (9, b"slow\n")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"argv": []}, "argv must be a non-empty list of strings"),
        ({"argv": "ls"}, "argv must be a non-empty list of strings"),
        ({"argv": ["ls", 3]}, "argv must be a non-empty list of strings"),
        ({"sh": 5}, "a request needs argv or sh"),
        ({}, "a request needs argv or sh"),
        ({"argv": ["echo", "a\0b"]}, "embedded NUL"),
        ({"argv": ["echo", "\ud800"]}, "lone surrogate"),
        ({"sh": "true", "stdin": "not base64!"}, "stdin is not valid base64"),
        ({"sh": "true", "stdin": None}, "stdin is not valid base64"),
        ({"sh": "true", "timeout": -1}, "timeout must not be negative"),
        ({"sh": "true", "timeout": "soon"}, "timeout must be a number of seconds"),
    ],
)
def test_bad_requests_get_error_answers(pty_agent, payload, message):
    f = pty_agent.request(4, payload)
    assert f.kind == "error" and message in f.payload["message"]
    # The reference agent refuses the same requests (its messages are Python's).
    reference = agent.AgentServer(read=lambda: b"", write=lambda b: None).handle(agent.Frame("exec", 4, payload))
    assert agent.FrameDecoder().feed(reference)[0].kind == "error"


def _frame_with(kind: str = "exec", seq: int = 1, body: bytes | None = None, crc: int | None = None,
                version: int = 1) -> bytes:
    if body is None:
        body = base64.b64encode(json.dumps({"sh": "echo bad"}).encode())
    if crc is None:
        crc = zlib.crc32(body)
    return b"@@microvm-agent:%d:%s:%d:%08x:%s@@\n" % (version, kind.encode(), seq, crc, body)


GARBAGE = [
    (b"plain console output\n", None),
    (b"\x00\xff\x1b[2J binary junk\r\n", None),
    (b"@@microvm-agent:1:exec:1:cafe@@\n", "malformed frame"),
    (agent.encode_frame("exec", 1, {"sh": "echo bad"})[:-20] + b"\n", "malformed frame"),
    (_frame_with(crc=0), "CRC mismatch"),
    (_frame_with(version=2), "unknown protocol version"),
    (_frame_with(kind="reboot"), "unknown kind"),
    (_frame_with(seq=10**30), "sequence number out of range"),
    (_frame_with(body=b"QUJD="), "payload is not base64"),
    (_frame_with(body=base64.b64encode(b"[1, 2]")), "payload is not a JSON object"),
    (_frame_with(body=base64.b64encode(b'{"sh": "echo bad",}')), "payload is not a JSON object"),
    (_frame_with(body=base64.b64encode(b'{"sh": "\xff"}')), "payload is not a JSON object"),
    (agent.encode_frame("result", 1, {"returncode": 0}), "ignored a 'result' frame"),
    (agent.encode_frame("hello", 0, {"agent": "x", "version": 1}), "ignored a 'hello' frame"),
]


def test_garbled_frames_are_ignored_and_counted(linux_agent):
    for data, _ in GARBAGE:
        linux_agent.send(data)
    bad = sum(1 for _, logged in GARBAGE if logged and not logged.startswith("ignored a '"))
    rc, out, _, _ = linux_agent.run({"sh": "echo good"}, seq=77)
    assert (rc, out) == (0, b"good\n")
    assert linux_agent.frames == []  # exactly one answer: nothing else was taken for a request
    log = linux_agent.stderr()
    for _, logged in GARBAGE:
        if logged:
            assert logged in log
    assert f"({bad} bad so far)" in log


def test_an_oversized_line_is_dropped_whole(sock_agent):
    frame = agent.encode_frame("exec", 5, {"sh": "echo big", "stdin": base64.b64encode(b"\0" * (LINE_CAP // 4 * 3)).decode()})
    assert len(frame) > LINE_CAP
    sock_agent.send(frame + agent.encode_frame("exec", 6, {"sh": "echo after"}))
    f = sock_agent.next_frame()
    assert (f.seq, base64.b64decode(f.payload["stdout"])) == (6, b"after\n")
    assert "ignored a line longer than 16777216 bytes (1 so far)" in sock_agent.stderr()


def test_eof_on_the_device_ends_the_agent(sock_agent):
    sock_agent._sock.shutdown(socket.SHUT_WR)
    assert sock_agent.proc.wait(WAIT_S) == 0


def test_a_device_at_eof_is_waited_on(agent_binary, tmp_path):
    """A virtio port reads as EOF until its host side connects: the agent waits (here on /dev/null)."""
    err = tmp_path / "stderr"
    with open(err, "wb") as fh:
        proc = subprocess.Popen([str(agent_binary), "/dev/null"], stderr=fh)
    try:
        deadline = time.monotonic() + WAIT_S
        while b"waiting for one" not in err.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert err.read_text() == "microvm-agent: /dev/null: no host side connected; waiting for one\n"
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_device_not_ready_yet_is_opened_again(agent_binary, tmp_path):
    """ENXIO (a virtio port whose node exists before its driver is ready; here a socket file) is retried."""
    path = tmp_path / "not-ready"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    err = tmp_path / "stderr"
    with open(err, "wb") as fh:
        proc = subprocess.Popen([str(agent_binary), str(path)], stderr=fh)
    try:
        deadline = time.monotonic() + WAIT_S
        while b"trying again" not in err.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert err.read_text() == f"microvm-agent: {path}: No such device or address; trying again for up to 10 s\n"
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
        sock.close()


def test_usage_and_device_errors(agent_binary, tmp_path):
    p = subprocess.run([str(agent_binary)], capture_output=True, text=True, check=False)
    assert p.returncode == 2 and "usage: microvm-agent DEVICE" in p.stderr
    p = subprocess.run([str(agent_binary), str(tmp_path / "no-such-tty")], capture_output=True, text=True, check=False)
    assert p.returncode == 1
    assert p.stderr.strip() == f"microvm-agent: cannot open {tmp_path / 'no-such-tty'}: No such file or directory"


def test_the_pty_is_switched_to_raw_mode(pty_agent):
    # CR, ^C, ^D and ^Z reach the command unchanged: no line discipline in between.
    data = b"a\rb\x03c\x04d\x1ae\n"
    assert pty_agent.run({"argv": ["cat"], "stdin": base64.b64encode(data).decode()})[1] == data
    assert b"\r\n" not in pty_agent.raw  # no output translation: frames end in a bare newline


# ---- through the plugin's client -------------------------------------------------------------------
class _AgentVM:
    """What AgentClient needs of a MicroVM, with microvm-agent on a pty at the far end."""

    def __init__(self, proc: AgentProcess) -> None:
        self.name = "host-agent"
        self.spec = types.SimpleNamespace(timeout=WAIT_S)
        self.exit_status = None
        self._proc = proc
        self._listeners = []
        self.console = types.SimpleNamespace(send=lambda s: proc.send(s.encode()))
        self._stop = False
        self._thread = threading.Thread(target=self._pump, daemon=True)

    def add_output_listener(self, fn):
        self._listeners.append(fn)
        fn(bytes(self._proc.raw))  # replay, as MicroVM does
        if not self._thread.is_alive():
            self._thread.start()

    def _pump(self):
        while not self._stop:
            r, _, _ = select.select([self._proc.fd], [], [], 0.05)
            if r:
                try:
                    data = os.read(self._proc.fd, 1 << 20)
                except OSError:
                    return
                if not data:
                    return
                for fn in self._listeners:
                    fn(data)


def test_microvm_run_through_the_client(pty_agent):
    vm = _AgentVM(pty_agent)
    client = agent.AgentClient(vm)
    try:
        r = client.run("echo hi; echo there >&2")
        assert (r.returncode, r.stdout, r.stderr, r.stdout_truncated) == (0, b"hi\n", b"there\n", 0)
        assert client.run(["cat"], input=b"\x00\x01").stdout == b"\x00\x01"
        with pytest.raises(subprocess.CalledProcessError):
            client.run("exit 4", check=True)
        with pytest.raises(AgentTimeout, match="timed out after 0.5 s: TimeoutExpired: the command ran longer"):
            client.run("sleep 30", timeout=0.5)
        with pytest.raises(AgentError, match="the exec agent refused: FileNotFoundError"):
            client.run(["/nonexistent"])
        r = client.run(f"head -c {OUTPUT_CAP + 10} /dev/zero")
        assert (len(r.stdout), r.stdout_truncated) == (OUTPUT_CAP, 10)
    finally:
        vm._stop = True
        vm._thread.join()


# ---- the reference agent agrees -----------------------------------------------------------------------
REQUESTS = [
    {"sh": "echo out; echo err >&2; exit 3"},
    {"argv": ["printf", "%s|", "a b", "é"]},
    {"argv": ["cat"], "stdin": base64.b64encode(b"\x00\xff" * 1000).decode()},
    {"sh": "kill -TERM $$"},
    {"sh": "kill -KILL $$"},
    {"sh": "exit 255"},
    {"argv": ["/nonexistent/program"]},
    {"argv": []},
    {"sh": "sleep 5", "timeout": 0.2},
]


def test_c_and_python_agents_answer_alike(pty_agent):
    server = agent.AgentServer(read=lambda: b"", write=lambda b: None)
    for seq, req in enumerate(REQUESTS, 1):
        c = pty_agent.request(seq, req)
        py = agent.FrameDecoder().feed(server.handle(agent.Frame("exec", seq, req)))[0]
        assert (c.kind, c.seq) == (py.kind, py.seq), req
        if c.kind == "result":
            assert c.payload == py.payload, req
        else:
            assert c.payload["message"].split(":")[0] == py.payload["message"].split(":")[0], req


# ---- the C core against the Python implementation (Hypothesis) -------------------------------------------
def _protocheck(exe: Path, mode: str, data: bytes) -> list[bytes]:
    p = subprocess.run([str(exe), mode], input=data, capture_output=True, timeout=WAIT_S, check=False)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    return p.stdout.splitlines(keepends=True)


def _python_decode(line: bytes) -> agent.Frame | None:
    dec = agent.FrameDecoder()
    frames = dec.feed(line if line.endswith(b"\n") else line + b"\n")
    return frames[0] if frames else None


json_scalars = st.one_of(
    st.text(), st.integers(min_value=-(2**70), max_value=2**70), st.booleans(), st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
payloads = st.dictionaries(st.text(max_size=12), json_values, max_size=6)
kinds = st.sampled_from(agent.KINDS)
seqs = st.integers(min_value=0, max_value=2**64 - 1)

CHECK = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@CHECK
@given(kind=kinds, seq=seqs, payload=payloads)
@example(kind="exec", seq=0, payload={"k\u0000ey": "\U0001F600\ud7ff\ue000", "": [[], {}], "n": -0.0})
def test_payload_round_trip_through_the_c_reader_and_writer(protocheck, kind, seq, payload):
    """Python frame -> C reader -> C writer -> Python reader: the same kind, seq and payload."""
    line = agent.encode_frame(kind, seq, payload)
    out = _protocheck(protocheck, "frames", b"noise " + line)
    assert len(out) == 1
    frame = _python_decode(out[0])
    assert frame is not None, out[0]
    assert (frame.kind, frame.seq, frame.payload) == (kind, seq, payload)


@CHECK
@given(
    argv=st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")), min_size=1,
                  max_size=5),
    shell=st.booleans(),
    stdin=st.binary(max_size=300),
    timeout=st.one_of(st.none(), st.floats(min_value=0, max_value=1e9), st.integers(min_value=0, max_value=10**9)),
)
def test_exec_requests_read_like_python(protocheck, argv, shell, stdin, timeout):
    req: dict = {"sh": argv[0]} if shell else {"argv": argv}
    req["stdin"] = base64.b64encode(stdin).decode()
    if timeout is not None:
        req["timeout"] = timeout
    out = _protocheck(protocheck, "exec", agent.encode_frame("exec", 1, req))
    got = json.loads(out[0])
    assert got["shell"] == int(shell)
    assert [base64.b64decode(a) for a in got["argv"]] == [a.encode() for a in (argv[:1] if shell else argv)]
    assert base64.b64decode(got["stdin"]) == stdin
    # Seconds to milliseconds, rounded up, from the exact decimal text Python wrote.
    text = json.dumps(timeout)
    want = -1 if not timeout else min(math.ceil(Fraction(text) * 1000), 10**12)
    assert got["timeout_ms"] == want


@CHECK
@given(text=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", max_size=24))
@example(text="QR==")
@example(text="QUJD==")
@example(text="QQ")
def test_base64_is_canonical_python(protocheck, text):
    """What C decodes, Python decodes to the same bytes; every canonical encoding C decodes."""
    out = json.loads(_protocheck(protocheck, "exec", agent.encode_frame("exec", 1, {"sh": "x", "stdin": text}))[0])
    try:
        py = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        py = None
    if "error" in out:
        assert out["error"] == "stdin is not valid base64"
        assert py is None or base64.b64encode(py).decode() != text
    else:
        assert base64.b64decode(out["stdin"]) == py


#: What protocheck writes for a string it cannot decode (a lone surrogate).
UNDECODABLE = json.dumps("\x01undecodable")[1:-1]


def _mutate(line: bytes, data) -> bytes:
    b = bytearray(line.rstrip(b"\n"))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        i = data.draw(st.integers(min_value=0, max_value=max(len(b) - 1, 0)))
        if op == "flip" and b:
            b[i] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
        elif op == "insert":
            b.insert(i, data.draw(st.integers(min_value=0, max_value=255)))
        elif op == "delete" and b:
            del b[i]
        else:
            del b[i:]
    return bytes(b).replace(b"\n", b" ") + b"\n"


@CHECK
@given(payload=payloads, data=st.data())
def test_garbled_frames_never_become_other_answers(protocheck, payload, data):
    """A damaged line is rejected by C unless it still is a frame Python reads the same way."""
    line = _mutate(agent.encode_frame("exec", 3, payload), data)
    out = _protocheck(protocheck, "frames", line)
    assert len(out) == 1
    py = _python_decode(line)
    if out[0].startswith((b"bad ", b"none")):
        return
    c = _python_decode(out[0])
    assert c is not None and py is not None, (line, out)
    assert (c.kind, c.seq, c.payload) == (py.kind, py.seq, py.payload)


@CHECK
@given(text=st.text(max_size=40), data=st.data())
@example(text='{"a": 1, "a": 2}', data=None)
@example(text='{"a": NaN}', data=None)
@example(text='{"a": 01}', data=None)
@example(text='{"a": "\\ud800"}', data=None)
@example(text='{"a": 1e400}', data=None)
@example(text=' {"a":[1,{"b":null}]}\n', data=None)
def test_json_reader_is_a_strict_subset_of_pythons(protocheck, text, data):
    """Random near-JSON in a valid frame: what C accepts, Python accepts and reads alike."""
    if data is not None and data.draw(st.booleans()):  # a valid document, then damaged
        text = '{"k": ' + json.dumps(text) + "}"
        text = _mutate(text.encode(), data).decode("utf-8", "replace").rstrip("\n")
    raw = text.encode("utf-8", "surrogatepass")
    body = base64.b64encode(raw)
    out = _protocheck(protocheck, "frames", _frame_with(body=body))
    try:
        py = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        py = None
    if out[0].startswith(b"bad "):
        return
    c = _python_decode(out[0])
    assert isinstance(py, dict) and c is not None, (text, out)
    if UNDECODABLE in json.dumps(c.payload):
        # Valid JSON that names a lone surrogate: C reads the document but will not decode that string.
        assert any(0xD800 <= ord(ch) <= 0xDFFF for ch in json.dumps(py, ensure_ascii=False)), (text, c.payload)
    else:
        assert c.payload == py


def test_crc_and_base64_match_zlib_and_python(protocheck):
    data = os.urandom(4096)
    req = {"sh": "x", "stdin": base64.b64encode(data).decode()}
    got = json.loads(_protocheck(protocheck, "exec", agent.encode_frame("exec", 2, req))[0])
    assert base64.b64decode(got["stdin"]) == data
    # The frames the core writes carry zlib's CRC of their base64 text.
    out = _protocheck(protocheck, "frames", agent.encode_frame("result", 2, {"blob": got["stdin"]}))[0]
    _, crc, body = out.rstrip(b"@\n").rsplit(b":", 2)
    assert int(crc, 16) == zlib.crc32(body)


def test_protocheck_survives_a_line_past_its_buffer(protocheck):
    out = _protocheck(protocheck, "frames", b"x" * (9 << 20) + b"\n" + agent.encode_frame("exec", 1, {"sh": "y"}))
    assert out[0].startswith(b"@@microvm-agent:1:exec:1:") and out[1] == b"oversized 1\n"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
