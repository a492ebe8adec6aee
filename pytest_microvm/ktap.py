"""A KTAP v1 (and TAP 13/14) parser for guest console output, usable without pytest.

KTAP (the kernel's Documentation/dev-tools/ktap.rst) is TAP with a fixed
indentation for nested subtests:

    KTAP version 1
    1..1
        KTAP version 1
        # Subtest: suite
        1..2
        ok 1 case_a
        # case_b: assertion failed          <- diagnostic, belongs to case_b
        not ok 2 case_b
    ok 1 suite # SKIP reason                <- directive

Guest consoles mix KTAP with other output (kernel log lines, printk
timestamps), so the parser is tolerant the way KUnit's kunit.py is: lines
before the first version line are ignored, ``[   12.345678] `` timestamps are
stripped, lines it does not understand become part of the log of the test in
progress, and problems (a wrong test number, a missing plan) are recorded in
``KtapDocument.errors`` instead of raised.

Output that stops early (the guest crashed or hung) is the case that matters
most: every test that had started but not reported gets status ``CRASH``, and
a planned test that never started is reported as crashed under the name
``#<number>``.  ``KtapDocument.complete`` says whether the whole plan reported.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

__all__ = ["KtapDocument", "KtapTest", "Status", "parse", "reportable"]


class Status(str, enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"
    #: ``not ok`` with a TODO or XFAIL directive: an expected failure.
    XFAIL = "xfail"
    #: The test started (or was planned) but the output ended before its result line.
    CRASH = "crash"

    @property
    def failed(self) -> bool:
        return self in (Status.FAIL, Status.CRASH)


#: Directives (ktap.rst, "Test case result lines").  TIMEOUT and ERROR are failures
#: whatever the result word says; SKIP is a skip; TODO and XFAIL make "not ok" expected.
DIRECTIVES = ("SKIP", "TODO", "XFAIL", "TIMEOUT", "ERROR")

_VERSION_RE = re.compile(r"^(KTAP|TAP) version (\d+)\s*$")
_PLAN_RE = re.compile(r"^1\.\.(\d+)(?:\s*#\s*(.*))?$")
_RESULT_RE = re.compile(r"^(ok|not ok)(?:\s+(\d+))?(?:\s+(?:-\s+)?([^#]*?))?\s*(?:#\s*(.*))?$")
_SUBTEST_RE = re.compile(r"^#\s*Subtest:\s*(.*?)\s*$")
#: printk time stamps ("[    1.234567] "), stripped from the start of every line.
_TIMESTAMP_RE = re.compile(r"^\[\s*\d+\.\d+\]\s?")


@dataclass
class KtapTest:
    """One result line (or one crashed test) and the subtests reported above it."""

    name: str
    status: Status
    number: int | None = None
    #: The directive word (SKIP, TODO, ...), upper case, or None.
    directive: str | None = None
    #: The text after the directive (a skip reason), or the crash explanation.
    reason: str = ""
    #: Diagnostic and unrecognised lines printed at this test's level before its result.
    log: list[str] = field(default_factory=list)
    subtests: list[KtapTest] = field(default_factory=list)
    #: The subtests' plan (``1..N``), when one was printed.
    plan: int | None = None
    #: 1-based line of the result line in the parsed text (None for a crash).
    line: int | None = None

    def walk(self, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], KtapTest]]:
        here = path + (self.name,)
        yield here, self
        for sub in self.subtests:
            yield from sub.walk(here)


@dataclass
class KtapDocument:
    #: "KTAP version 1", "TAP version 14", ...; None when no version line was found.
    version: str | None = None
    plan: int | None = None
    tests: list[KtapTest] = field(default_factory=list)
    #: One line per problem, "line N: ...".
    errors: list[str] = field(default_factory=list)
    #: True when every planned test (at every level) reported a result.
    complete: bool = False

    @property
    def found(self) -> bool:
        """Whether the text held KTAP/TAP output at all."""
        return self.version is not None or bool(self.tests)

    def walk(self) -> Iterator[tuple[tuple[str, ...], KtapTest]]:
        """Every test, depth first, with its path of names from the top level."""
        for t in self.tests:
            yield from t.walk()

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for _, t in reportable(self):
            out[t.status.value] += 1
        return out

    @property
    def ok(self) -> bool:
        return self.complete and not any(t.status.failed for _, t in self.walk())


def reportable(doc: KtapDocument) -> list[tuple[tuple[str, ...], KtapTest]]:
    """The tests a test runner should report: one per test case.

    Leaves are reported; a test with subtests is reported only when it failed or
    crashed and none of its subtests did (a suite that failed to initialise, or
    output that stopped after the last case but before the suite's result).
    """
    out: list[tuple[tuple[str, ...], KtapTest]] = []

    def visit(path: tuple[str, ...], t: KtapTest) -> bool:
        here = path + (t.name,)
        if not t.subtests:
            out.append((here, t))
            return t.status.failed
        any_failed = False
        for sub in t.subtests:
            any_failed |= visit(here, sub)
        if t.status.failed and not any_failed:
            out.append((here, t))
            return True
        return any_failed

    for t in doc.tests:
        visit((), t)
    return out


@dataclass
class _Frame:
    """One nesting level being parsed."""

    indent: int
    name: str | None = None
    plan: int | None = None
    results: list[KtapTest] = field(default_factory=list)
    pending_log: list[str] = field(default_factory=list)


def _split_indent(line: str) -> tuple[int, str]:
    expanded = line.expandtabs(8)
    content = expanded.lstrip(" ")
    return len(expanded) - len(content), content.rstrip()


def _parse_result(content: str, lineno: int) -> KtapTest | None:
    m = _RESULT_RE.match(content)
    if m is None:
        return None
    word, number, description, directive_text = m.groups()
    ok = word == "ok"
    directive = None
    reason = ""
    if directive_text is not None:
        head, _, rest = directive_text.strip().partition(" ")
        if head.upper() in DIRECTIVES:
            directive = head.upper()
            reason = rest.strip()
        else:
            reason = directive_text.strip()
    if directive == "SKIP":
        status = Status.SKIP
    elif directive in ("TIMEOUT", "ERROR"):
        status = Status.FAIL
    elif directive in ("TODO", "XFAIL"):
        status = Status.PASS if ok else Status.XFAIL
    else:
        status = Status.PASS if ok else Status.FAIL
    num = int(number) if number is not None else None
    name = (description or "").strip() or (f"#{num}" if num is not None else "#?")
    return KtapTest(name=name, status=status, number=num, directive=directive, reason=reason, line=lineno)


def parse(text: str | bytes | Iterable[str]) -> KtapDocument:
    """Parse the first KTAP/TAP document in ``text`` (console output)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = text.splitlines() if isinstance(text, str) else list(text)
    doc = KtapDocument()

    start = None
    base_indent = 0
    for i, raw in enumerate(lines):
        indent, content = _split_indent(_TIMESTAMP_RE.sub("", raw.rstrip("\r\n")))
        m = _VERSION_RE.match(content)
        if m:
            doc.version = f"{m.group(1)} version {m.group(2)}"
            start, base_indent = i + 1, indent
            break
    if start is None:
        return doc

    stack = [_Frame(indent=base_indent)]
    closed_child: _Frame | None = None

    def err(lineno: int, msg: str) -> None:
        doc.errors.append(f"line {lineno}: {msg}")

    def close_frame(lineno: int) -> _Frame:
        frame = stack.pop()
        if frame.plan is not None and len(frame.results) != frame.plan:
            err(lineno, f"subtest {frame.name or '?'} planned {frame.plan} tests but reported {len(frame.results)}")
        return frame

    for i in range(start, len(lines)):
        lineno = i + 1
        indent, content = _split_indent(_TIMESTAMP_RE.sub("", lines[i].rstrip("\r\n")))
        if not content:
            continue
        top = stack[-1]

        if _VERSION_RE.match(content):
            if indent > top.indent:
                stack.append(_Frame(indent=indent))
                closed_child = None
            elif indent == top.indent and not top.results and top.plan is None:
                pass  # a repeated header (some kernels print one per suite)
            elif indent <= base_indent and len(stack) == 1:
                err(lineno, "a second KTAP document starts here; only the first is parsed")
                break
            else:
                err(lineno, f"unexpected version line at indentation {indent}")
            continue

        m = _SUBTEST_RE.match(content)
        if m:
            if indent > top.indent:
                stack.append(_Frame(indent=indent, name=m.group(1)))
                closed_child = None
            elif indent == top.indent and len(stack) > 1 and not top.results and top.name is None:
                top.name = m.group(1)
            else:
                top.pending_log.append(content)
            continue

        m = _PLAN_RE.match(content)
        if m:
            if indent > top.indent:
                stack.append(_Frame(indent=indent))
                closed_child = None
                err(lineno, "a subtest plan without a version line")
                top = stack[-1]
            while indent < top.indent and len(stack) > 1:
                closed_child = close_frame(lineno)
                top = stack[-1]
            if top.plan is not None:
                err(lineno, f"a second plan (1..{m.group(1)}) at the same level")
            else:
                top.plan = int(m.group(1))
                if len(stack) == 1:
                    doc.plan = top.plan
            continue

        result = _parse_result(content, lineno) if indent >= base_indent else None
        if result is not None:
            while indent < top.indent and len(stack) > 1:
                closed_child = close_frame(lineno)
                top = stack[-1]
            if indent > top.indent:
                err(lineno, "a result line deeper than any open test (missing version line or plan)")
                stack.append(_Frame(indent=indent))
                closed_child = None
                top = stack[-1]
            if closed_child is not None and closed_child.indent > top.indent:
                result.subtests = closed_child.results
                result.plan = closed_child.plan
                result.log = closed_child.pending_log + top.pending_log
                if closed_child.name and result.name.startswith("#"):
                    result.name = closed_child.name
            else:
                result.log = top.pending_log
            top.pending_log = []
            closed_child = None
            expected = len(top.results) + 1
            if result.number is not None and result.number != expected:
                err(lineno, f"test number {result.number}, expected {expected}")
            top.results.append(result)
            continue

        # A diagnostic ("# ...") or a line we do not understand: the log of the test in progress.
        top.pending_log.append(content)

    # End of output.  Close every open level; whatever had started but not reported crashed.
    complete = True
    lineno = len(lines)
    deepest = True
    while stack:
        frame = stack[-1]
        planned = frame.plan
        reported = len(frame.results)
        if not deepest:
            # The crash is the test in progress below; later planned tests never started.
            if planned is not None and reported < planned:
                err(lineno, f"output ended after {reported} of {planned} planned tests")
        elif planned is None:
            complete = False
            err(lineno, f"output ended with no plan for {'subtest ' + frame.name if frame.name else 'the top level'}")
        elif reported < planned:
            complete = False
            frame.results.append(
                KtapTest(
                    name=f"#{reported + 1}",
                    status=Status.CRASH,
                    number=reported + 1,
                    reason=f"output ended before test {reported + 1} of {planned} reported (crashed or hung)",
                    log=frame.pending_log,
                )
            )
            frame.pending_log = []
            err(lineno, f"output ended after {reported} of {planned} planned tests")
        stack.pop()
        deepest = False
        if not stack:
            doc.tests = frame.results
            if doc.plan is None:
                doc.plan = frame.plan
            break
        parent = stack[-1]
        complete = False
        # The parent's test in progress is the one whose subtests these were.
        n = len(parent.results) + 1
        parent.results.append(
            KtapTest(
                name=frame.name or f"#{n}",
                status=Status.CRASH,
                number=n,
                reason=(
                    f"output ended inside this test after {reported} of "
                    f"{planned if planned is not None else '?'} subtests"
                ),
                log=frame.pending_log,
                subtests=frame.results,
                plan=planned,
            )
        )
        frame.pending_log = []
    doc.complete = complete and not any(t.status is Status.CRASH for _, t in doc.walk())
    return doc
