"""What must hold after every fuzzing step, beyond "it did not crash".

* ``guarded(allowed)``: the closed set of errors that may leave a call into a
  device; anything else is re-raised as ``UnexpectedDeviceError`` (a bug).
  A bus access (``read``/``write`` on a port or MMIO window) may raise
  nothing at all.
* ``Watchdog``: no step may block or spin: a step that runs past its budget
  gets ``StepTimeout`` raised inside it.
* ``MemoryBound``: host memory (``tracemalloc``) may not grow by more than a
  bound per step, whatever the guest sends.
* Ring oracles (``check_write_set``, ``check_used_ring``): every guest byte a
  device changed lies in an allowed set, ``used.idx`` moves by exactly the
  completions, each head completes at most once, ``len`` within capacity.

Each failure is an ``InvariantViolation`` whose message names the invariant
as ``docs/fuzzing.md`` does, so a campaign can count findings by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
import tracemalloc
from collections.abc import Iterable, Iterator

from vmm.errors import GuestError, GuestMemoryError

#: Errors a direct call into a virtqueue or device handler may raise for guest input.
GUEST_INPUT_ERRORS: tuple[type[BaseException], ...] = (GuestError,)
#: Errors a bus access may raise: none.
BUS_ERRORS: tuple[type[BaseException], ...] = ()
#: Errors that mean "the test harness itself is stopping" and must pass through.
PASS_THROUGH: tuple[type[BaseException], ...] = (KeyboardInterrupt, SystemExit)


class InvariantViolation(AssertionError):
    """A named invariant failed; ``name`` is the row of the invariant table in docs/fuzzing.md."""

    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        self.detail = detail
        super().__init__(f"[{name}] {detail}")


class UnexpectedDeviceError(InvariantViolation):
    """An exception outside the allowed set escaped a device."""


class StepTimeout(InvariantViolation):
    """A step ran past the watchdog's budget (a hang or an unbounded loop)."""

    def __init__(self, detail: str = "step ran past the watchdog budget") -> None:
        super().__init__("no-step-blocks", detail)


def violation(name: str, detail: str) -> InvariantViolation:
    return InvariantViolation(name, detail)


@contextlib.contextmanager
def guarded(where: str, allowed: tuple[type[BaseException], ...] = BUS_ERRORS) -> Iterator[None]:
    """Let ``allowed`` (and harness errors) through; turn anything else into a finding."""
    try:
        yield
    except PASS_THROUGH + (InvariantViolation,):
        raise
    except allowed:
        raise
    except GuestMemoryError as e:
        raise UnexpectedDeviceError("closed-error-set", f"{where}: guest memory error escaped: {e}") from e
    except Exception as e:
        raise UnexpectedDeviceError("closed-error-set", f"{where}: {type(e).__name__} escaped: {e}") from e


# ---- watchdog -------------------------------------------------------------------------------
class Watchdog:
    """One background thread that raises ``StepTimeout`` in a step that overruns its budget.

    ``arm(budget)`` at the start of a step and ``disarm()`` at its end cost two
    attribute writes; the thread polls every ``poll`` seconds.  The exception
    is delivered with ``PyThreadState_SetAsyncExc``, so it interrupts Python
    loops (a spinning device); a thread blocked inside C (a deadlocked lock)
    is reported by ``fired`` and ``stuck_for()`` instead.
    """

    _instance: Watchdog | None = None
    _instance_lock = threading.Lock()

    def __init__(self, poll: float = 0.05) -> None:
        self.poll = poll
        self._deadline = 0.0
        self._target: int | None = None
        self._budget = 0.0
        self.fired = 0
        self.what = ""
        self.last_fired = ""
        self._fire_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="fuzz-watchdog", daemon=True)
        self._thread.start()

    @classmethod
    def shared(cls) -> Watchdog:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = Watchdog()
            return cls._instance

    def arm(self, budget: float, what: str = "") -> None:
        self._budget = budget
        self.what = what
        self._deadline = time.monotonic() + budget
        self._target = threading.get_ident()

    def disarm(self) -> None:
        self._target = None

    def _run(self) -> None:
        while True:
            time.sleep(self.poll)
            target = self._target
            if target is None or time.monotonic() < self._deadline:
                continue
            with self._fire_lock:
                if self._target != target:  # the step ended meanwhile
                    continue
                self._target = None
                self.fired += 1
                self.last_fired = f"{self.what} ran past {self._budget} s"
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), ctypes.py_object(StepTimeout))

    @contextlib.contextmanager
    def step(self, budget: float, what: str = "") -> Iterator[None]:
        self.arm(budget, what)
        try:
            yield
        finally:
            with self._fire_lock:
                self.disarm()


