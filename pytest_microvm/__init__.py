"""pytest-microvm: a fresh microVM per test, guest results as pytest results.

The fixtures (``microvm``, ``microvm_factory``) come from the pytest plugin
(``pytest_microvm.plugin``, registered as the ``microvm`` pytest11 entry
point); this package also exports the types they hand out.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "AgentUnavailable",
    "ConsoleTimeout",
    "ExitReason",
    "ExitStatus",
    "MicroVM",
    "MicroVMError",
    "MicroVMFactory",
    "VmEnded",
    "VmSpec",
    "WaitTimeout",
]


def __getattr__(name: str):  # lazy: importing the package must not import the VMM
    if name in ("MicroVM", "MicroVMFactory"):
        from . import vm

        return getattr(vm, name)
    if name == "VmSpec":
        from .spec import VmSpec

        return VmSpec
    if name in ("ExitReason", "ExitStatus"):
        from vmm import exitstatus

        return getattr(exitstatus, name)
    if name in ("ConsoleTimeout", "VmEnded", "WaitTimeout", "AgentUnavailable", "MicroVMError"):
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'pytest_microvm' has no attribute {name!r}")
