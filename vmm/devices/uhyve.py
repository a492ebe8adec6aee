"""uhyve's port-I/O hypercalls (uhyve-interface version 1), for Hermit guests.

A Hermit kernel running "on uhyve" asks the host for services by writing,
with one ``out`` instruction, the 32-bit guest-physical address of a
parameter block to a port that names the hypercall.  The host reads the
block, does the work and writes results back into it.  The exception is the
UART port, where the byte written is the character itself.

Reference: uhyve-interface (hermit-os/uhyve, ``uhyve-interface/src/v1``:
``HypercallAddress`` and the ``#[repr(C, packed)]`` parameter structs) and
uhyve's ``src/hypercall/mod.rs`` (how each call is served), at commit
9bcf90fb; the Hermit 0.6.9 kernel's ``fs/uhyve.rs``, ``fd/stdio.rs`` and
``syscalls/interfaces/uhyve.rs`` (what it sends).  Errno values are
hermit-abi's, which are Linux's numbers.

Safety rules, beyond uhyve's behaviour:
- Every guest access goes through ``GuestMemory``; parameter blocks and
  buffers outside guest RAM are errors, never crashes.  ``FileRead`` and
  ``FileWrite`` buffers are guest-*virtual* addresses in v1; they are
  translated page by page through the guest's page tables (uhyve assumes
  the buffer is physically contiguous).
- Lengths are bounded (``MAX_IO_CHUNK`` per read/write call, ``PATH_MAX``
  for paths, ``MAX_OPEN_FILES`` descriptors).
- Files are opened only beneath the directory the user maps
  (``hermit_fs_root``).  Absolute paths and ``..`` components are refused;
  symlinks are resolved by the host kernel with ``RESOLVE_BENEATH`` so none
  can leave the root (without openat2, no symlink is followed at all).
  Only regular files and directories may be opened (a FIFO would block a
  vCPU thread).  With no root mapped, every open fails with ENOENT, the
  errno uhyve returns for a path outside its file map.
- A malformed or unknown hypercall is counted in ``stats`` with a one-line
  message naming the port and the guest address, and the guest carries on,
  as uhyve does for unknown ports.  The one exception is an exit hypercall
  whose parameter block cannot be read: the guest asked to stop, so the VM
  ends with ``VMM_ERROR`` and that message.

Differences from uhyve, kept on purpose: ``FileWrite`` writes the number of
bytes actually written back into the block's ``len`` field (the kernel
returns that field as its result, so short and failed writes become
visible); ``Cmdsize`` counts the configured environment, not the host's;
``Cmdval`` puts the program path in ``argv[0]`` and the arguments after it
without overwriting it; reading stdin returns end-of-file.
"""

from __future__ import annotations

import ctypes
import errno as host_errno
import os
import stat
import struct
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, GuestError, GuestMemoryError
from ..exitstatus import ExitReason
from ..memory import GuestMemory
from . import VmControl

# ---- ports (uhyve-interface v1 HypercallAddress) --------------------------------
UHYVE_PORT_FILE_WRITE = 0x400
UHYVE_PORT_FILE_OPEN = 0x440
UHYVE_PORT_FILE_CLOSE = 0x480
UHYVE_PORT_FILE_READ = 0x500
UHYVE_PORT_EXIT = 0x540
UHYVE_PORT_FILE_LSEEK = 0x580
UHYVE_PORT_NETWRITE = 0x640  # deprecated, "never really in use": unknown here, as in uhyve
UHYVE_PORT_NETREAD = 0x680
UHYVE_PORT_NETSTAT = 0x700
UHYVE_PORT_CMDSIZE = 0x740
UHYVE_PORT_CMDVAL = 0x780
UHYVE_PORT_UART = 0x800
UHYVE_PORT_FILE_UNLINK = 0x840
UHYVE_PORT_SERIAL_BUFFER_WRITE = 0x880
#: The port window this device claims: every v1 hypercall port lies in it,
#: so writes to its unused ports are reported as unknown hypercalls.
HYPERCALL_PORT_BASE = 0x400
HYPERCALL_PORT_WINDOW = 0x500

