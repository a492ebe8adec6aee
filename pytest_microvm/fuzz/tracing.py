"""A ``GuestMemory`` that records every access a device makes.

``TracingGuestMemory`` wraps a real ``GuestMemory`` and offers the same
interface, so a device, a ``Virtqueue`` or a transport can be built over it
unchanged.  Each read, write, fill and view is appended to ``log`` as an
``Access`` (kind, guest address, length); oracles then check the exact set of
guest bytes a device touched and in which order.

Memory hooks model a driver that edits RAM while the device works (TOCTOU):
``add_read_hook(fn)`` calls ``fn(access_number, gpa, length)`` *before* each
device read is served, and ``fn`` may change guest memory through ``inner``
(the untraced memory).  The device then reads the edited bytes.

Views (``view()``) are zero-copy windows a device may read or write; the
tracer records them as ``"view"`` accesses.  Oracles that need to know what a
view changed compare snapshots of RAM (``snapshot()``) taken before and after
a step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable

from vmm.memory import GuestMemory

#: Access kinds in ``Access.kind``.
READ = "read"
WRITE = "write"
VIEW = "view"

ReadHook = Callable[[int, int, int], None]


@dataclass(frozen=True)
class Access:
    """One guest-memory access by the device under test."""

    kind: str
    gpa: int
    length: int

    @property
    def end(self) -> int:
        return self.gpa + self.length

    def overlaps(self, gpa: int, length: int) -> bool:
        return self.gpa < gpa + length and gpa < self.gpa + self.length


class TracingGuestMemory:
    """``GuestMemory``'s interface over ``inner``, with every access logged.

    A failed access (outside RAM) is logged too, before the error is raised:
    an attempt is what the "no access while not ready" oracle must see.
    """

    def __init__(self, inner: GuestMemory, *, limit: int = 1 << 20, max_reads: int = 5_000) -> None:
        self.inner = inner
        self.regions = inner.regions
        self.log: list[Access] = []
        #: Most accesses kept; beyond it ``overflowed`` is set (itself a finding: unbounded work).
        self.limit = limit
        self.overflowed = False
        self._read_hooks: list[ReadHook] = []
        self._reads = 0
        #: Reads allowed between two ``clear()`` calls: more is unbounded work (a loop a device did not cut).
        self.max_reads = max_reads
        self._reads_since_clear = 0
        self.enabled = True

    # ---- tracing control ---------------------------------------------------
    def clear(self) -> None:
        self.log.clear()
        self.overflowed = False
        self._reads_since_clear = 0

    def new_step(self) -> None:
        """Start a new read budget without dropping the log."""
        self._reads_since_clear = 0

    def add_read_hook(self, hook: ReadHook) -> None:
        self._read_hooks.append(hook)

    def clear_read_hooks(self) -> None:
        self._read_hooks.clear()

    @property
    def reads_served(self) -> int:
        """Device reads since construction (the ``access_number`` hooks see)."""
        return self._reads

    def _note(self, kind: str, gpa: int, length: int) -> None:
        if not self.enabled:
            return
        if len(self.log) >= self.limit:
            self.overflowed = True
            return
        self.log.append(Access(kind, gpa, length))

    def _before_read(self, gpa: int, length: int) -> None:
        if not self.enabled:
            return
        n = self._reads
        self._reads += 1
        self._reads_since_clear += 1
        if self._reads_since_clear > self.max_reads:
            from .oracles import violation

            raise violation(
                "bounded-work-per-kick", f"more than {self.max_reads} guest reads in one step (last at {gpa:#x})"
            )
        for hook in self._read_hooks:
            hook(n, gpa, length)
        self._note(READ, gpa, length)

    def snapshot(self) -> list[bytes]:
        """A copy of every region's bytes (compare two with ``changed_ranges``)."""
        return [bytes(r.mapping) for r in self.inner.regions]

    def changed_ranges(self, before: list[bytes], after: list[bytes] | None = None) -> list[tuple[int, int]]:
        """Guest ranges (gpa, length) whose bytes differ between two snapshots."""
        after = self.snapshot() if after is None else after
        out: list[tuple[int, int]] = []
        for region, a, b in zip(self.inner.regions, before, after):
            if a == b:
                continue
            out.extend((region.gpa + s, n) for s, n in _diff_runs(a, b))
        return out

    # ---- GuestMemory interface -----------------------------------------------
    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def end(self) -> int:
        return self.inner.end

    def check(self, gpa: int, length: int) -> None:
        self.inner.check(gpa, length)

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.inner.contains(gpa, length)

    def ranges(self) -> Iterable[tuple[int, int]]:
        return self.inner.ranges()

    def close(self) -> None:
        self.inner.close()

    def read(self, gpa: int, length: int) -> bytes:
        self._before_read(gpa, length)
        return self.inner.read(gpa, length)

    def read_into(self, gpa: int, buf: bytearray | memoryview) -> None:
        self._before_read(gpa, len(buf))
        self.inner.read_into(gpa, buf)

    def read_u8(self, gpa: int) -> int:
        self._before_read(gpa, 1)
        return self.inner.read_u8(gpa)

    def read_u16(self, gpa: int) -> int:
        self._before_read(gpa, 2)
        return self.inner.read_u16(gpa)

    def read_u32(self, gpa: int) -> int:
        self._before_read(gpa, 4)
        return self.inner.read_u32(gpa)

    def read_u64(self, gpa: int) -> int:
        self._before_read(gpa, 8)
        return self.inner.read_u64(gpa)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self._note(WRITE, gpa, len(data))
        self.inner.write(gpa, data)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self._note(WRITE, gpa, length)
        self.inner.fill(gpa, length, byte)

    def write_u8(self, gpa: int, value: int) -> None:
        self._note(WRITE, gpa, 1)
        self.inner.write_u8(gpa, value)

    def write_u16(self, gpa: int, value: int) -> None:
        self._note(WRITE, gpa, 2)
        self.inner.write_u16(gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self._note(WRITE, gpa, 4)
        self.inner.write_u32(gpa, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self._note(WRITE, gpa, 8)
        self.inner.write_u64(gpa, value)

    def view(self, gpa: int, length: int) -> memoryview:
        self._note(VIEW, gpa, length)
        return self.inner.view(gpa, length)


def _diff_runs(a: bytes, b: bytes, chunk: int = 256) -> Iterable[tuple[int, int]]:
    """(offset, length) runs where ``a`` and ``b`` differ; compares in chunks first for speed."""
    n = len(a)
    start = -1
    pos = 0
    while pos < n:
        end = min(pos + chunk, n)
        if a[pos:end] == b[pos:end]:
            if start >= 0:
                yield start, pos - start
                start = -1
            pos = end
            continue
        for i in range(pos, end):
            if a[i] != b[i]:
                if start < 0:
                    start = i
            elif start >= 0:
                yield start, i - start
                start = -1
        pos = end
    if start >= 0:
        yield start, n - start
