"""Wiring a device spec into a machine: device model, transport, IRQ line, MMIO window.

``attach_virtio_device`` is what ``Machine`` calls for each entry of
``MachineConfig.devices``.  blk and rng are built here; net, console and
vsock live in their own modules (``net.py``, ``console.py``, ``vsock.py``),
each exposing ``from_spec(spec) -> VirtioDevice``; a build without one of
them refuses that device with a ConfigError naming the option.
"""

from __future__ import annotations

import importlib
from typing import Any

from ...errors import ConfigError, DeviceError
from ...layout import VIRTIO_MMIO_SIZE
from .device import VirtioDevice
from .mmio import VirtioMmioTransport
from .spec import BlockSpec, RngSpec

#: Device kinds whose models live in their own module, and the option that asks for them.
_MODULES = {"net": ("net", "--net"), "console": ("console", "--console"), "vsock": ("vsock", "--vsock")}


def build_device(spec: Any) -> VirtioDevice:
    """The device model for ``spec``."""
    if isinstance(spec, BlockSpec):
        from .blk import VirtioBlock

        return VirtioBlock(spec.path, read_only=spec.read_only, serial=spec.serial)
    if isinstance(spec, RngSpec):
        from .rng import VirtioRng

        return VirtioRng()
    kind = getattr(spec, "kind", None)
    if kind not in _MODULES:
        raise ConfigError(f"unknown virtio device specification {spec!r}")
    module_name, option = _MODULES[kind]
    try:
        module = importlib.import_module(f"{__package__}.{module_name}")
        factory = module.from_spec
    except (ImportError, AttributeError):
        raise ConfigError(f"{option}: virtio-{kind} is not available in this build") from None
    return factory(spec)


#: The `microvm run` option behind each device kind, for error messages.
CLI_OPTIONS = {"blk": "--disk", "rng": "--rng", "net": "--net", "console": "--console", "vsock": "--vsock"}


def attach_virtio_device(machine: Any, spec: Any, index: int, base: int, gsi: int) -> tuple[str, VirtioMmioTransport]:
    """Build ``spec``'s device, put it behind a transport at ``base`` on ``gsi``; returns (name, transport).

    ``machine`` provides ``memory``, ``mmio_bus`` and ``irq_line(gsi)``.
    """
    try:
        device = build_device(spec)
    except DeviceError as exc:
        raise ConfigError(f"{CLI_OPTIONS.get(spec.kind, spec.kind)}: {exc}") from None
    name = f"virtio-{device.name}{index}"
    try:
        transport = VirtioMmioTransport(device, machine.memory, machine.irq_line(gsi), name=name)
        machine.mmio_bus.register(base, VIRTIO_MMIO_SIZE, transport, name)
    except BaseException:
        device.close()
        raise
    return name, transport