PORT_NAMES = {
    UHYVE_PORT_FILE_WRITE: "FileWrite",
    UHYVE_PORT_FILE_OPEN: "FileOpen",
    UHYVE_PORT_FILE_CLOSE: "FileClose",
    UHYVE_PORT_FILE_READ: "FileRead",
    UHYVE_PORT_EXIT: "Exit",
    UHYVE_PORT_FILE_LSEEK: "FileLseek",
    UHYVE_PORT_CMDSIZE: "Cmdsize",
    UHYVE_PORT_CMDVAL: "Cmdval",
    UHYVE_PORT_UART: "Uart",
    UHYVE_PORT_FILE_UNLINK: "FileUnlink",
    UHYVE_PORT_SERIAL_BUFFER_WRITE: "SerialBufferWrite",
}

# ---- parameter blocks (uhyve-interface v1 parameters.rs, repr(C, packed)) --------
WRITE_PARAMS = struct.Struct("<iQQ")  # fd, buf (guest-virtual), len
OPEN_PARAMS = struct.Struct("<Qiii")  # name (guest-physical), flags, mode, ret
OPEN_RET_OFFSET = 16
CLOSE_PARAMS = struct.Struct("<ii")  # fd, ret
READ_PARAMS = struct.Struct("<iQQq")  # fd, buf (guest-virtual), len, ret
EXIT_PARAMS = struct.Struct("<i")  # arg
LSEEK_PARAMS = struct.Struct("<iqi")  # fd, offset (in: offset, out: result), whence
UNLINK_PARAMS = struct.Struct("<Qi")  # name (guest-physical), ret
SERIAL_WRITE_BUFFER_PARAMS = struct.Struct("<QQ")  # buf (guest-physical), len
CMDVAL_PARAMS = struct.Struct("<QQ")  # argv, envp: guest-physical arrays of guest-physical pointers
#: ``MAX_ARGC_ENVC``: the fixed size of Cmdsize's argsz and envsz arrays.
MAX_ARGC_ENVC = 128
CMDSIZE_PARAMS = struct.Struct(f"<i{MAX_ARGC_ENVC}ii{MAX_ARGC_ENVC}i")

# ---- hermit-abi values (Linux numbers) -------------------------------------------
EPERM, ENOENT, EIO, EBADF = 1, 2, 5, 9
EACCES, EFAULT, EINVAL, EMFILE, ENAMETOOLONG = 13, 14, 22, 24, 36
O_ACCMODE = 0o3
O_RDONLY, O_WRONLY, O_RDWR = 0, 1, 2
O_CREAT, O_EXCL, O_TRUNC, O_APPEND, O_DIRECTORY = 0o100, 0o200, 0o1000, 0o2000, 0o200000
#: uhyve-interface ALLOWED_OPEN_FLAGS; other bits are dropped, as uhyve does.
ALLOWED_OPEN_FLAGS = O_ACCMODE | O_CREAT | O_EXCL | O_TRUNC | O_APPEND | O_DIRECTORY
SEEK_SET, SEEK_CUR, SEEK_END = 0, 1, 2
STDIN_FILENO, STDOUT_FILENO, STDERR_FILENO = 0, 1, 2

# ---- bounds ---------------------------------------------------------------------
PATH_MAX = 4096
MAX_IO_CHUNK = 1 << 20
MAX_OPEN_FILES = 64
MAX_ERROR_LOG = 32

# ---- page walk (Intel SDM Vol. 3A §4.5, 4-level paging) -------------------------
PTE_PRESENT = 1 << 0
PTE_PS = 1 << 7
PTE_ADDR_MASK = 0x000F_FFFF_FFFF_F000
PAGE_SIZE = 0x1000


class _Fault(GuestError):
    """A hypercall problem to count; ``errno`` is what the guest gets where it can."""

    def __init__(self, message: str, errno_: int = EINVAL) -> None:
        super().__init__(message)
        self.errno = errno_


def translate(memory: GuestMemory, cr3: int, vaddr: int) -> int:
    """Guest-virtual to guest-physical through 4-level page tables rooted at ``cr3``."""
    vaddr &= (1 << 64) - 1
    top = vaddr >> 47
    if top not in (0, (1 << 17) - 1):
        raise _Fault(f"guest-virtual address {vaddr:#x} is not canonical", EFAULT)
    table = cr3 & PTE_ADDR_MASK
    for level, shift in enumerate((39, 30, 21, 12)):
        index = (vaddr >> shift) & 0x1FF
        try:
            entry = memory.read_u64(table + index * 8)
        except GuestMemoryError:
            raise _Fault(
                f"page table at {table:#x} for guest-virtual {vaddr:#x} is outside guest memory", EFAULT
            ) from None
        if not entry & PTE_PRESENT:
            raise _Fault(f"guest-virtual address {vaddr:#x} is not mapped", EFAULT)
        if level in (1, 2) and entry & PTE_PS:
            page = 1 << shift
            return (entry & PTE_ADDR_MASK & ~(page - 1)) | (vaddr & (page - 1))
        table = entry & PTE_ADDR_MASK
    return table | (vaddr & (PAGE_SIZE - 1))