# ---- host memory ------------------------------------------------------------------------------
class MemoryBound:
    """Host memory a step leaves allocated, and its transient peak, measured with ``tracemalloc``.

    Tracing runs only inside a step (started at its beginning, stopped at its
    end), so Hypothesis's own work between steps is not slowed down and the
    count is exactly "allocated during the step and still alive after it".
    ``net`` bounds that (plus ``allowance``: what the host itself handed the
    device, such as serial input); ``peak`` bounds the high-water mark.  A
    step inside an outer tracemalloc session (someone else's) is measured
    against that session's counters instead.
    """

    def __init__(self, net: int = 64 * 1024, peak: int = 4 << 20) -> None:
        self.net = net
        self.peak = peak

    def close(self) -> None:
        pass

    @contextlib.contextmanager
    def step(self, what: str, allowance: int = 0) -> Iterator[None]:
        outer = tracemalloc.is_tracing()
        if outer:
            tracemalloc.reset_peak()
            base, _ = tracemalloc.get_traced_memory()
        else:
            tracemalloc.start(1)
            base = 0
        grown = 0
        try:
            yield
            after, peak = tracemalloc.get_traced_memory()
            if after - base > self.net + allowance and not outer:
                # Over the bound: look closer, leaving out one-time costs (imports, caches of the runtime).
                grown = _steady_growth(tracemalloc.take_snapshot())
            else:
                grown = after - base
        finally:
            if not outer:
                tracemalloc.stop()
        if grown > self.net + allowance:
            raise violation("bounded-host-memory", f"{what}: host memory grew by {grown} bytes in one step")
        if peak - base > self.peak + allowance:
            raise violation(
                "bounded-host-memory", f"{what}: host memory peaked {peak - base} bytes above the step's start"
            )


#: Allocations that are not the device's: once per process (imports, the runtime's caches) or
#: Hypothesis's own line tracer, which runs inside the step while it explains a failure.
_ONE_TIME = (
    "*/hypothesis/*",
    "<frozen importlib._bootstrap>",
    "<frozen importlib._bootstrap_external>",
    "*/importlib/*",
    "*/linecache.py",
    "*/logging/__init__.py",
    "*/re/*",
    "*/sre_*.py",
    "*/functools.py",
    "*/typing.py",
    "*/inspect.py",
)


def _steady_growth(snapshot: tracemalloc.Snapshot) -> int:
    filters = [tracemalloc.Filter(False, pattern) for pattern in _ONE_TIME]
    return sum(stat.size for stat in snapshot.filter_traces(filters).statistics("filename"))


# ---- ring oracles ----------------------------------------------------------------------------------
def covered(ranges: Iterable[tuple[int, int]], gpa: int, length: int) -> bool:
    """Whether [gpa, gpa+length) is inside the union of ``ranges`` (each (gpa, length))."""
    need = [(gpa, gpa + length)]
    for a, n in sorted(ranges):
        b = a + n
        rest = []
        for s, e in need:
            if e <= a or b <= s:
                rest.append((s, e))
                continue
            if s < a:
                rest.append((s, a))
            if b < e:
                rest.append((b, e))
        need = rest
        if not need:
            return True
    return not need


def check_write_set(changed: Iterable[tuple[int, int]], allowed: Iterable[tuple[int, int]], what: str) -> None:
    """Every changed guest range lies in ``allowed`` (writable buffers of completed chains, used ring)."""
    allowed = list(allowed)
    for gpa, n in changed:
        if not covered(allowed, gpa, n):
            raise violation(
                "writes-only-to-writable-and-used",
                f"{what}: device changed guest bytes {gpa:#x}+{n:#x} outside the writable buffers and the used ring",
            )
