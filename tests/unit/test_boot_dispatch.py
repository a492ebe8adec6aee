"""vmm.boot.load: format detection order, optional loaders, and the error for unknown images."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from boot_images import Segment, make_bzimage, make_elf, make_pvh_elf

from vmm import layout
from vmm.boot import load
from vmm.boot.types import BootRequest, BootSetup
from vmm.cpustate import CpuState
from vmm.errors import ImageError
from vmm.memory import GuestMemory


@pytest.fixture
def memory():
    mem = GuestMemory([(0, 32 * layout.MiB)])
    yield mem
    mem.close()


def boot(tmp_path: Path, memory, image: bytes, name: str = "kernel"):
    kernel = tmp_path / name
    kernel.write_bytes(image)
    return load(BootRequest(kernel=kernel, memory=memory))


VMLINUX = make_elf([Segment(0x100_0000, b"\x90" * 32)], 0x100_0000)


@pytest.mark.parametrize(
    "image, protocol",
    [
        (make_bzimage(), "linux-bzimage"),
        (make_pvh_elf(), "pvh"),
        (VMLINUX, "linux-elf"),
    ],
)
def test_detects_each_format(tmp_path, memory, image, protocol):
    assert boot(tmp_path, memory, image).protocol == protocol


@pytest.mark.parametrize(
    "image, found",
    [
        (b"MZ\x90\x00" + bytes(600), "4d 5a 90 00"),
        (b"", "an empty file"),
        (make_elf([Segment(0x100_0000, b"\x90")], 0x100_0000, elf64=False, machine=3), "ELF32"),
        (make_elf([Segment(0x100_0000, b"\x90")], 0x100_0000, machine=183), "e_machine 183"),
    ],
)
def test_unknown_images_list_what_was_tried(tmp_path, memory, image, found):
    with pytest.raises(ImageError) as err:
        boot(tmp_path, memory, image, name="mystery.bin")
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "mystery.bin"))
    for fmt in ("Hermit", "multiboot", "PVH", "bzImage", "ELF64 x86-64"):
        assert fmt in msg
    assert found in msg


def test_missing_kernel(tmp_path, memory):
    with pytest.raises(ImageError, match="cannot read kernel"):
        load(BootRequest(kernel=tmp_path / "absent", memory=memory))


def test_truncated_elf_is_an_image_error(tmp_path, memory):
    with pytest.raises(ImageError, match="truncated|past the end"):
        boot(tmp_path, memory, VMLINUX[:100])


def _fake_loader(name: str, marker: bytes, calls: list):
    mod = types.ModuleType(f"vmm.boot.{name}")

    def probe(data: bytes) -> bool:
        calls.append((name, "probe"))
        return data.startswith(marker)

    def load_(request, data):
        calls.append((name, "load"))
        return BootSetup(protocol=name, entry=CpuState(rip=0))

    mod.probe = probe
    mod.load = load_
    return mod


def test_optional_loaders_are_asked_first_in_order(tmp_path, memory, monkeypatch):
    calls: list = []
    mb_magic = b"\x02\xb0\xad\x1b"  # 0x1BADB002, little-endian
    monkeypatch.setitem(sys.modules, "vmm.boot.hermit", _fake_loader("hermit", b"HERMIT", calls))
    monkeypatch.setitem(sys.modules, "vmm.boot.multiboot", _fake_loader("multiboot", b"MB", calls))
    assert boot(tmp_path, memory, b"MB" + mb_magic + b"HERMIT\0").protocol == "multiboot"
    assert calls == [("hermit", "probe"), ("multiboot", "probe"), ("multiboot", "load")]
    calls.clear()
    assert boot(tmp_path, memory, b"HERMIT\0" + mb_magic).protocol == "hermit"
    assert calls == [("hermit", "probe"), ("hermit", "load")]
    calls.clear()
    # Without their byte signatures, the optional loaders are not even imported or asked.
    assert boot(tmp_path, memory, make_bzimage()).protocol == "linux-bzimage"
    assert calls == []


def test_absent_optional_loaders_are_skipped(tmp_path, memory, monkeypatch):
    # None in sys.modules makes the import fail the way a missing module does.
    monkeypatch.setitem(sys.modules, "vmm.boot.hermit", None)
    monkeypatch.setitem(sys.modules, "vmm.boot.multiboot", None)
    assert boot(tmp_path, memory, make_bzimage()).protocol == "linux-bzimage"