# ---- host file access beneath a root -----------------------------------------------
_SYS_OPENAT2 = 437  # x86-64
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = None
_openat2_works: bool | None = None


def _openat2(dir_fd: int, path: str, flags: int, mode: int) -> int:
    """openat2(RESOLVE_BENEATH): the host kernel keeps resolution inside dir_fd."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    how = _OpenHow(flags, mode, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return fd


def open_beneath(root_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """Open ``path`` (relative, no ``..``) beneath ``root_fd``; OSError on failure.

    Uses openat2 with RESOLVE_BENEATH where the host has it (symlinks that
    stay inside the root work, escaping ones fail with EXDEV); otherwise walks
    the components with O_NOFOLLOW, so no symlink is followed at all.
    """
    global _openat2_works
    flags |= os.O_CLOEXEC if flags & os.O_PATH else os.O_CLOEXEC | os.O_NOCTTY
    if not flags & os.O_CREAT:
        mode = 0  # openat2 refuses a mode without O_CREAT
    if _openat2_works is not False:
        try:
            fd = _openat2(root_fd, path, flags, mode)
            _openat2_works = True
            return fd
        except OSError as exc:
            if exc.errno not in (host_errno.ENOSYS, host_errno.EPERM) or _openat2_works:
                raise
            _openat2_works = False  # no openat2 (or seccomp forbids it)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        return os.open(".", flags | os.O_NOFOLLOW, mode, dir_fd=root_fd)
    dir_fd = root_fd
    opened: list[int] = []
    try:
        for part in parts[:-1]:
            try:
                dir_fd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except NotADirectoryError:
                if stat.S_ISLNK(os.stat(part, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    raise OSError(host_errno.ELOOP, "symlink in path", path) from None
                raise
            opened.append(dir_fd)
        return os.open(parts[-1], flags | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
    finally:
        for fd in opened:
            os.close(fd)


def check_guest_path(path: str) -> None:
    """Refuse paths that name something outside the mapped directory."""
    if not path:
        raise _Fault("empty path", ENOENT)
    if path.startswith("/"):
        raise _Fault(f"absolute path {path!r} refused: paths are relative to the mapped directory", EACCES)
    if any(part == ".." for part in path.split("/")):
        raise _Fault(f"path {path!r} refused: '..' components are not allowed", EACCES)


@dataclass
class UhyveStats:
    """Counters for summaries and tests."""

    calls: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    #: The last MAX_ERROR_LOG error messages (one line each).
    error_log: deque = field(default_factory=lambda: deque(maxlen=MAX_ERROR_LOG))
    console_bytes: int = 0

    @property
    def last_error(self) -> str | None:
        return self.error_log[-1] if self.error_log else None


def _close_all(fds: dict[int, int], root: list[int]) -> None:
    for fd in list(fds.values()):
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
    for fd in root:
        try:
            os.close(fd)
        except OSError:
            pass
    root.clear()


class UhyveHypercalls:
    """The v1 hypercall ports, as one port-I/O bus device at HYPERCALL_PORT_BASE."""

    def __init__(
        self,
        memory: GuestMemory,
        console: Callable[[bytes], None],
        control: VmControl,
        *,
        argv: list[str],
        env: dict[str, str] | None = None,
        fs_root: str | Path | None = None,
        root_page_table: int | Callable[[], int] = 0,
    ) -> None:
        self.memory = memory
        self.console = console
        self.control = control
        self._cr3 = root_page_table if callable(root_page_table) else (lambda v=root_page_table: v)
        self.argv = [a.encode() for a in argv]
        env = dict(env or {})
        self.env = [f"{k}={v}".encode() for k, v in env.items()]
        for what, items in (("argument", self.argv), ("environment variable", self.env)):
            if len(items) > MAX_ARGC_ENVC:
                raise ConfigError(f"cmdline/env: {len(items)} {what}s, more than uhyve's {MAX_ARGC_ENVC}")
            for item in items:
                if b"\0" in item:
                    raise ConfigError(f"cmdline/env: {what} {item!r} contains a NUL byte")
                if len(item) + 1 > 0x7FFF_FFFF:
                    raise ConfigError(f"cmdline/env: {what} is too long")
        for key in env:
            if not key or "=" in key:
                raise ConfigError(f"env: invalid variable name {key!r}")
        self.stats = UhyveStats()
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}
        self._root: list[int] = []
        if fs_root is not None:
            try:
                self._root.append(os.open(os.fspath(fs_root), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            except OSError as exc:
                raise ConfigError(f"hermit_fs_root: cannot open directory {fs_root}: {exc.strerror}") from None
        self._finalizer = weakref.finalize(self, _close_all, self._fds, self._root)
        self._handlers: dict[int, Callable[[int], None]] = {
            UHYVE_PORT_FILE_WRITE: self._file_write,
            UHYVE_PORT_FILE_OPEN: self._file_open,
            UHYVE_PORT_FILE_CLOSE: self._file_close,
            UHYVE_PORT_FILE_READ: self._file_read,
            UHYVE_PORT_EXIT: self._exit,
            UHYVE_PORT_FILE_LSEEK: self._file_lseek,
            UHYVE_PORT_CMDSIZE: self._cmdsize,
            UHYVE_PORT_CMDVAL: self._cmdval,
            UHYVE_PORT_UART: self._uart,
            UHYVE_PORT_FILE_UNLINK: self._file_unlink,
            UHYVE_PORT_SERIAL_BUFFER_WRITE: self._serial_buffer_write,
        }

    # ---- lifecycle --------------------------------------------------------
    def close(self) -> None:
        """Close every host file the guest opened, and the root directory."""
        with self._lock:
            self._finalizer()

    @property
    def open_files(self) -> int:
        return len(self._fds)

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": dict(self.stats.calls),
                "errors": self.stats.errors,
                "last_error": self.stats.last_error,
                "console_bytes": self.stats.console_bytes,
                "open_files": len(self._fds),
            }

    # ---- bus protocol -----------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        port = HYPERCALL_PORT_BASE + offset
        with self._lock:
            self._note_error(
                f"uhyve: guest read {size} byte(s) from hypercall port {port:#x}; hypercall ports are write-only"
            )
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        port = HYPERCALL_PORT_BASE + offset
        handler = self._handlers.get(port)
        with self._lock:
            if handler is None:
                self._note_error(
                    f"uhyve: unknown hypercall port {port:#x} (guest wrote {value:#x}, parameter address {value & 0xFFFFFFFF:#x}); ignored"
                )
                return
            name = PORT_NAMES[port]
            self.stats.calls[name] = self.stats.calls.get(name, 0) + 1
            # v1 passes a 32-bit guest-physical address (uhyve reads the u32 written).
            arg = value & 0xFFFFFFFF
            try:
                handler(arg)
            except _Fault as exc:
                self._note_error(f"uhyve {name} hypercall (port {port:#x}, parameter block at {arg:#x}): {exc}")
            except GuestMemoryError as exc:
                self._note_error(f"uhyve {name} hypercall (port {port:#x}, parameter block at {arg:#x}): {exc}")
                if port == UHYVE_PORT_EXIT:
                    self.control.request_exit(
                        ExitReason.VMM_ERROR,
                        None,
                        f"uhyve Exit hypercall (port {port:#x}): parameter block at {arg:#x} is outside guest memory",
                    )
            except Exception as exc:
                self._note_error(
                    f"uhyve {name} hypercall (port {port:#x}, parameter block at {arg:#x}): internal error {type(exc).__name__}: {exc}"
                )

    def _note_error(self, message: str) -> None:
        self.stats.errors += 1
        self.stats.error_log.append(message)

    # ---- helpers --------------------------------------------------------------
    def _read_block(self, gpa: int, st: struct.Struct) -> tuple:
        return st.unpack(self.memory.read(gpa, st.size))

    def _write_field(self, gpa: int, st: struct.Struct, values: tuple) -> None:
        self.memory.write(gpa, st.pack(*values))

    def _guest_string(self, gpa: int) -> str:
        """A NUL-terminated UTF-8 string at a guest-physical address, at most PATH_MAX bytes."""
        data = bytearray()
        while len(data) < PATH_MAX:
            chunk_len = min(PAGE_SIZE - (gpa + len(data)) % PAGE_SIZE, PATH_MAX - len(data))
            try:
                chunk = self.memory.read(gpa + len(data), chunk_len)
            except GuestMemoryError:
                raise _Fault(f"path at {gpa:#x} runs outside guest memory", EFAULT) from None
            nul = chunk.find(b"\0")
            if nul >= 0:
                data += chunk[:nul]
                try:
                    return data.decode()
                except UnicodeDecodeError:
                    raise _Fault(f"path at {gpa:#x} is not UTF-8", EINVAL) from None
            data += chunk
        raise _Fault(f"path at {gpa:#x} has no NUL within {PATH_MAX} bytes", ENAMETOOLONG)

    def _virtual_pieces(self, vaddr: int, length: int) -> list[tuple[int, int]]:
        """(gpa, len) pieces of a guest-virtual buffer, every page translated and checked."""
        cr3 = self._cr3()
        pieces: list[tuple[int, int]] = []
        done = 0
        while done < length:
            va = (vaddr + done) & ((1 << 64) - 1)
            n = min(PAGE_SIZE - va % PAGE_SIZE, length - done)
            gpa = translate(self.memory, cr3, va)
            if not self.memory.contains(gpa, n):
                raise _Fault(f"buffer page at guest-virtual {va:#x} maps to {gpa:#x}, outside guest memory", EFAULT)
            if pieces and pieces[-1][0] + pieces[-1][1] == gpa:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + n)
            else:
                pieces.append((gpa, n))
            done += n
        return pieces

    def _emit(self, data: bytes) -> None:
        self.stats.console_bytes += len(data)
        self.console(data)

    def _new_fd(self, host_fd: int) -> int:
        for guest_fd in range(3, 3 + MAX_OPEN_FILES):
            if guest_fd not in self._fds:
                self._fds[guest_fd] = host_fd
                return guest_fd
        os.close(host_fd)
        raise _Fault(f"more than {MAX_OPEN_FILES} files open", EMFILE)

    # ---- hypercalls -------------------------------------------------------------
    def _uart(self, value: int) -> None:
        self._emit(bytes([value & 0xFF]))

    def _serial_buffer_write(self, gpa: int) -> None:
        buf, length = self._read_block(gpa, SERIAL_WRITE_BUFFER_PARAMS)
        if length > MAX_IO_CHUNK:
            self._note_error(f"uhyve SerialBufferWrite: length {length:#x} exceeds {MAX_IO_CHUNK:#x}; truncated")
            length = MAX_IO_CHUNK
        try:
            data = self.memory.read(buf, length)
        except GuestMemoryError:
            raise _Fault(f"buffer {buf:#x}+{length:#x} is outside guest memory", EFAULT) from None
        self._emit(data)

    def _exit(self, gpa: int) -> None:
        (code,) = self._read_block(gpa, EXIT_PARAMS)
        self.control.request_exit(ExitReason.GUEST_EXIT, code, f"uhyve exit hypercall with code {code}")

    def _cmdsize(self, gpa: int) -> None:
        self.memory.check(gpa, CMDSIZE_PARAMS.size)
        argsz = [len(a) + 1 for a in self.argv] + [0] * (MAX_ARGC_ENVC - len(self.argv))
        envsz = [len(e) + 1 for e in self.env] + [0] * (MAX_ARGC_ENVC - len(self.env))
        self._write_field(gpa, CMDSIZE_PARAMS, (len(self.argv), *argsz, len(self.env), *envsz))

    def _cmdval(self, gpa: int) -> None:
        argv_gpa, envp_gpa = self._read_block(gpa, CMDVAL_PARAMS)
        for table, items, what in ((argv_gpa, self.argv, "argv"), (envp_gpa, self.env, "envp")):
            if not items:
                continue
            try:
                pointers = struct.unpack(f"<{len(items)}Q", self.memory.read(table, 8 * len(items)))
            except GuestMemoryError:
                raise _Fault(f"{what} pointer array at {table:#x} is outside guest memory", EFAULT) from None
            for i, (dest, item) in enumerate(zip(pointers, items)):
                try:
                    self.memory.write(dest, item + b"\0")
                except GuestMemoryError:
                    raise _Fault(
                        f"{what}[{i}] destination {dest:#x}+{len(item) + 1:#x} is outside guest memory", EFAULT
                    ) from None

    def _file_open(self, gpa: int) -> None:
        name, flags, mode, _ret = self._read_block(gpa, OPEN_PARAMS)

        def answer(ret: int) -> None:
            self.memory.write_u32(gpa + OPEN_RET_OFFSET, ret)

        try:
            path = self._guest_string(name)
            flags &= ALLOWED_OPEN_FLAGS
            if flags & O_DIRECTORY and flags & O_CREAT:
                raise _Fault("O_DIRECTORY together with O_CREAT", EINVAL)
            if not self._root:
                answer(-ENOENT)  # uhyve: a path outside the file map is not found
                return
            check_guest_path(path)
            host_flags = self._host_open_flags(flags) | os.O_NONBLOCK
            try:
                host_fd = open_beneath(self._root[0], path, host_flags, mode & 0o777)
            except OSError as exc:
                if exc.errno in (host_errno.EXDEV, host_errno.ELOOP):
                    raise _Fault(
                        f"path {path!r} refused: it leaves the mapped directory through a symlink", EACCES
                    ) from None
                answer(-(exc.errno or EIO))
                return
            try:
                st = os.fstat(host_fd)
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                    raise _Fault(f"path {path!r} refused: not a regular file or directory", EACCES)
                os.set_blocking(host_fd, True)
            except BaseException:
                os.close(host_fd)
                raise
            answer(self._new_fd(host_fd))
        except _Fault as exc:
            answer(-exc.errno)
            raise

    @staticmethod
    def _host_open_flags(flags: int) -> int:
        out = {0: os.O_RDONLY, 1: os.O_WRONLY, 2: os.O_RDWR}.get(flags & O_ACCMODE)
        if out is None:
            raise _Fault(f"invalid access mode {flags & O_ACCMODE}", EINVAL)
        for guest, host in (
            (O_CREAT, os.O_CREAT),
            (O_EXCL, os.O_EXCL),
            (O_TRUNC, os.O_TRUNC),
            (O_APPEND, os.O_APPEND),
            (O_DIRECTORY, os.O_DIRECTORY),
        ):
            if flags & guest:
                out |= host
        return out

    def _file_close(self, gpa: int) -> None:
        fd, _ret = self._read_block(gpa, CLOSE_PARAMS)
        if fd in (STDIN_FILENO, STDOUT_FILENO, STDERR_FILENO):
            ret = 0  # uhyve ignores closing stdio
        elif fd in self._fds:
            try:
                os.close(self._fds.pop(fd))
                ret = 0
            except OSError as exc:
                ret = -(exc.errno or EIO)
        else:
            self._write_field(gpa, CLOSE_PARAMS, (fd, -EBADF))
            raise _Fault(f"close of unknown fd {fd}", EBADF)
        self._write_field(gpa, CLOSE_PARAMS, (fd, ret))

    def _file_read(self, gpa: int) -> None:
        fd, buf, length, _ret = self._read_block(gpa, READ_PARAMS)

        def answer(ret: int) -> None:
            self._write_field(gpa, READ_PARAMS, (fd, buf, length, ret))

        if fd == STDIN_FILENO:
            answer(0)
            return
        host_fd = self._fds.get(fd)
        if host_fd is None:
            answer(-EBADF)
            raise _Fault(f"read from unknown fd {fd}", EBADF)
        n = min(length, MAX_IO_CHUNK)
        try:
            pieces = self._virtual_pieces(buf, n)
        except _Fault as exc:
            answer(-exc.errno)
            raise
        try:
            data = os.read(host_fd, n)
        except OSError as exc:
            answer(-(exc.errno or EIO))
            return
        pos = 0
        for piece_gpa, piece_len in pieces:
            if pos >= len(data):
                break
            chunk = data[pos : pos + piece_len]
            self.memory.write(piece_gpa, chunk)
            pos += len(chunk)
        answer(len(data))

    def _file_write(self, gpa: int) -> None:
        fd, buf, length = self._read_block(gpa, WRITE_PARAMS)

        def answer(written: int) -> None:
            self._write_field(gpa, WRITE_PARAMS, (fd, buf, written))

        n = min(length, MAX_IO_CHUNK)
        if fd in (STDOUT_FILENO, STDERR_FILENO):
            host_fd = None
        elif fd in self._fds:
            host_fd = self._fds[fd]
        else:
            answer(0)
            raise _Fault(f"write to unknown fd {fd}", EBADF)
        try:
            pieces = self._virtual_pieces(buf, n)
        except _Fault:
            answer(0)
            raise
        data = b"".join(self.memory.read(g, l) for g, l in pieces)
        if host_fd is None:
            self._emit(data)
            answer(len(data))
            return
        written = 0
        try:
            while written < len(data):
                step = os.write(host_fd, data[written:])
                if step <= 0:
                    break
                written += step
        except OSError as exc:
            answer(written)
            raise _Fault(f"host write for fd {fd} failed: {exc.strerror}", exc.errno or EIO) from None
        answer(written)

    def _file_lseek(self, gpa: int) -> None:
        fd, offset, whence = self._read_block(gpa, LSEEK_PARAMS)
        host_fd = self._fds.get(fd)
        result = -1  # uhyve's v1 lseek reports every failure as -1
        if host_fd is not None and whence in (SEEK_SET, SEEK_CUR, SEEK_END):
            try:
                result = os.lseek(host_fd, offset, whence)
            except OSError:
                result = -1
        self._write_field(gpa, LSEEK_PARAMS, (fd, result, whence))
        if host_fd is None:
            raise _Fault(f"lseek on unknown fd {fd}", EBADF)

    def _file_unlink(self, gpa: int) -> None:
        name, _ret = self._read_block(gpa, UNLINK_PARAMS)

        def answer(ret: int) -> None:
            self._write_field(gpa, UNLINK_PARAMS, (name, ret))

        try:
            path = self._guest_string(name)
            if not self._root:
                answer(-ENOENT)
                return
            check_guest_path(path)
            parent, _, base = path.rstrip("/").rpartition("/")
            if base in ("", "."):
                raise _Fault(f"cannot unlink {path!r}", EINVAL)
            try:
                dir_fd = open_beneath(self._root[0], parent or ".", os.O_PATH | os.O_DIRECTORY)
            except OSError as exc:
                if exc.errno in (host_errno.EXDEV, host_errno.ELOOP):
                    raise _Fault(
                        f"path {path!r} refused: it leaves the mapped directory through a symlink", EACCES
                    ) from None
                answer(-(exc.errno or EIO))
                return
            try:
                os.unlink(base, dir_fd=dir_fd)
                answer(0)
            except OSError as exc:
                answer(-(exc.errno or EIO))
            finally:
                os.close(dir_fd)
        except _Fault as exc:
            answer(-exc.errno)
            raise


def attach_uhyve(
    machine: Any,
    *,
    argv: list[str],
    env: dict[str, str],
    fs_root: str | Path | None,
    boot_info_addr: int | None = None,
    root_page_table: int = 0,
    tsc_khz: int | None = None,
) -> UhyveHypercalls:
    """Create the hypercall device for ``machine`` and put it on its port-I/O bus.

    Uses ``machine.memory``, ``machine.control``, ``machine.serial_sink`` (the
    console) and ``machine.pio_bus``, and lists the device in
    ``machine.devices`` (so the machine closes it and reports its metrics).
    If the machine offers ``current_cr3()`` (the CR3 of the vCPU doing the
    port write) the v1 buffer translations use it, else ``root_page_table``.
    ``tsc_khz`` (KVM_GET_TSC_KHZ, as uhyve passes it) goes into the boot
    info's ``cpu_freq``.
    """
    console = getattr(machine, "serial_sink", None) or machine.console_sink
    cr3 = getattr(machine, "current_cr3", None)
    device = UhyveHypercalls(
        machine.memory,
        console,
        machine.control,
        argv=argv,
        env=env,
        fs_root=fs_root,
        root_page_table=cr3 if callable(cr3) else root_page_table,
    )
    machine.pio_bus.register(HYPERCALL_PORT_BASE, HYPERCALL_PORT_WINDOW, device, "uhyve-hypercalls")
    devices = getattr(machine, "devices", None)
    if isinstance(devices, dict):
        devices["uhyve"] = device
    if boot_info_addr is not None and tsc_khz:
        from ..boot.hermit import BOOT_INFO_CPU_FREQ_OFFSET

        machine.memory.write_u32(boot_info_addr + BOOT_INFO_CPU_FREQ_OFFSET, tsc_khz)
    return device
