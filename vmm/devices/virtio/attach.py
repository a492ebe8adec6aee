"""Wiring a device spec into a machine: device model, transport, IRQ line, MMIO window.

``attach_virtio_device`` is what ``Machine`` calls for each entry of
``MachineConfig.devices``.  blk and rng are built here; net, console and
vsock live in their own modules (``net.py``, ``console.py``, ``vsock.py``),
each exposing ``from_spec(spec) -> VirtioDevice``; a build without one of
them refuses that device with a ConfigError naming the option.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from ...errors import ConfigError, DeviceError, VmmError
from ...layout import VIRTIO_MMIO_SIZE
from .device import VirtioDevice
from .mmio import VIRTIO_MMIO_QUEUE_NOTIFY, VirtioMmioTransport
from .notify import IoeventfdNotifier
from .spec import BlockSpec, RngSpec

log = logging.getLogger(__name__)

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


#: Device kinds whose queue notifications may go through KVM ioeventfds (notify.py) instead of
#: MMIO exits, when the machine is configured with ``ioeventfd=True`` (`microvm run --ioeventfd`).  Not the default: the device then
#: runs on a thread of its own, which wins when a CPU is free for it (twice the requests per
#: second of a ring-3 polling guest at queue depth 1) and loses when the host is busy (the
#: guest's vCPU and the device thread compete; see bench/blk.py).
IOEVENTFD_KINDS = frozenset({"blk", "rng"})

#: The `microvm run` option behind each device kind, for error messages.
CLI_OPTIONS = {"blk": "--disk", "rng": "--rng", "net": "--net", "console": "--console", "vsock": "--vsock"}


def attach_virtio_device(
    machine: Any, spec: Any, index: int, base: int, gsi: int, *, ioeventfd: bool = False
) -> tuple[str, VirtioMmioTransport]:
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
        if ioeventfd and spec.kind in IOEVENTFD_KINDS:
            use_ioeventfds(machine, transport, base)
    except BaseException:
        device.close()
        raise
    return name, transport


def use_ioeventfds(machine: Any, transport: VirtioMmioTransport, base: int) -> bool:
    """Let KVM signal ``transport``'s queue notifications on eventfds; False where the machine cannot.

    A machine without a KVM VM (device tests) or a KVM without ioeventfds keeps
    the MMIO exit path, which behaves the same apart from the vCPU waiting.
    """
    vm = getattr(machine, "vm", None)
    if vm is None or not hasattr(vm, "ioeventfd"):
        return False

    def register(fd: int, addr: int, queue: int) -> None:
        vm.ioeventfd(fd, addr, 4, datamatch=queue)

    def unregister(fd: int, addr: int, queue: int) -> None:
        if vm.fd >= 0:
            vm.ioeventfd(fd, addr, 4, datamatch=queue, deassign=True)

    try:
        notifier = IoeventfdNotifier(
            transport, len(transport.queues), base + VIRTIO_MMIO_QUEUE_NOTIFY, register, unregister
        )
    except (OSError, VmmError) as exc:
        log.info("%s: no ioeventfds (%s); queue notifications exit to the VMM", transport.name, exc)
        return False
    transport.set_notifier(notifier)
    notifier.start()
    return True
