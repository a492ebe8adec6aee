"""cffi bindings for KVM: the only place that knows ioctl numbers and structs.

``ffi`` and ``lib`` come from the extension compiled against <linux/kvm.h>
when the package is installed (see ``_build.py``).  The typed wrappers live in
``system.py``.
"""

from __future__ import annotations

from .system import Kvm, VcpuFd, VmFd, ffi, lib, open_kvm

__all__ = ["Kvm", "VcpuFd", "VmFd", "ffi", "lib", "open_kvm"]
