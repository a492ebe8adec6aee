"""The VMM's error types.

Every error a user can meet names what went wrong and where: the file, the
option, the register or the guest address.  Callers catch ``VmmError`` for
"the VMM refused or failed"; the subclasses say which layer.
"""

from __future__ import annotations


class VmmError(Exception):
    """Base class of every error the VMM raises on purpose."""


class KvmUnavailableError(VmmError):
    """/dev/kvm is missing, not accessible, or lacks a capability we need."""


class KvmIoctlError(VmmError):
    """A KVM ioctl failed; carries the ioctl's name and errno."""

    def __init__(self, name: str, errno_: int, detail: str = "") -> None:
        import os

        self.ioctl = name
        self.errno = errno_
        msg = f"{name} failed: {os.strerror(errno_)} (errno {errno_})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class GuestMemoryError(VmmError):
    """A guest-physical range is outside guest RAM (or wraps past 2**64)."""

    def __init__(self, gpa: int, length: int, reason: str = "outside guest memory") -> None:
        self.gpa = gpa
        self.length = length
        super().__init__(f"guest range {gpa:#x}+{length:#x} is {reason}")


class ImageError(VmmError):
    """A kernel, initrd or guest image is malformed or unusable.

    The message always starts with the file name.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(VmmError):
    """A machine option is invalid (names the option)."""


class DeviceError(VmmError):
    """A device was misconfigured by the host (never raised for guest input)."""


class GuestError(VmmError):
    """A guest did something the VMM must refuse, named by device and address.

    Devices raise this internally; the machine counts it and answers the guest
    the way the device's specification says.  It never ends the VMM.
    """
