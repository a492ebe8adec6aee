"""What one microVM should be: options, ini keys and marker arguments merged into a ``VmSpec``.

Precedence, lowest first: built-in defaults, ini keys (``microvm_kernel`` ...),
command-line options (``--microvm-kernel`` ...), the test's
``@pytest.mark.microvm(...)`` marker, then keyword arguments given to
``microvm_factory(...)``.  Everything is validated here, so a bad value fails
with one line naming the option, ini key or marker argument involved.

A kernel is a path, or ``tiny:NAME`` (``tiny:NAME:FORMAT``) for a reference
guest from guests/tiny (built and cached on first use).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_GUEST = "tiny:hello"
DEFAULT_MEM_MIB = 128
DEFAULT_VCPUS = 1
DEFAULT_TIMEOUT = 30.0
BACKENDS = ("kvm", "qemu")
TINY_PREFIX = "tiny:"

#: Linux's panic line, Hermit's panic line ("[0][PANIC] ...").  Searched per console line.
DEFAULT_PANIC_PATTERNS = (
    r"Kernel panic - not syncing",
    r"^\[\d+\]\[PANIC\]",
)

#: Arguments of @pytest.mark.microvm and of microvm_factory().
MARKER_ARGS = (
    "kernel", "initrd", "append", "mem_mib", "vcpus", "timeout", "backend",
    # virtio devices, in `microvm run`'s syntax (vmm/devices/virtio/spec.py)
    "disk", "net", "console", "rng", "vsock",
    # start from a snapshot directory (vmm/snapshot.py) instead of booting the kernel
    "restore",
)
#: Device arguments that take one value or a list of them.
LIST_DEVICE_ARGS = ("disk", "net")


class SpecError(ValueError):
    """A bad option, ini value, marker argument or factory argument (the message names it)."""


@dataclass(frozen=True)
class QemuOptions:
    """How the QEMU backend runs ``qemu-system-x86_64 -M microvm``."""

    binary: str = "qemu-system-x86_64"
    #: ``-cpu`` value; "auto" tries "host" and falls back to "host,-arch-capabilities"
    #: on hosts whose KVM rejects that MSR (measured once per host boot, cached).
    cpu: str = "auto"
    #: Extra arguments appended to the command line.
    extra_args: tuple[str, ...] = ()
    #: Machine options after "microvm," (QEMU's -M microvm,...).
    machine: str = "x-option-roms=off"


@dataclass(frozen=True)
class VmSpec:
    kernel: str
    initrd: str | None = None
    append: str = ""
    mem_mib: int = DEFAULT_MEM_MIB
    vcpus: int = DEFAULT_VCPUS
    #: Seconds the VM may run (from start) before it is ended with reason "timeout".
    timeout: float = DEFAULT_TIMEOUT
    backend: str = "kvm"
    qemu: QemuOptions = field(default_factory=QemuOptions)
    panic_patterns: tuple[str, ...] = DEFAULT_PANIC_PATTERNS
    #: virtio devices (vmm.devices.virtio.spec objects), in slot order.
    devices: tuple[Any, ...] = ()
    #: A snapshot directory to continue instead of booting ``kernel`` (our VMM only).
    restore: str | None = None

    def replace(self, **changes: Any) -> VmSpec:
        return dataclasses.replace(self, **changes)

    @property
    def kernel_name(self) -> str:
        """A short name for test ids: the file name, or tiny:NAME."""
        if self.kernel.startswith(TINY_PREFIX):
            return self.kernel
        return Path(self.kernel).name

    def resolve_kernel(self) -> Path:
        """The kernel's path, building a tiny guest first if needed."""
        return resolve_image(self.kernel, "kernel")


# ---- value parsing ---------------------------------------------------------------------


def parse_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise SpecError(f"{what}: {value!r} is not a positive integer")
    try:
        n = int(value, 0) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise SpecError(f"{what}: {value!r} is not a positive integer") from None
    if isinstance(value, float) and value != n:
        raise SpecError(f"{what}: {value!r} is not a positive integer")
    if n <= 0:
        raise SpecError(f"{what}: {value!r} must be positive")
    return n


