"""Turn a Hypothesis failure of a fuzz target into a pytest file that fails until the bug is fixed.

Hypothesis reports a failing state machine run as a program
(``state = UartMachine()``, ``state.access(op=...)``, ...) and, with
``print_blob``, as a ``@reproduce_failure(version, blob)`` line.  When the
program is plain Python (no ``data()`` draws), the reproducer *is* that
program, replayed step by step with the same invariant checks; otherwise it
replays the blob, which needs the same Hypothesis version and strategies.
Either way the test fails while the bug is there and passes once it is fixed.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
import time
from pathlib import Path

_BLOB = re.compile(r"@reproduce_failure\((['\"][^'\"]+['\"]),\s*(b['\"][^'\"]+['\"])\)")


def failure_text(exc: BaseException) -> str:
    """The exception's message plus the notes Hypothesis attached (the falsifying program)."""
    notes = getattr(exc, "__notes__", [])
    return "\n".join([f"{type(exc).__name__}: {exc}", *notes])


def program_lines(text: str) -> list[str]:
    """The ``state = ...`` / ``state.rule(...)`` lines of a falsifying example (wrapped reprs joined)."""
    out: list[str] = []
    inside = False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("state = "):
            inside, out = True, [s]
            continue
        if not inside or not s:
            continue
        if out and out[-1].count("(") + out[-1].count("[") > out[-1].count(")") + out[-1].count("]"):
            out[-1] += " " + s  # a repr Hypothesis wrapped over several lines
            continue
        if s.startswith(("Explanation", "You can", "These lines")):
            break
        out.append(s)
        if s == "state.teardown()":
            break
    return out


def signature(exc: BaseException) -> str:
    """A short stable name for a failure: the invariant's name and a hash of its message's shape."""
    name = getattr(exc, "name", type(exc).__name__)
    shape = re.sub(r"0x[0-9a-f]+|\d+", "N", str(exc))
    return f"{name}-{hashlib.sha256(shape.encode()).hexdigest()[:8]}"


def write_reproducer(out_dir: Path, target: str, machine_cls: type, exc: BaseException) -> Path:
    """Write ``test_<target>_<signature>.py`` into ``out_dir``; returns its path (existing files are kept)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sig = signature(exc)
    safe = re.sub(r"\W", "_", f"{target}_{sig}")
    path = out_dir / f"test_{safe}.py"
    if path.exists():
        return path
    text = failure_text(exc)
    steps = program_lines(text)
    module = machine_cls.__module__
    cls = machine_cls.__name__
    executable = bool(steps) and not any(s.startswith("Draw ") for s in steps)
    if executable:
        try:
            compile("\n".join(steps), "<steps>", "exec")
        except SyntaxError:
            executable = False
    header = textwrap.indent(text.strip(), "    ")
    doc = f'"""Found by `microvm fuzz {target}` on {time.strftime("%Y-%m-%d")}.\n\n{header}\n"""\n'
    if executable:
        # Hypothesis prints the invariant checks it ran as steps too, so the program replays them.
        body = "\n".join(f"    {s}" for s in steps)
        code = (
            f"{doc}\n"
            f"from {module} import {cls}\n"
            "from pytest_microvm.fuzz.strategies import *  # noqa: F401,F403  (the reprs in the program)\n\n\n"
            f"def test_{safe}() -> None:\n{body}\n"
        )
    else:
        m = _BLOB.search(text)
        if not m:
            raise ValueError("the failure carries neither a plain program nor a reproduce_failure blob")
        version, blob = m.groups()
        code = (
            f"{doc}\n"
            "from hypothesis import reproduce_failure, settings\n"
            "from hypothesis.stateful import run_state_machine_as_test\n\n"
            f"from {module} import {cls}\n\n\n"
            f"def test_{safe}() -> None:\n"
            f"    @reproduce_failure({version}, {blob})\n"
            f"    class Replay({cls}):\n"
            "        pass\n\n"
            "    run_state_machine_as_test(Replay, settings=settings(database=None, deadline=None, print_blob=True))\n"
        )
    path.write_text(code)
    return path
