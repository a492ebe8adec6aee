"""The fuzzing targets by name: what `microvm fuzz TARGET` and the benchmarks run.

Each target is a ``FuzzMachine`` subclass; its test module under
``tests/fuzz/`` exposes the same machine as ``Machine.TestCase`` for pytest
and HypoFuzz.
"""

from __future__ import annotations

import importlib

#: target name -> "module:Class" (imported on demand: no import-time work).
TARGETS = {
    "uart": "pytest_microvm.fuzz.stateful.uart:UartMachine",
    "legacy-ports": "pytest_microvm.fuzz.stateful.legacy:LegacyPortsMachine",
    "virtqueue": "pytest_microvm.fuzz.stateful.virtqueue:VirtqueueMachine",
    "virtio-mmio": "pytest_microvm.fuzz.stateful.virtio:VirtioMachine",
    "virtio-rng": "pytest_microvm.fuzz.stateful.virtio:RngMachine",
    "virtio-blk": "pytest_microvm.fuzz.stateful.virtio:BlkMachine",
    "virtio-blk-ro": "pytest_microvm.fuzz.stateful.virtio:BlkReadOnlyMachine",
    "virtio-console": "pytest_microvm.fuzz.stateful.async_devices:ConsoleMachine",
    "virtio-net": "pytest_microvm.fuzz.stateful.async_devices:NetMachine",
    "virtio-vsock": "pytest_microvm.fuzz.stateful.async_devices:VsockMachine",
}


def load(name: str) -> type:
    """The state machine class of target ``name``; ``KeyError`` names the known ones."""
    try:
        spec = TARGETS[name]
    except KeyError:
        raise KeyError(f"unknown fuzz target {name!r} (known: {', '.join(sorted(TARGETS))})") from None
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)
