"""A KVM virtual machine monitor in Python: loaders, devices, vCPUs.

Knows nothing of pytest.  Import submodules directly; importing ``vmm``
itself does nothing (no KVM access, no compilation).
"""

__version__ = "0.1.0"
