#!/usr/bin/env python3
"""Fuzzing throughput: in-process stateful steps per second per target.

A *step* is one rule of a target's state machine with every oracle that
follows it (model comparison, invariants, memory tracing, the tracemalloc
bound, the watchdog).  Each target runs ``--examples`` examples (fixed seed,
no database, no shrinking) and the rules executed are counted; the run
reports steps/s and examples/s, and, with ``--no-memory-bound``, the same
without the tracemalloc oracle.

    PYTHONPATH=. python3 bench/fuzz_bench.py [--examples N] [targets...]

Agent-driven programs: ``--agent-programs N`` programs through the
fuzz-agent guest on this VMM (one VM boot per program), reported as
programs/s; "n/a" when /dev/kvm, the bindings or the guest toolchain are
missing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, Phase, seed, settings  # noqa: E402
from hypothesis import given as given_programs  # noqa: E402
from hypothesis.stateful import run_state_machine_as_test  # noqa: E402

from pytest_microvm.fuzz.targets import TARGETS, load  # noqa: E402


def bench_target(name: str, examples: int, memory_bound: bool) -> tuple[int, int, float]:
    """(steps, examples, seconds) for ``examples`` examples of target ``name``."""
    machine = load(name)
    steps = [0]

    class Counted(machine):  # type: ignore[misc, valid-type]
        check_memory = memory_bound

        def teardown(self) -> None:
            steps[0] += self.rules_run
            super().teardown()

        def check_invariants(self, *args, **kwargs):  # noqa: ANN002, ANN003
            self.rules_run = getattr(self, "rules_run", -1) + 1
            return super().check_invariants(*args, **kwargs)

    Counted.__name__ = machine.__name__
    s = settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    t0 = time.perf_counter()
    run_state_machine_as_test(seed(20261128)(Counted), settings=s)
    return steps[0], examples, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="*", default=sorted(TARGETS))
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--agent-programs", type=int, default=40, help="programs to run through the fuzz-agent guest")
    p.add_argument("--no-memory-bound", action="store_true", help="also measure without the tracemalloc oracle")
    args = p.parse_args(argv)
    print(f"{'target':16} {'steps/s':>9} {'examples/s':>11} {'steps':>7} {'seconds':>8}  oracles")
    for name in args.targets:
        variants = [True, False] if args.no_memory_bound else [True]
        for mem in variants:
            steps, n, secs = bench_target(name, args.examples, mem)
            label = "all" if mem else "all but tracemalloc"
            print(f"{name:16} {steps / secs:9.0f} {n / secs:11.1f} {steps:7d} {secs:8.2f}  {label}", flush=True)
    bench_agent(args.agent_programs)
    return 0


def bench_agent(n: int) -> None:
    """Programs per second through the fuzz-agent guest (one VM boot per program, as the tests do)."""
    try:
        from hypothesis import strategies as st  # noqa: F401

        from pytest_microvm.fuzz.agent import agent_programs, run_microvm
        from vmm.kvm.system import Kvm

        Kvm().close()
    except Exception as e:  # no KVM, no bindings or no guest toolchain: say so, do not fail
        print(f"agent programs through real exits: n/a ({type(e).__name__}: {e})")
        return
    programs = []

    @settings(max_examples=n, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @seed(20261128)
    @given_programs(agent_programs())
    def collect(ops):  # noqa: ANN001, ANN202
        programs.append(ops)

    collect()
    run_microvm(programs[0])  # builds the guest image (cached) outside the timing
    t0 = time.perf_counter()
    accesses = 0
    for ops in programs:
        run = run_microvm(ops)
        if not run.complete:
            print(f"agent program failed: {run.console[-300:]}")
            return
        accesses += len(ops)
    secs = time.perf_counter() - t0
    print(
        f"agent programs through real exits: {len(programs) / secs:.1f} programs/s "
        f"({accesses / secs:.0f} device accesses/s, one VM boot per program, {len(programs)} programs)"
    )


if __name__ == "__main__":
    sys.exit(main())
