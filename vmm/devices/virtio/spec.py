"""virtio device specifications: what the user asked for, as plain data.

``MachineConfig.devices`` holds these, in slot order; ``attach.py`` turns each
into a device model behind a virtio-mmio transport.  Parsing the command-line
forms lives here so that errors name the option and the offending text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Union

from ...errors import ConfigError


@dataclass(frozen=True)
class BlockSpec:
    """virtio-blk over a raw image file (``--disk PATH[,ro][,serial=ID]``)."""

    kind: ClassVar[str] = "blk"
    path: str
    read_only: bool = False
    #: GET_ID string (ASCII, at most 20 bytes); None derives one from the path.
    serial: str | None = None


@dataclass(frozen=True)
class RngSpec:
    """virtio-rng from the host's random source (``--rng``)."""

    kind: ClassVar[str] = "rng"


@dataclass(frozen=True)
class NetSpec:
    """virtio-net on a tap device (``--net tap=NAME[,mac=XX:..]``)."""

    kind: ClassVar[str] = "net"
    tap: str
    mac: str | None = None


@dataclass(frozen=True)
class ConsoleSpec:
    """virtio-console on a Unix socket (``--console socket=PATH``)."""

    kind: ClassVar[str] = "console"
    socket: str


@dataclass(frozen=True)
class VsockSpec:
    """virtio-vsock in Firecracker's hybrid Unix-socket form (``--vsock cid=N,path=PATH``)."""

    kind: ClassVar[str] = "vsock"
    cid: int
    path: str


DeviceSpec = Union[BlockSpec, RngSpec, NetSpec, ConsoleSpec, VsockSpec]

#: Guest CIDs 0-2 are reserved (hypervisor, local, host); CIDs are u32 on the wire (§5.10.4).
VSOCK_MIN_GUEST_CID = 3
VSOCK_MAX_CID = 0xFFFF_FFFF


def _options(option: str, text: str, keys: set[str], flags: set[str] = frozenset()) -> dict[str, str]:
    """Parse ``key=value,...`` (and bare ``flag`` words) or raise ConfigError naming ``option``."""
    out: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep and key in flags:
            out[key] = ""
            continue
        if not sep or key not in keys:
            raise ConfigError(f"{option}: unknown or malformed item {part!r} in {text!r}")
        if key in out:
            raise ConfigError(f"{option}: {key} given twice in {text!r}")
        if not value:
            raise ConfigError(f"{option}: {key} is empty in {text!r}")
        out[key] = value
    return out


def parse_disk(text: str) -> BlockSpec:
    path, _, rest = text.partition(",")
    if not path:
        raise ConfigError(f"--disk: no image path in {text!r}")
    opts = _options("--disk", rest, {"serial"}, {"ro"}) if rest else {}
    serial = opts.get("serial")
    if serial is not None and (len(serial) > 20 or not serial.isascii()):
        raise ConfigError(f"--disk: serial {serial!r} must be ASCII, at most 20 bytes")
    return BlockSpec(path=path, read_only="ro" in opts, serial=serial)


def parse_net(text: str) -> NetSpec:
    opts = _options("--net", text, {"tap", "mac"})
    if "tap" not in opts:
        raise ConfigError(f"--net: tap=NAME is required in {text!r}")
    return NetSpec(tap=opts["tap"], mac=opts.get("mac"))


def parse_console(text: str) -> ConsoleSpec:
    opts = _options("--console", text, {"socket"})
    if "socket" not in opts:
        raise ConfigError(f"--console: socket=PATH is required in {text!r}")
    return ConsoleSpec(socket=opts["socket"])


def parse_vsock(text: str) -> VsockSpec:
    opts = _options("--vsock", text, {"cid", "path"})
    if "cid" not in opts or "path" not in opts:
        raise ConfigError(f"--vsock: both cid=N and path=PATH are required in {text!r}")
    try:
        cid = int(opts["cid"], 0)
    except ValueError:
        raise ConfigError(f"--vsock: cid {opts['cid']!r} is not a number") from None
    if not VSOCK_MIN_GUEST_CID <= cid < VSOCK_MAX_CID:
        raise ConfigError(f"--vsock: cid {cid} is reserved or out of range ({VSOCK_MIN_GUEST_CID}..{VSOCK_MAX_CID - 1})")
    return VsockSpec(cid=cid, path=opts["path"])


def parse_cli_devices(
    *,
    disks: Sequence[str] = (),
    nets: Sequence[str] = (),
    console: str | None = None,
    rng: bool = False,
    vsock: str | None = None,
) -> list[DeviceSpec]:
    """The `microvm run` device options, in slot order: disks, nets, console, rng, vsock."""
    specs: list[DeviceSpec] = [parse_disk(d) for d in disks]
    specs += [parse_net(n) for n in nets]
    if console:
        specs.append(parse_console(console))
    if rng:
        specs.append(RngSpec())
    if vsock:
        specs.append(parse_vsock(vsock))
    return specs
