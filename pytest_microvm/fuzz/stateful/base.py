"""What every fuzzing state machine shares: the step guard and its oracles.

``FuzzMachine.step(what)`` wraps one call into the device under test with
the watchdog (no step blocks), the closed error set (nothing but ``allowed``
escapes) and the host-memory bound (tracemalloc), in that order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from hypothesis import event
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import RuleBasedStateMachine

from ..oracles import BUS_ERRORS, MemoryBound, Watchdog, guarded


class FuzzMachine(RuleBasedStateMachine):
    """Base of the device state machines; subclasses set ``target``."""

    #: The name ``microvm fuzz`` and the docs use for this machine.
    target = ""
    #: Seconds one step may take before the watchdog calls it a hang.
    step_budget = 2.0
    #: Check host-memory growth per step (tracemalloc slows the run about twofold).
    check_memory = True
    #: Host memory one step may leave allocated (a device that starts a thread and its buffers needs more).
    memory_net = 64 * 1024

    #: Per process: machines started (examples), and distinct behaviour labels seen (for campaigns).
    examples_started = 0
    behaviours: set[str] = set()

    def __init__(self) -> None:
        super().__init__()
        FuzzMachine.examples_started += 1
        self.watchdog = Watchdog.shared()
        self.memory_bound = MemoryBound(net=type(self).memory_net) if type(self).check_memory else None
        self.steps = 0

    @contextlib.contextmanager
    def step(
        self, what: str, allowed: tuple[type[BaseException], ...] = BUS_ERRORS, allowance: int = 0
    ) -> Iterator[None]:
        self.steps += 1
        mem = self.memory_bound.step(what, allowance) if self.memory_bound else contextlib.nullcontext()
        with self.watchdog.step(self.step_budget, what), guarded(what, allowed), mem:
            yield

    def note(self, label: str) -> None:
        """Record a behaviour (a Hypothesis event, and a label campaigns count as coverage)."""
        FuzzMachine.behaviours.add(f"{self.target}: {label}")
        if currently_in_test_context():  # not when a reproducer replays the steps by hand
            event(label)

    def teardown(self) -> None:
        if self.memory_bound is not None:
            self.memory_bound.close()