def parse_positive_float(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise SpecError(f"{what}: {value!r} is not a number of seconds")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SpecError(f"{what}: {value!r} is not a number of seconds") from None
    if not 0 < v < float("inf"):
        raise SpecError(f"{what}: {value!r} must be a positive, finite number of seconds")
    return v


def parse_backend(value: Any, what: str) -> str:
    if value not in BACKENDS:
        raise SpecError(f"{what}: unknown backend {value!r} (choose from {', '.join(BACKENDS)})")
    return value


def check_image_file(value: str, what: str) -> None:
    """A clear error for a missing or unreadable kernel/initrd (tiny: names are built later)."""
    if value.startswith(TINY_PREFIX):
        parse_tiny(value, what)
        return
    path = Path(value)
    if not path.exists():
        raise SpecError(f"{what}: {path} does not exist")
    if not path.is_file():
        raise SpecError(f"{what}: {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise SpecError(f"{what}: {path} is not readable")


def parse_tiny(value: str, what: str) -> tuple[str, str]:
    rest = value[len(TINY_PREFIX) :]
    name, _, fmt = rest.partition(":")
    if not name:
        raise SpecError(f"{what}: {value!r} names no tiny guest (write tiny:NAME, e.g. tiny:hello)")
    return name, fmt or "pvh"


def resolve_image(value: str, what: str) -> Path:
    if value.startswith(TINY_PREFIX):
        name, fmt = parse_tiny(value, what)
        from vmm.errors import VmmError
        from vmm.guestkit import kit, tiny_guest

        try:
            known = getattr(kit(), "GUESTS", None)
            if known is not None and name not in known:
                raise SpecError(f"{what}: no tiny guest named {name!r} (known: {', '.join(known)})")
            return tiny_guest(name, fmt)
        except (VmmError, KeyError, ValueError) as exc:
            if isinstance(exc, SpecError):
                raise
            raise SpecError(f"{what}: cannot build tiny guest {value!r}: {exc}") from exc
    check_image_file(value, what)
    return Path(value)


def absolutize(value: str | os.PathLike[str] | None, base: Path) -> str | None:
    """Paths relative to ``base``; tiny: names unchanged."""
    if value is None:
        return None
    text = os.fspath(value)
    if text.startswith(TINY_PREFIX) or os.path.isabs(text):
        return text
    return str(base / text)


def apply_overrides(spec: VmSpec, overrides: Mapping[str, Any], what: str, base: Path) -> VmSpec:
    """Validated ``spec`` with marker/factory arguments applied (``what`` names the source)."""
    unknown = sorted(set(overrides) - set(MARKER_ARGS))
    if unknown:
        raise SpecError(
            f"{what}: unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(MARKER_ARGS)})"
        )
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        label = f"{what} {key}="
        if key in ("kernel", "initrd"):
            if value is None:
                if key == "kernel":
                    raise SpecError(f"{label}: a kernel is required")
                changes[key] = None
                continue
            if not isinstance(value, (str, os.PathLike)):
                raise SpecError(f"{label}: {value!r} is not a path")
            path = absolutize(value, base)
            assert path is not None
            check_image_file(path, label)
            changes[key] = path
        elif key == "append":
            if not isinstance(value, str):
                raise SpecError(f"{label}: {value!r} is not a string")
            changes[key] = value
        elif key in ("mem_mib", "vcpus"):
            changes[key] = parse_positive_int(value, label)
        elif key == "timeout":
            changes[key] = parse_positive_float(value, label)
        elif key == "backend":
            changes[key] = parse_backend(value, label)
        elif key == "restore":
            if value is not None and not (base / os.fspath(value)).is_dir():
                raise SpecError(f"{label}: {value!r} is not a snapshot directory")
            changes[key] = None if value is None else str(base / os.fspath(value))
    device_args = {k: overrides[k] for k in ("disk", "net", "console", "rng", "vsock") if k in overrides}
    if device_args:
        changes["devices"] = parse_devices(device_args, what, base)
    return spec.replace(**changes)


def parse_devices(args: Mapping[str, Any], what: str, base: Path) -> tuple[Any, ...]:
    """virtio device specs from marker/factory arguments written like `microvm run`'s options:
    ``disk="img.raw,ro"`` (or a list), ``net="tap=NAME"`` (or a list), ``console="socket=PATH"``,
    ``rng=True``, ``vsock="cid=3,path=PATH"``.  Relative paths are relative to ``base``."""
    from vmm.devices.virtio.spec import parse_cli_devices
    from vmm.errors import ConfigError

    def listed(key: str) -> list[str]:
        value = args.get(key) or []
        items = [value] if isinstance(value, (str, os.PathLike)) else list(value)
        out = []
        for item in items:
            if not isinstance(item, (str, os.PathLike)):
                raise SpecError(f"{what} {key}=: {item!r} is not a string")
            out.append(os.fspath(item))
        return out

    disks = []
    for d in listed("disk"):
        path, sep, rest = d.partition(",")
        disks.append(str(base / path) + sep + rest)
    for key in ("console", "vsock"):
        if args.get(key) is not None and not isinstance(args[key], str):
            raise SpecError(f"{what} {key}=: {args[key]!r} is not a string")
    if not isinstance(args.get("rng", False), bool):
        raise SpecError(f"{what} rng=: {args['rng']!r} is not True or False")
    try:
        return tuple(
            parse_cli_devices(
                disks=disks, nets=listed("net"), console=args.get("console"), rng=args.get("rng", False),
                vsock=args.get("vsock"),
            )
        )
    except ConfigError as exc:
        raise SpecError(f"{what}: {exc}") from None


def split_args(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(shlex.split(value))
    out: list[str] = []
    for item in value:
        out.extend(shlex.split(item))
    return tuple(out)
