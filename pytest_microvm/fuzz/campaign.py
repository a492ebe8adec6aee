"""`microvm fuzz TARGET`: a fuzzing campaign with a live status line and reproducers.

Each job runs the target's state machine in rounds of ``ROUND`` examples
under the ``campaign`` profile, with its own seed per round, until the time
or example budget is spent or it finds a failure.  All jobs share one
Hypothesis example database (``--db``, by default the one pytest uses, so a
failure found here replays in the next ``pytest tests/fuzz`` run).  For each
distinct failure a reproducer is written (``--out``): a pytest file that
fails until the bug is fixed.

The status line shows examples per second, the number of distinct behaviours
seen (``FuzzMachine.note`` labels: kick outcomes, error kinds, interrupt
identifications, ...) and failures.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Examples per round (a round is one Hypothesis run with one seed).
ROUND = 50
DEFAULT_DB = ".hypothesis/examples"
DEFAULT_OUT = "fuzz-findings"


@dataclass
class CampaignResult:
    target: str
    examples: int
    behaviours: int
    failures: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.failures


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `microvm fuzz` (shared with ``python -m pytest_microvm.fuzz.campaign``)."""
    from .targets import TARGETS

    p.add_argument("target", choices=sorted(TARGETS), help="what to fuzz")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="run this long (default: 1 minute unless --max-examples)")
    budget.add_argument("--max-examples", type=int, help="stop after this many examples")
    p.add_argument("--db", default=DEFAULT_DB, help=f"Hypothesis example database directory (default {DEFAULT_DB})")
    p.add_argument("--seed", type=int, help="seed of the first round (rounds use seed, seed+1, ...)")
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"where reproducers are written (default {DEFAULT_OUT}/)")
    p.add_argument("--quiet", action="store_true", help="no live status line")


def _ensure_profiles() -> None:
    """The `campaign` profile comes from the repository's conftest.py under pytest; define it here otherwise."""
    from hypothesis import HealthCheck, settings

    try:
        settings.get_profile("campaign")
    except Exception:
        settings.register_profile(
            "campaign", max_examples=1_000_000, deadline=None, print_blob=True, suppress_health_check=list(HealthCheck)
        )


def _worker(
    target: str, job: int, seed: int, deadline: float, max_examples: int | None, db: str, out: str, q: Any
) -> None:
    """One job: rounds until the budget is spent or a failure is found; reports over ``q``."""
    from hypothesis import settings
    from hypothesis.database import DirectoryBasedExampleDatabase
    from hypothesis.stateful import run_state_machine_as_test

    from .reproducer import failure_text, signature, write_reproducer
    from .stateful.base import FuzzMachine
    from .targets import load

    machine = load(target)
    _ensure_profiles()
    database = DirectoryBasedExampleDatabase(db)
    done = 0
    sent_behaviours: set[str] = set()
    round_no = 0
    while time.monotonic() < deadline and (max_examples is None or done < max_examples):
        n = ROUND if max_examples is None else min(ROUND, max_examples - done)
        before = FuzzMachine.examples_started
        machine._hypothesis_internal_use_seed = seed + round_no * 1000 + job  # type: ignore[attr-defined]
        round_no += 1
        failure = None
        try:
            run_state_machine_as_test(
                machine,
                settings=settings(
                    settings.get_profile("campaign"), max_examples=n, database=database, derandomize=False
                ),
            )
        except Exception as exc:  # a finding (InvariantViolation, or anything else escaping)
            failure = exc
        finally:
            del machine._hypothesis_internal_use_seed  # type: ignore[attr-defined]
        done += FuzzMachine.examples_started - before
        new = FuzzMachine.behaviours - sent_behaviours
        sent_behaviours |= new
        q.put(("progress", job, FuzzMachine.examples_started - before, sorted(new)))
        if failure is not None:
            inner = getattr(failure, "exceptions", None)
            if inner:  # FlakyFailure: the failure did not replay (timing); report what failed first
                failure = inner[0]
                failure.add_note("(flaky: this failure did not happen again when Hypothesis replayed it)")
            try:
                path = str(write_reproducer(Path(out), target, machine, failure))
            except Exception as e:  # the finding itself must still be reported
                path = f"(no reproducer: {e})"
            q.put(("failure", job, signature(failure), failure_text(failure).splitlines()[0], path))
            break
    q.put(("done", job))


def run_campaign(
    target: str,
    *,
    minutes: float | None = None,
    max_examples: int | None = None,
    db: str = DEFAULT_DB,
    seed: int | None = None,
    jobs: int = 1,
    out: str = DEFAULT_OUT,
    status: Any = sys.stderr,
) -> CampaignResult:
    """Run a campaign; prints a live status line to ``status`` (None for silence)."""
    from .targets import load

    load(target)  # fail early, naming the known targets
    if minutes is None and max_examples is None:
        minutes = 1.0
    t0 = time.monotonic()
    deadline = t0 + minutes * 60 if minutes is not None else float("inf")
    per_job = None if max_examples is None else max(1, -(-max_examples // jobs))
    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(target, j, seed, deadline, per_job, db, out, q),
            name=f"fuzz-{target}-{j}",
            daemon=True,
        )
        for j in range(jobs)
    ]
    for p in procs:
        p.start()
    examples = 0
    behaviours: set[str] = set()
    failures: dict[str, str] = {}
    running = len(procs)
    last_print = 0.0
    try:
        while running:
            try:
                msg = q.get(timeout=0.5)
            except queue.Empty:
                msg = None
                if not any(p.is_alive() for p in procs):
                    break
            if msg is not None:
                kind = msg[0]
                if kind == "progress":
                    examples += msg[2]
                    behaviours.update(msg[3])
                elif kind == "failure":
                    _, job, sig, line, path = msg
                    if sig not in failures:
                        failures[sig] = path
                        if status is not None:
                            print(f"\nfailure {sig} (job {job}): {line}\n  reproducer: {path}", file=status, flush=True)
                elif kind == "done":
                    running -= 1
            now = time.monotonic()
            if status is not None and now - last_print >= 0.5:
                last_print = now
                rate = examples / max(now - t0, 1e-9)
                print(
                    f"\r{target}: {examples} examples, {rate:.1f}/s, {len(behaviours)} behaviours, "
                    f"{len(failures)} failures, {now - t0:.0f}s",
                    end="",
                    file=status,
                    flush=True,
                )
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    if status is not None:
        print(file=status)
    return CampaignResult(target, examples, len(behaviours), sorted(failures.values()), time.monotonic() - t0)


def main(args: argparse.Namespace) -> int:
    """Entry point of `microvm fuzz`; exit status 1 when a failure was found."""
    result = run_campaign(
        args.target,
        minutes=args.minutes,
        max_examples=args.max_examples,
        db=args.db,
        seed=args.seed,
        jobs=max(1, args.jobs),
        out=args.out,
        status=None if args.quiet else sys.stderr,
    )
    print(
        f"{result.target}: {result.examples} examples in {result.seconds:.1f}s "
        f"({result.examples / max(result.seconds, 1e-9):.1f}/s), {result.behaviours} behaviours, "
        f"{len(result.failures)} failures"
    )
    for path in result.failures:
        print(f"  reproducer: {path}")
    return 0 if result.ok else 1


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="python -m pytest_microvm.fuzz.campaign")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
