"""Snapshots: save a paused VM to a directory and start new VMs from it.

A snapshot is a directory:

    state.json      format version, the machine config, per-vCPU KVM state,
                    irqchip / PIT / clock state, device state (hex blobs)
    memory-N.bin    guest RAM region N (sparse: zero pages are holes)

``save(machine, path)`` pauses the VM (every vCPU outside KVM_RUN), saves it
and lets it run on.  ``restore(path)`` builds a new Machine whose memory, vCPUs,
irqchip, clock and devices continue where the saved one was, ready to
``start()``; restore the same snapshot as many times as you like (each restored
VM is independent).  KVM state is saved as this host's structs: a snapshot is
for the host (kernel and KVM) that made it.

The restore order of vCPU state follows the KVM API's constraints (CPUID
before anything else, LAPIC before the TSC-deadline MSR, events last), the
way Firecracker and QEMU restore.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from .boot.types import BootRequest, BootSetup
from .cpustate import CpuState
from .errors import ConfigError, VmmError

FORMAT_VERSION = 1
STATE_FILE = "state.json"

#: Per-vCPU blobs in restore order (mp_state first: KVM resets some state on INIT).
VCPU_BLOBS = ("mp_state", "regs", "sregs", "xsave", "xcrs", "debugregs", "lapic")
#: Devices with state beyond their configuration.
STATEFUL_DEVICES = ("serial0", "i8042")


class SnapshotError(VmmError):
    """A snapshot cannot be taken or used; names the directory and the problem."""


def _write_sparse(path: Path, data: memoryview) -> None:
    page = mmap.PAGESIZE
    zero = bytes(page)
    with open(path, "wb") as f:
        for off in range(0, len(data), page):
            chunk = data[off : off + page]
            if chunk != zero:
                f.seek(off)
                f.write(chunk)
        f.truncate(len(data))


def _vcpu_msrs(vcpu: Any, indices: list[int]) -> dict[str, int]:
    """Every MSR this KVM reports that the vCPU will read back (one ioctl each: some fail)."""
    out = {}
    for index in indices:
        got = vcpu.fd.get_msrs([index])
        if index in got:
            out[f"{index:#x}"] = got[index]
    return out


def save(machine: Any, path: str | Path) -> Path:
    """Save ``machine`` (started, not ended) into directory ``path``."""
    path = Path(path)
    if machine.t_started is None or machine.status is not None:
        raise SnapshotError(f"{path}: only a running VM can be snapshotted (status: {machine.status})")
    if machine.config.devices:
        kinds = ", ".join(sorted({getattr(d, "kind", type(d).__name__) for d in machine.config.devices}))
        raise SnapshotError(f"{path}: snapshots of VMs with virtio devices ({kinds}) are not supported yet")
    path.mkdir(parents=True, exist_ok=True)
    was_paused = machine.paused
    machine.pause()
    try:
        indices = machine.kvm.msr_index_list()
        vcpus = []
        for v in machine.vcpus:
            vcpus.append(
                {
                    "blobs": {name: v.fd.get_blob(name).hex() for name in VCPU_BLOBS},
                    "events": v.fd.get_blob("events").hex(),
                    "msrs": _vcpu_msrs(v, indices),
                }
            )
        vm = machine.vm
        from .kvm.system import lib

        chips = [
            vm.get_irqchip(chip).hex()
            for chip in (lib.KVM_IRQCHIP_PIC_MASTER, lib.KVM_IRQCHIP_PIC_SLAVE, lib.KVM_IRQCHIP_IOAPIC)
        ]
        devices = {name: machine.devices[name].save_state() for name in STATEFUL_DEVICES if name in machine.devices}
        regions = []
        for i, region in enumerate(machine.memory.regions):
            _write_sparse(path / f"memory-{i}.bin", machine.memory.view(region.gpa, region.size))
            regions.append({"gpa": region.gpa, "size": region.size, "file": f"memory-{i}.bin"})
        state = {
            "format": FORMAT_VERSION,
            "config": _config_dict(machine.config),
            "boot": {"protocol": machine.boot.protocol, "cmdline": machine.boot.cmdline},
            "vcpus": vcpus,
            "irqchips": chips,
            "pit": vm.get_pit2().hex(),
            "clock": vm.get_clock(),
            "devices": devices,
            "memory": regions,
            "boot_time_s": machine.boot_time,
        }
        tmp = path / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path / STATE_FILE)
    finally:
        if not was_paused:
            machine.resume()
    return path


def _config_dict(config: Any) -> dict[str, Any]:
    d = asdict(config)
    for key, value in d.items():
        if isinstance(value, Path):
            d[key] = str(value)
    return d


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        raise SnapshotError(f"{path}: not a snapshot directory (no {STATE_FILE})") from None
    except ValueError as exc:
        raise SnapshotError(f"{path}/{STATE_FILE}: not valid JSON: {exc}") from None
    if state.get("format") != FORMAT_VERSION:
        raise SnapshotError(f"{path}: snapshot format {state.get('format')!r}, this VMM reads {FORMAT_VERSION}")
    return state


def restore(path: str | Path, **overrides: Any):
    """A new, not yet started Machine continuing the VM saved in ``path``.

    ``overrides`` replace config fields that do not change the VM's shape
    (``timeout``, ``console_limit``, ``kvm_path``); memory size, vCPU count and
    devices come from the snapshot.
    """
    from .machine import Machine, MachineConfig

    path = Path(path)
    state = load_state(path)
    allowed = {"timeout", "console_limit", "kvm_path", "cache_dir"}
    bad = set(overrides) - allowed
    if bad:
        raise ConfigError(f"restore: cannot change {', '.join(sorted(bad))} of a snapshot (only {', '.join(sorted(allowed))})")
    known = {f.name for f in fields(MachineConfig)}
    cfg = MachineConfig(**{k: v for k, v in state["config"].items() if k in known})
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if len(state["vcpus"]) != cfg.vcpus:
        raise SnapshotError(f"{path}: {len(state['vcpus'])} vCPUs saved for a {cfg.vcpus}-vCPU config")

    def loader(request: BootRequest) -> BootSetup:
        mem = request.memory
        saved = [(r["gpa"], r["size"]) for r in state["memory"]]
        if saved != list(mem.ranges()):
            raise SnapshotError(f"{path}: saved memory layout {saved} differs from this machine's {list(mem.ranges())}")
        for r in state["memory"]:
            with open(path / r["file"], "rb") as f:
                n = f.readinto(mem.view(r["gpa"], r["size"]))
            if n != r["size"]:
                raise SnapshotError(f"{path}/{r['file']}: {n} bytes, expected {r['size']}: truncated snapshot")
        return BootSetup(
            protocol="snapshot",
            entry=CpuState(rip=0),
            cmdline=state["boot"]["cmdline"],
            restore_vcpu=lambda vcpu: _restore_vcpu(vcpu, state["vcpus"][vcpu.index]),
            attach=lambda machine: _restore_vm(machine, state),
            details={"boot_gdt": False, "restored_from": str(path), "saved_protocol": state["boot"]["protocol"]},
        )

    return Machine(cfg, loader=loader)


def _restore_vcpu(vcpu: Any, saved: dict[str, Any]) -> None:
    for name in VCPU_BLOBS:
        vcpu.fd.set_blob(name, bytes.fromhex(saved["blobs"][name]))
    msrs = {int(k, 16): v for k, v in saved["msrs"].items()}
    try:
        vcpu.fd.set_msrs(msrs)
    except VmmError:
        for index, value in msrs.items():  # set what this KVM accepts, one by one
            try:
                vcpu.fd.set_msrs({index: value})
            except VmmError:
                pass
    vcpu.fd.set_blob("events", bytes.fromhex(saved["events"]))


def _restore_vm(machine: Any, state: dict[str, Any]) -> None:
    vm = machine.vm
    for blob in state["irqchips"]:
        vm.set_irqchip(bytes.fromhex(blob))
    vm.set_pit2(bytes.fromhex(state["pit"]))
    vm.set_clock(int(state["clock"]))
    for name, dev_state in state["devices"].items():
        machine.devices[name].load_state(dev_state)


def size_on_disk(path: str | Path) -> int:
    """Bytes the snapshot really occupies (memory files are sparse)."""
    return sum(os.stat(p).st_blocks * 512 for p in Path(path).iterdir())
