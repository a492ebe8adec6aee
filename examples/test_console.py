"""Console interaction with the echo guest: it prints "echo: <line>" for every line typed."""

import pexpect
import pytest

pytestmark = pytest.mark.microvm(kernel="tiny:echo", timeout=20)


def test_echo_roundtrip(microvm):
    console = microvm.console
    console.expect("echo: ready")
    console.sendline("hello guest")
    console.expect(r"echo: (\w+) (\w+)\r?\n")  # to the end of the line: output arrives in pieces
    assert console.match.group(1, 2) == ("hello", "guest")


def test_before_holds_what_came_first(microvm):
    console = microvm.console
    console.expect_exact("echo: ready")
    assert "tiny-guest echo" in console.before
    console.sendline("one")
    console.sendline("two")
    console.expect_exact("echo: two")
    assert "echo: one" in console.before


def test_exit_command_ends_the_vm(microvm):
    microvm.console.expect("echo: ready")
    microvm.console.sendline("exit 42")
    # EOF in the pattern list: matched when the VM ends, instead of raised.
    assert microvm.console.expect([r"never printed", pexpect.EOF]) == 1
    status = microvm.wait()
    assert (status.reason.value, status.code) == ("guest-exit", 42)
    assert "echo: exiting with code 42" in microvm.serial_output


def test_a_wait_that_cannot_succeed_says_why(microvm):
    microvm.console.expect("echo: ready")
    with pytest.raises(pexpect.TIMEOUT) as excinfo:
        microvm.console.expect("login:", timeout=0.3)
    message = str(excinfo.value)
    assert "'login:' did not appear within 0.3 s" in message
    assert "echo: ready" in message  # the tail of the output
