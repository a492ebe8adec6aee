"""Kernel loaders: turn a BootRequest into guest memory contents and an entry state.

``load`` detects the image format, in this order: Hermit, multiboot (both
optional modules: ``vmm.boot.hermit`` and ``vmm.boot.multiboot``, each with
``probe(data) -> bool`` and ``load(request, data) -> BootSetup``), an ELF with
a PVH note, a Linux bzImage, and a 64-bit x86 ELF entered like vmlinux.
Loaders are pure functions over a GuestMemory: no KVM.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ImageError
from .types import BootRequest, BootSetup

__all__ = ["BootRequest", "BootSetup", "load"]

#: What ``load`` tries, in order, for the error message.
FORMATS = ("Hermit", "multiboot", "PVH ELF", "Linux bzImage", "ELF64 x86-64 (vmlinux)")


def _optional(name: str) -> ModuleType | None:
    """Import vmm.boot.<name> if it exists; errors inside an existing module propagate."""
    full = f"{__name__}.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name == full:
            return None
        raise


#: Byte patterns without which an image cannot be of that kind: the Hermit note's owner
#: name, and the multiboot v1 header magic 0x1BADB002 (which must lie in the first 8 KiB).
_QUICK_SIGNS = {
    "hermit": lambda data: b"HERMIT\0" in data,
    "multiboot": lambda data: b"\x02\xb0\xad\x1b" in data[: 8192 + 4],
}


def load(request: BootRequest) -> BootSetup:
    """Load ``request.kernel`` in whatever supported format it is."""
    from . import linux, pvh, setup_header
    from .elf import ELF_MAGIC, EM_X86_64, ElfImage
    from .initrd import read_image

    path = str(request.kernel)
    data = read_image(request.kernel, "kernel")
    for name, maybe in _QUICK_SIGNS.items():
        if not maybe(data):  # cheap pre-check: importing the loader costs start-up time
            continue
        module = _optional(name)
        if module is not None and module.probe(data):
            return module.load(request, data)

    elf = ElfImage(data, path) if data.startswith(ELF_MAGIC) else None
    if elf is not None and pvh.has_pvh_note(elf):
        return pvh.load_pvh(request, elf)
    if setup_header.is_bzimage(data):
        if request.direct_elf:
            return _load_decompressed(request, data, path)
        return linux.load_bzimage(request, data, path)
    if elf is not None and elf.is64 and elf.machine == EM_X86_64:
        return linux.load_vmlinux(request, elf)
    found = data[:8].hex(" ") if data else "an empty file"
    if elf is not None:
        found = f"an ELF{'64' if elf.is64 else '32'} file for e_machine {elf.machine} without a PVH note"
    raise ImageError(path, f"not a kernel image this VMM can boot (tried {', '.join(FORMATS)}); found {found}")


def _load_decompressed(request: BootRequest, data: bytes, path: str) -> BootSetup:
    """bzImage with direct_elf: decompress on the host, enter the ELF (PVH if it can)."""
    from . import decompress, linux, pvh, setup_header
    from .elf import ElfImage

    hdr = setup_header.parse_setup_header(data, path)
    elf_bytes, cache_file = decompress.extract_vmlinux(data, hdr, path, request.cache_dir)
    elf = ElfImage(elf_bytes, f"{path} (decompressed payload {cache_file})")
    limits = linux.KernelLimits.from_header(hdr)
    if pvh.has_pvh_note(elf):
        setup = pvh.load_pvh(request, elf, cmdline_limit=hdr.cmdline_size, cmdline_source=limits.cmdline_source)
    else:
        setup = linux.load_vmlinux(request, elf, limits)
    setup.details.update(
        decompressed_from=path,
        vmlinux_cache=str(cache_file),
        boot_protocol=hdr.version_str,
        kernel_version=hdr.kernel_version,
    )
    return setup
