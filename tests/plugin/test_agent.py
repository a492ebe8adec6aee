"""The exec agent protocol: frames, the reference agent, and run() on guests without one."""

from __future__ import annotations

import queue
import threading
import types

import pytest

from pytest_microvm import agent
from pytest_microvm.errors import AgentError, AgentUnavailable


def test_frames_round_trip_in_any_chunking():
    data = (
        b"boot noise\n"
        + agent.encode_frame("hello", 0, {"agent": "t", "version": 1})
        + b"more noise "
        + agent.encode_frame("result", 7, {"returncode": 3, "stdout": "aGk=", "stderr": ""})
    )
    for size in (1, 2, 7, len(data)):
        dec = agent.FrameDecoder()
        frames = []
        for i in range(0, len(data), size):
            frames += dec.feed(data[i : i + size])
        assert [(f.kind, f.seq) for f in frames] == [("hello", 0), ("result", 7)]
        assert frames[1].payload["returncode"] == 3
        assert dec.bad_frames == 0


@pytest.mark.parametrize("damage", ["crc", "payload", "version", "kind", "json"])
def test_damaged_frames_are_ignored_and_counted(damage):
    good = agent.encode_frame("result", 1, {"returncode": 0})
    text = good.decode()
    head, body = text.rsplit(":", 1)
    if damage == "crc":
        bad = text.replace(head.rsplit(":", 1)[1], "00000000")
    elif damage == "payload":
        bad = head + ":" + body[:4] + ("A" if body[4] != "A" else "B") + body[5:]
    elif damage == "version":
        bad = text.replace("agent:1:", "agent:2:")
    elif damage == "kind":
        bad = text.replace(":result:", ":reboot:")
    else:
        import base64
        import zlib

        payload = base64.b64encode(b"[1, 2]").decode()
        bad = f"@@microvm-agent:1:result:1:{zlib.crc32(payload.encode()):08x}:{payload}@@\n"
    dec = agent.FrameDecoder()
    assert dec.feed(bad.encode()) == []
    assert dec.bad_frames == 1


def test_unknown_kind_cannot_be_encoded():
    with pytest.raises(ValueError, match="unknown kind 'boot'"):
        agent.encode_frame("boot", 0, {})


class _LoopbackVM:
    """The transport layer only: a 'console' whose far end is the reference AgentServer."""

    def __init__(self):
        self.name = "loopback"
        self.spec = types.SimpleNamespace(timeout=10.0)
        self.exit_status = None
        self._listeners = []
        self._to_guest: queue.Queue[bytes] = queue.Queue()
        self.console = types.SimpleNamespace(send=lambda s: self._to_guest.put(s.encode()))
        server = agent.AgentServer(read=self._to_guest.get, write=self._emit)
        self.thread = threading.Thread(target=server.serve, daemon=True)

    def add_output_listener(self, fn):
        self._listeners.append(fn)

    def _emit(self, data: bytes):
        for fn in self._listeners:
            fn(data)

    def stop(self):
        self._to_guest.put(b"")
        self.thread.join()


def test_reference_agent_runs_commands():
    vm = _LoopbackVM()
    client = agent.AgentClient(vm)
    vm.thread.start()
    try:
        r = client.run("echo out; echo err >&2; exit 3")
        assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
        r = client.run(["cat"], input=b"\x00binary\xff")
        assert (r.returncode, r.stdout) == (0, b"\x00binary\xff")
        with pytest.raises(AgentError, match="the exec agent refused: FileNotFoundError"):
            client.run(["/nonexistent/program"])
        import subprocess

        with pytest.raises(subprocess.CalledProcessError):
            client.run("false", check=True)
    finally:
        vm.stop()


def test_run_on_a_guest_without_the_agent(microvm_factory):
    ended = microvm_factory(kernel="tiny:hello").start()
    ended.wait()
    with pytest.raises(AgentUnavailable, match="does not run the exec agent: the VM ended"):
        ended.run("uname -a")
    running = microvm_factory(kernel="tiny:echo").start()
    with pytest.raises(AgentUnavailable, match=r"no hello frame on its console within 0.2 s"):
        running.run("uname -a", timeout=0.2)
