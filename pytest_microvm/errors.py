"""The errors a test meets, each a subclass of what its users already catch.

Console waits raise subclasses of pexpect's TIMEOUT and EOF, so code written
for pexpect keeps working; their messages say what was awaited, how the VM
ended (if it did) and show the tail of the console output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pexpect

if TYPE_CHECKING:  # pragma: no cover
    from vmm.exitstatus import ExitStatus


class MicroVMError(Exception):
    """Base class of the plugin's own errors."""


class BackendNotInstalled(MicroVMError):
    """The selected backend's program (qemu-system-x86_64) is not installed."""


class BackendError(MicroVMError):
    """The backend could not start or run the VM (names the program and its error)."""


class ConsoleTimeout(pexpect.TIMEOUT, MicroVMError):
    """A console wait timed out while the VM was still running."""


class VmEnded(pexpect.EOF, MicroVMError):
    """A console wait could not succeed because the VM ended; ``status`` says why."""

    def __init__(self, message: str, status: ExitStatus | None = None) -> None:
        super().__init__(message)
        self.status = status


class WaitTimeout(MicroVMError, TimeoutError):
    """``MicroVM.wait(timeout)`` returned before the VM ended."""


class AgentUnavailable(MicroVMError):
    """``MicroVM.run()`` on a guest that does not run the exec agent."""


class AgentError(MicroVMError):
    """The exec agent answered with an error, or the VM ended mid-request."""
