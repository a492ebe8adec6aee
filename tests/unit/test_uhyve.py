"""uhyve v1 hypercalls over a GuestMemory: normal use and a hostile guest.

The guest side is played by the test: it writes parameter blocks into guest
memory exactly as the Hermit 0.6.9 kernel lays them out and "executes" the
``out`` through the device's bus interface.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from vmm.bus import Bus
from vmm.devices import RecordingVmControl
from vmm.devices import uhyve as u
from vmm.errors import ConfigError, GuestError
from vmm.exitstatus import ExitReason
from vmm.memory import GuestMemory

MEM = 4 << 20
PML4, PDPT, PD, PT, PD2 = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
PARAMS = 0x10000  # parameter blocks
STRINGS = 0x11000  # paths, argv buffers
BUF_VA = 0x4000_0000  # a guest-virtual buffer, mapped to scattered pages below
BUF_PAGES = (0x30_0000, 0x20_0000, 0x38_0000, 0x21_0000)


class Guest:
    """Guest memory with page tables: identity below 2 MiB, BUF_VA scattered."""

    def __init__(self, fs_root: Path | None = None, argv=("/app", "x"), env=None) -> None:
        self.memory = GuestMemory([(0, MEM)])
        m = self.memory
        m.write_u64(PML4, PDPT | 3)
        m.write_u64(PDPT, PD | 3)
        m.write_u64(PD, 0 | 0x83)  # 0-2 MiB identity, one 2 MiB page
        m.write_u64(PDPT + 8, PD2 | 3)  # BUF_VA (1 GiB) lies in PDPT slot 1
        m.write_u64(PD2, PT | 3)  # ... and is mapped with 4 KiB pages
        for i, phys in enumerate(BUF_PAGES):
            m.write_u64(PT + 8 * i, phys | 3)
        self.console = bytearray()
        self.control = RecordingVmControl()
        self.dev = u.UhyveHypercalls(
            m, self.console.extend, self.control, argv=list(argv), env=env or {}, fs_root=fs_root, root_page_table=PML4
        )

    def call(self, port: int, gpa: int, size: int = 4) -> None:
        self.dev.write(port - u.HYPERCALL_PORT_BASE, size, gpa)

    def cstr(self, s: bytes, at: int = STRINGS) -> int:
        self.memory.write(at, s + b"\0")
        return at

    def open(self, path: bytes, flags: int = 0, mode: int = 0o644) -> int:
        self.memory.write(PARAMS, u.OPEN_PARAMS.pack(self.cstr(path), flags, mode, -1))
        self.call(u.UHYVE_PORT_FILE_OPEN, PARAMS)
        return u.OPEN_PARAMS.unpack(self.memory.read(PARAMS, u.OPEN_PARAMS.size))[3]

    def write(self, fd: int, data: bytes, va: int = BUF_VA) -> int:
        self.put_virtual(va, data)
        self.memory.write(PARAMS, u.WRITE_PARAMS.pack(fd, va, len(data)))
        self.call(u.UHYVE_PORT_FILE_WRITE, PARAMS)
        return u.WRITE_PARAMS.unpack(self.memory.read(PARAMS, u.WRITE_PARAMS.size))[2]

    def read(self, fd: int, length: int, va: int = BUF_VA) -> int:
        self.memory.write(PARAMS, u.READ_PARAMS.pack(fd, va, length, -1))
        self.call(u.UHYVE_PORT_FILE_READ, PARAMS)
        return u.READ_PARAMS.unpack(self.memory.read(PARAMS, u.READ_PARAMS.size))[3]

    def close(self, fd: int) -> int:
        self.memory.write(PARAMS, u.CLOSE_PARAMS.pack(fd, -1))
        self.call(u.UHYVE_PORT_FILE_CLOSE, PARAMS)
        return u.CLOSE_PARAMS.unpack(self.memory.read(PARAMS, 8))[1]

    def lseek(self, fd: int, offset: int, whence: int) -> int:
        self.memory.write(PARAMS, u.LSEEK_PARAMS.pack(fd, offset, whence))
        self.call(u.UHYVE_PORT_FILE_LSEEK, PARAMS)
        return u.LSEEK_PARAMS.unpack(self.memory.read(PARAMS, u.LSEEK_PARAMS.size))[1]

    def unlink(self, path: bytes) -> int:
        self.memory.write(PARAMS, u.UNLINK_PARAMS.pack(self.cstr(path), -1))
        self.call(u.UHYVE_PORT_FILE_UNLINK, PARAMS)
        return u.UNLINK_PARAMS.unpack(self.memory.read(PARAMS, u.UNLINK_PARAMS.size))[1]

    def put_virtual(self, va: int, data: bytes) -> None:
        for i in range(len(data)):
            off = va - BUF_VA + i
            self.memory.write_u8(BUF_PAGES[off // 4096] + off % 4096, data[i])

    def get_virtual(self, va: int, n: int) -> bytes:
        out = bytearray()
        for i in range(n):
            off = va - BUF_VA + i
            out.append(self.memory.read_u8(BUF_PAGES[off // 4096] + off % 4096))
        return bytes(out)

    @property
    def errors(self) -> int:
        return self.dev.stats.errors

    @property
    def last_error(self) -> str:
        return self.dev.stats.last_error or ""


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"host secret")
    return r


# ---- console, exit, argv/env ----------------------------------------------------------


def test_uart_bytes_reach_the_console():
    g = Guest()
    for b in b"Hi\n":
        g.call(u.UHYVE_PORT_UART, b, size=1)
    assert bytes(g.console) == b"Hi\n"
    assert g.dev.stats.calls["Uart"] == 3 and g.errors == 0


def test_stdout_write_uses_virtual_addresses_across_scattered_pages():
    g = Guest()
    data = bytes(range(256)) * 40  # 10 KiB: spans three non-contiguous pages
    assert g.write(1, data, va=BUF_VA + 100) == len(data)
    assert bytes(g.console) == data


def test_exit_ends_the_vm_with_the_guest_code():
    g = Guest()
    g.memory.write(PARAMS, struct.pack("<i", -3))
    g.call(u.UHYVE_PORT_EXIT, PARAMS)
    assert g.control.exits[0][:2] == (ExitReason.GUEST_EXIT, -3)


def test_exit_with_parameters_outside_memory_is_a_vmm_error_naming_the_address():
    g = Guest()
    g.call(u.UHYVE_PORT_EXIT, 0xFFFF_FFF0)
    (reason, code, detail) = g.control.exits[0]
    assert reason is ExitReason.VMM_ERROR and code is None
    assert "0x540" in detail and "0xfffffff0" in detail
    assert g.errors == 1


def test_cmdsize_and_cmdval_copy_argv_and_env():
    g = Guest(argv=["/app", "-v", "a b"], env={"HOME": "/root", "X": ""})
    g.call(u.UHYVE_PORT_CMDSIZE, PARAMS)
    fields = u.CMDSIZE_PARAMS.unpack(g.memory.read(PARAMS, u.CMDSIZE_PARAMS.size))
    argc, argsz, envc, envsz = fields[0], fields[1:129], fields[129], fields[130:]
    assert (argc, argsz[:4]) == (3, (5, 3, 4, 0))
    assert (envc, envsz[:3]) == (2, (11, 3, 0))
    # The guest allocates buffers of those sizes and passes their addresses.
    argv_ptrs, envp_ptrs = 0x12000, 0x12100
    dests = [0x13000 + 0x100 * i for i in range(5)]
    g.memory.write(argv_ptrs, struct.pack("<3Q", *dests[:3]))
    g.memory.write(envp_ptrs, struct.pack("<2Q", *dests[3:]))
    g.memory.write(PARAMS, u.CMDVAL_PARAMS.pack(argv_ptrs, envp_ptrs))
    g.call(u.UHYVE_PORT_CMDVAL, PARAMS)
    got = [g.memory.read(d, n) for d, n in zip(dests, (5, 3, 4, 11, 3))]
    assert got == [b"/app\0", b"-v\0", b"a b\0", b"HOME=/root\0", b"X=\0"]
    assert g.errors == 0


def test_cmdval_with_hostile_pointers_is_counted():
    g = Guest(argv=["/app", "arg"])
    g.memory.write(0x12000, struct.pack("<2Q", 0x13000, MEM - 2))  # second string would cross the end
    g.memory.write(PARAMS, u.CMDVAL_PARAMS.pack(0x12000, 0))
    g.call(u.UHYVE_PORT_CMDVAL, PARAMS)
    assert g.errors == 1 and "argv[1]" in g.last_error
    g.memory.write(PARAMS, u.CMDVAL_PARAMS.pack(2**64 - 8, 0))
    g.call(u.UHYVE_PORT_CMDVAL, PARAMS)  # the pointer array itself is outside memory
    assert g.errors == 2


def test_too_many_arguments_is_a_config_error():
    with pytest.raises(ConfigError, match="128"):
        Guest(argv=["a"] * 129)


# ---- hostile hypercalls ------------------------------------------------------------------


@pytest.mark.parametrize("port", [0x640, 0x404, 0x8C0, 0x8FF])
def test_unknown_ports_are_counted_and_ignored(port):
    g = Guest()
    g.call(port, 0x1234)
    assert g.errors == 1
    assert f"unknown hypercall port {port:#x}" in g.last_error and "0x1234" in g.last_error
    assert not g.control.exits and not g.console


def test_reads_from_hypercall_ports_are_counted():
    g = Guest()
    assert g.dev.read(u.UHYVE_PORT_EXIT - u.HYPERCALL_PORT_BASE, 4) == 0xFFFFFFFF
    assert g.errors == 1 and "0x540" in g.last_error


@pytest.mark.parametrize("port", sorted(set(u.PORT_NAMES) - {u.UHYVE_PORT_UART}))
def test_parameter_blocks_outside_memory_never_crash(port):
    g = Guest()
    for gpa in (MEM - 2, 0xFFFF_FFFF, 0xC000_0000):
        g.call(port, gpa)
    assert g.errors == 3
    assert f"port {port:#x}" in g.last_error and "0xc0000000" in g.last_error


def test_serial_buffer_write_is_bounded():
    g = Guest()
    g.memory.write(0x15000, b"buffered")
    g.memory.write(PARAMS, u.SERIAL_WRITE_BUFFER_PARAMS.pack(0x15000, 8))
    g.call(u.UHYVE_PORT_SERIAL_BUFFER_WRITE, PARAMS)
    assert bytes(g.console) == b"buffered"
    g.memory.write(PARAMS, u.SERIAL_WRITE_BUFFER_PARAMS.pack(0, 2**64 - 1))
    g.call(u.UHYVE_PORT_SERIAL_BUFFER_WRITE, PARAMS)
    assert len(g.console) == 8 + u.MAX_IO_CHUNK  # truncated to the bound, not 16 EiB
    assert g.errors == 1 and "truncated" in g.last_error


def test_write_with_unmapped_or_huge_buffer():
    g = Guest()
    g.memory.write(PARAMS, u.WRITE_PARAMS.pack(1, 0x7000_0000, 16))  # not mapped
    g.call(u.UHYVE_PORT_FILE_WRITE, PARAMS)
    assert g.errors == 1 and "not mapped" in g.last_error
    assert u.WRITE_PARAMS.unpack(g.memory.read(PARAMS, 20))[2] == 0
    g.memory.write(PARAMS, u.WRITE_PARAMS.pack(1, 0x1F_F000, 2**64 - 1))  # mapped start, far too long
    g.call(u.UHYVE_PORT_FILE_WRITE, PARAMS)
    assert g.errors == 2 and not g.console  # 0x200000 and up is not mapped: nothing written
    g.memory.write(PARAMS, u.WRITE_PARAMS.pack(1, 0x10_0000, 2**64 - 1))
    g.call(u.UHYVE_PORT_FILE_WRITE, PARAMS)  # all mapped: one bounded chunk goes out
    assert len(g.console) == u.MAX_IO_CHUNK
    assert u.WRITE_PARAMS.unpack(g.memory.read(PARAMS, 20))[2] == u.MAX_IO_CHUNK
    g.memory.write(PARAMS, u.WRITE_PARAMS.pack(1, 0xFFFF_0000_0000_0000 - 4096, 8))  # non-canonical
    g.call(u.UHYVE_PORT_FILE_WRITE, PARAMS)
    assert "not canonical" in g.last_error


def test_page_tables_pointing_outside_memory():
    g = Guest()
    g.memory.write_u64(PDPT + 16, 0xDEAD_0000_0000 | 3)  # PDPT slot 2 -> nowhere
    with pytest.raises(GuestError, match="outside guest memory"):
        u.translate(g.memory, PML4, 2 << 30)


# ---- files ----------------------------------------------------------------------------------


def test_without_a_mapped_directory_every_open_fails_with_enoent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = Guest(fs_root=None)
    assert g.open(b"new.txt", u.O_CREAT | u.O_WRONLY) == -u.ENOENT
    assert g.open(b"../../etc/passwd") == -u.ENOENT
    assert list(tmp_path.iterdir()) == []
    assert g.unlink(b"x") == -u.ENOENT


def test_file_roundtrip_inside_the_root(root):
    g = Guest(fs_root=root)
    fd = g.open(b"dir/f.txt", u.O_CREAT | u.O_RDWR)
    assert fd == -u.ENOENT  # the directory does not exist
    (root / "dir").mkdir()
    fd = g.open(b"dir/f.txt", u.O_CREAT | u.O_RDWR, 0o4777)
    assert fd == 3
    assert g.write(fd, b"hello hermit") == 12
    assert (root / "dir" / "f.txt").read_bytes() == b"hello hermit"
    assert (root / "dir" / "f.txt").stat().st_mode & 0o7000 == 0  # no setuid from the guest
    assert g.lseek(fd, 6, u.SEEK_SET) == 6
    assert g.read(fd, 100, va=BUF_VA + 4090) == 6  # lands across a page boundary
    assert g.get_virtual(BUF_VA + 4090, 6) == b"hermit"
    assert g.lseek(fd, 0, 7) == -1
    assert g.close(fd) == 0
    assert g.close(fd) == -u.EBADF
    assert g.unlink(b"dir/f.txt") == 0
    assert not (root / "dir" / "f.txt").exists()
    assert g.open(b"dir", u.O_DIRECTORY | u.O_CREAT) == -u.EINVAL


@pytest.mark.parametrize("path", [b"/etc/passwd", b"../outside/secret", b"dir/../../outside/secret", b"..", b"/"])
def test_path_escapes_are_refused(root, path):
    (root / "dir").mkdir()
    g = Guest(fs_root=root)
    assert g.open(path) == -u.EACCES
    assert g.errors == 1 and "refused" in g.last_error
    assert g.unlink(path) in (-u.EACCES, -u.EINVAL)
    assert (root.parent / "outside" / "secret").read_bytes() == b"host secret"


def test_symlinks_leaving_the_root_are_refused(root):
    outside = root.parent / "outside"
    (root / "link").symlink_to(outside / "secret")
    (root / "dirlink").symlink_to(outside)
    (root / "newlink").symlink_to(outside / "created")
    g = Guest(fs_root=root)
    assert g.open(b"link") == -u.EACCES
    assert g.open(b"dirlink/secret") == -u.EACCES
    assert g.open(b"newlink", u.O_CREAT | u.O_WRONLY) == -u.EACCES
    assert g.unlink(b"dirlink/secret") == -u.EACCES
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_bytes() == b"host secret"
    assert g.errors == 4


def test_symlinks_inside_the_root_work_where_the_host_can_confine_them(root):
    (root / "real").write_bytes(b"inside")
    (root / "alias").symlink_to("real")
    g = Guest(fs_root=root)
    fd = g.open(b"alias")
    if u._openat2_works is False:  # no openat2: no symlink is followed at all
        assert fd == -u.EACCES
    else:
        assert fd == 3 and g.read(fd, 6) == 6 and g.get_virtual(BUF_VA, 6) == b"inside"


def test_special_files_are_refused_without_blocking(root):
    os.mkfifo(root / "fifo")
    g = Guest(fs_root=root)
    assert g.open(b"fifo") == -u.EACCES
    assert "not a regular file" in g.last_error


def test_open_file_limit(root):
    (root / "f").write_bytes(b"")
    g = Guest(fs_root=root)
    fds = [g.open(b"f") for _ in range(u.MAX_OPEN_FILES)]
    assert fds == list(range(3, 3 + u.MAX_OPEN_FILES))
    assert g.open(b"f") == -u.EMFILE
    g.dev.close()
    assert g.dev.open_files == 0


def test_huge_read_is_bounded_and_bad_buffers_leave_the_file_alone(root):
    (root / "f").write_bytes(b"x" * 100)
    g = Guest(fs_root=root)
    fd = g.open(b"f")
    assert g.read(fd, 2**63, va=0x1000_0000) == -u.EFAULT  # unmapped buffer
    assert g.lseek(fd, 0, u.SEEK_CUR) == 0  # nothing was consumed
    assert g.read(fd, 2**63) == -u.EFAULT  # 16 KiB mapped, MAX_IO_CHUNK requested
    assert g.read(fd, 4 * 4096) == 100


def test_unterminated_path_is_refused(root):
    g = Guest(fs_root=root)
    g.memory.fill(MEM - 100, 100, ord("a"))
    g.memory.write(PARAMS, u.OPEN_PARAMS.pack(MEM - 100, 0, 0, -1))
    g.call(u.UHYVE_PORT_FILE_OPEN, PARAMS)
    assert u.OPEN_PARAMS.unpack(g.memory.read(PARAMS, 20))[3] == -u.EFAULT
    g.memory.fill(STRINGS, u.PATH_MAX + 10, ord("b"))
    g.memory.write(PARAMS, u.OPEN_PARAMS.pack(STRINGS, 0, 0, -1))
    g.call(u.UHYVE_PORT_FILE_OPEN, PARAMS)
    assert u.OPEN_PARAMS.unpack(g.memory.read(PARAMS, 20))[3] == -u.ENAMETOOLONG
    assert g.errors == 2


def test_stdio_fds():
    g = Guest()
    assert g.close(0) == 0 and g.close(2) == 0
    assert g.read(0, 10) == 0
    assert g.write(2, b"err") == 3 and bytes(g.console) == b"err"
    assert g.write(7, b"nope") == 0 and "unknown fd 7" in g.last_error


# ---- attaching to a machine ---------------------------------------------------------------


def test_attach_registers_the_port_window_and_fills_cpu_freq():
    memory = GuestMemory([(0, MEM)])
    out = bytearray()
    machine = SimpleNamespace(
        memory=memory, pio_bus=Bus("pio"), control=RecordingVmControl(), serial_sink=out.extend, devices={}
    )
    dev = u.attach_uhyve(
        machine, argv=["/k"], env={}, fs_root=None, boot_info_addr=0x5000, root_page_table=PML4, tsc_khz=2_400_000
    )
    assert machine.devices["uhyve"] is dev
    machine.pio_bus.write(u.UHYVE_PORT_UART, 1, ord("!"))
    assert bytes(out) == b"!"
    machine.pio_bus.write(0x8F0, 4, 0)
    assert dev.stats.errors == 1 and machine.pio_bus.stats.unhandled_writes == 0
    machine.pio_bus.write(0x900, 4, 0)  # past the window: the bus's own accounting
    assert machine.pio_bus.stats.unhandled_writes == 1
    from vmm.boot.hermit import BOOT_INFO_CPU_FREQ_OFFSET

    assert memory.read_u32(0x5000 + BOOT_INFO_CPU_FREQ_OFFSET) == 2_400_000
    assert dev.metrics()["calls"] == {"Uart": 1} and dev.metrics()["errors"] == 1


def test_component_walk_fallback_follows_no_symlink(root, monkeypatch):
    """Hosts without openat2: the walk with O_NOFOLLOW confines just as well."""
    monkeypatch.setattr(u, "_openat2_works", False)
    outside = root.parent / "outside"
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"data")
    (root / "link").symlink_to(outside / "secret")
    (root / "dirlink").symlink_to(outside)
    (root / "alias").symlink_to("d/f")
    g = Guest(fs_root=root)
    fd = g.open(b"d/f")
    assert fd == 3 and g.read(fd, 4) == 4 and g.get_virtual(BUF_VA, 4) == b"data"
    assert g.open(b"link") == -u.EACCES
    assert g.open(b"dirlink/secret") == -u.EACCES
    assert g.open(b"dirlink/new", u.O_CREAT | u.O_WRONLY) == -u.EACCES
    assert g.open(b"alias") == -u.EACCES
    assert g.open(b"./d/./f") == 4
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
