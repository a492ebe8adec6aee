"""MicroVM.run() end to end on real VMs: the tiny guest with the exec agent (tiny:agent).

The guest runs guests/tiny/programs/agent.c, which serves the protocol of
pytest_microvm/agent.py on COM1 with built-in commands.  Every test runs on
our VMM and on QEMU's microvm machine.
"""

from __future__ import annotations

import os
import subprocess
import zlib

import pytest

from pytest_microvm import agent
from pytest_microvm.errors import AgentError, AgentTimeout, MicroVMError

BACKENDS = pytest.mark.parametrize("backend", ["kvm", "qemu"])
#: Output the tiny agent keeps per stream (guests/tiny/programs/agent.c OUTPUT_CAP).
TINY_OUTPUT_CAP = 16 << 10


@pytest.fixture
def agent_vm(microvm_factory, backend):
    return microvm_factory(kernel="tiny:agent", backend=backend, timeout=60).start()


@BACKENDS
def test_echo(agent_vm, backend):
    r = agent_vm.run("echo hi")
    assert isinstance(r, subprocess.CompletedProcess)
    assert (r.args, r.returncode, r.stdout, r.stderr) == ("echo hi", 0, b"hi\n", b"")
    hello = agent.FrameDecoder().feed(agent_vm.serial_output.encode())[0]
    assert hello.kind == "hello" and hello.payload == {"agent": "microvm-agent-tiny", "version": 1}


@BACKENDS
def test_return_codes_and_errors(agent_vm, backend):
    assert agent_vm.run("true").returncode == 0
    assert agent_vm.run(["false"]).returncode == 1
    r = agent_vm.run("no-such-command x")
    assert (r.returncode, r.stdout, r.stderr) == (127, b"", b"no-such-command: command not found\n")
    with pytest.raises(subprocess.CalledProcessError) as exc:
        agent_vm.run("false", check=True)
    assert exc.value.returncode == 1
    r = agent_vm.run("stderr to stderr")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"to stderr\n")
    with pytest.raises(AgentError, match="the exec agent refused: ValueError: argv must be a non-empty list"):
        agent_vm.run([])


@BACKENDS
def test_words_and_quoting(agent_vm, backend):
    assert agent_vm.run(["echo", "a  b", "", "c"]).stdout == b"a  b  c\n"
    assert agent_vm.run("echo 'a  b' \"c\\\"d\" e\\ f").stdout == b'a  b c"d e f\n'
    assert agent_vm.run("echo -n no newline").stdout == b"no newline"
    r = agent_vm.run("echo 'unterminated")
    assert (r.returncode, r.stderr) == (2, b"sh: unterminated quote\n")


@BACKENDS
def test_stdin(agent_vm, backend):
    data = os.urandom(1500)
    r = agent_vm.run("sum", input=data)
    assert r.stdout == f"{zlib.crc32(data):08x} {len(data)}\n".encode()
    every_byte = bytes(range(256)) * 2
    assert agent_vm.run(["cat"], input=every_byte).stdout == every_byte
    assert agent_vm.run("sum").stdout == b"00000000 0\n"


@BACKENDS
def test_large_output(agent_vm, backend):
    r = agent_vm.run("yes 1000 0123456789")
    assert r.stdout == b"0123456789\n" * 1000 and r.stdout_truncated == 0


@BACKENDS
def test_output_past_the_cap_is_truncated_and_reported(agent_vm, backend):
    r = agent_vm.run("yes 2000 0123456789")
    assert r.returncode == 0
    assert r.stdout == (b"0123456789\n" * 2000)[:TINY_OUTPUT_CAP]
    assert r.stdout_truncated == 22000 - TINY_OUTPUT_CAP


@BACKENDS
def test_timeout(agent_vm, backend):
    with pytest.raises(AgentTimeout, match=r"timed out after 0.5 s: TimeoutExpired: sleep ran longer than its timeout"):
        agent_vm.run("sleep 600000", timeout=0.5)
    # The agent stopped the command and serves the next request.
    assert agent_vm.run("echo after").stdout == b"after\n"
    assert agent_vm.run("sleep 10", timeout=20).returncode == 0


@BACKENDS
def test_garbage_on_the_line_before_a_request(agent_vm, backend):
    agent_vm.run("true")  # the agent is up
    good = agent.encode_frame("exec", 900, {"sh": "echo must not run"}).decode()
    head = good.rsplit(":", 1)[0]
    agent_vm.console.send(
        "random console input\n"
        "\x00\x1b[A binary \xff junk\r\n"
        + good.replace(head.rsplit(":", 1)[1], "00000000")  # CRC mismatch
        + good[: len(good) // 2] + "\n"  # cut short
        + good.replace(":exec:", ":reboot:")  # unknown kind
        + good.replace("agent:1:", "agent:7:")  # another protocol version
        + agent.encode_frame("result", 901, {"returncode": 0}).decode()  # a kind the agent does not serve
        + "noise on the same line " + agent.encode_frame("exec", 902, {"sh": "echo embedded"}).decode()
    )
    r = agent_vm.run("stats")
    assert r.stdout == b"requests=3 bad_frames=4 ignored=1 oversized=0\n"
    out = agent_vm.serial_output
    assert "agent: ignored a frame: CRC mismatch (1 bad so far)" in out
    assert "agent: ignored a frame: malformed frame (2 bad so far)" in out
    assert "agent: ignored a frame: unknown kind (3 bad so far)" in out
    assert "agent: ignored a frame: unknown protocol version (4 bad so far)" in out
    assert "agent: ignored a 'result' frame" in out
    answers = agent.FrameDecoder().feed(out.encode())
    assert [f.seq for f in answers if f.kind != "hello"] == [1, 902, 2]  # 900 never ran


@BACKENDS
def test_several_requests_in_a_row(agent_vm, backend):
    for i in range(12):
        cmd = ["echo", str(i)] if i % 2 else f"echo {i}"
        assert agent_vm.run(cmd).stdout == f"{i}\n".encode()
    assert agent_vm.run("stats").stdout.startswith(b"requests=13 bad_frames=0 ")


@BACKENDS
def test_exit_ends_the_vm_after_answering(agent_vm, backend):
    assert agent_vm.run("exit 7").returncode == 7
    status = agent_vm.wait()
    assert status.reason.value == "guest-exit" and agent_vm.exit_code == 7
    with pytest.raises(MicroVMError, match="the VM ended"):
        agent_vm.run("echo too late")


@BACKENDS
def test_cmdline(microvm_factory, backend):
    vm = microvm_factory(kernel="tiny:agent", backend=backend, append="console=ttyS0 answer=42").start()
    assert vm.run("cmdline").stdout == b"console=ttyS0 answer=42\n"


@BACKENDS
@pytest.mark.parametrize("fmt", ["bzimage", "multiboot"])
def test_other_entry_protocols(microvm_factory, backend, fmt):
    vm = microvm_factory(kernel=f"tiny:agent:{fmt}", backend=backend).start()
    assert vm.run(["echo", fmt]).stdout == f"{fmt}\n".encode()
