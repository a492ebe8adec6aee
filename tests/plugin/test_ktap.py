"""Unit tests of pytest_microvm.ktap (no pytest plugin, no VM)."""

from __future__ import annotations

import textwrap

from hypothesis import given
from hypothesis import strategies as st

from pytest_microvm import ktap
from pytest_microvm.ktap import Status


def doc(text: str) -> ktap.KtapDocument:
    return ktap.parse(textwrap.dedent(text).lstrip("\n"))


def flat(d: ktap.KtapDocument) -> list[tuple[str, str]]:
    return [("::".join(path), t.status.value) for path, t in ktap.reportable(d)]


NESTED = """
    KTAP version 1
    1..2
        KTAP version 1
        # Subtest: alloc
        1..3
        ok 1 kmalloc_small
        # kmalloc_large: EXPECTATION FAILED at mm/test.c:42
        not ok 2 kmalloc_large
        ok 3 kmalloc_zero # SKIP zero-size allocations are not supported
    not ok 1 alloc
        KTAP version 1
        # Subtest: free
        1..1
        ok 1 kfree_null
    ok 2 free
"""


def test_nested_suites_report_each_case():
    d = doc(NESTED)
    assert d.version == "KTAP version 1" and d.plan == 2
    assert d.complete and not d.errors
    assert flat(d) == [
        ("alloc::kmalloc_small", "pass"),
        ("alloc::kmalloc_large", "fail"),
        ("alloc::kmalloc_zero", "skip"),
        ("free::kfree_null", "pass"),
    ]
    assert not d.ok
    assert d.counts() == {"pass": 2, "fail": 1, "skip": 1, "xfail": 0, "crash": 0}


def test_skip_reason_and_diagnostics_belong_to_their_case():
    d = doc(NESTED)
    cases = {path[-1]: t for path, t in d.walk()}
    assert cases["kmalloc_zero"].reason == "zero-size allocations are not supported"
    assert cases["kmalloc_zero"].directive == "SKIP"
    assert cases["kmalloc_large"].log == ["# kmalloc_large: EXPECTATION FAILED at mm/test.c:42"]
    assert cases["kmalloc_small"].log == []
    assert cases["alloc"].plan == 3 and len(cases["alloc"].subtests) == 3


def test_output_ending_mid_suite_crashes_the_running_case_and_the_suite():
    d = doc(
        """
        KTAP version 1
        1..1
            KTAP version 1
            # Subtest: tiny
            1..3
            ok 1 case_1
            # case_2: expected success, got failure on request
            not ok 2 case_2
            Oops: general protection fault
        """
    )
    assert not d.complete
    assert flat(d) == [("tiny::case_1", "pass"), ("tiny::case_2", "fail"), ("tiny::#3", "crash")]
    crashed = [t for _, t in d.walk() if t.status is Status.CRASH]
    assert [t.name for t in crashed] == ["tiny", "#3"]
    assert crashed[1].log == ["Oops: general protection fault"]
    assert "2 of 3" in crashed[0].reason
    assert any("output ended after 2 of 3" in e for e in d.errors)


def test_output_ending_after_the_last_case_crashes_the_suite_only():
    d = doc(
        """
        KTAP version 1
        1..1
            KTAP version 1
            # Subtest: tiny
            1..2
            ok 1 a
            ok 2 b
        """
    )
    assert not d.complete
    # No case failed, so the suite's crash is reported on its own.
    assert flat(d) == [("tiny::a", "pass"), ("tiny::b", "pass"), ("tiny", "crash")]


def test_flat_tap_truncated_at_top_level():
    d = doc(
        """
        TAP version 14
        1..3
        ok 1 - first
        not ok 2 - second # TIMEOUT took too long
        """
    )
    assert d.version == "TAP version 14"
    assert flat(d) == [("first", "pass"), ("second", "fail"), ("#3", "crash")]


def test_todo_and_xfail_make_not_ok_expected():
    d = doc(
        """
        KTAP version 1
        1..3
        not ok 1 known_bug # TODO fix the allocator
        ok 2 fixed_bug # XFAIL
        not ok 3 broken # ERROR
        """
    )
    assert flat(d) == [("known_bug", "xfail"), ("fixed_bug", "pass"), ("broken", "fail")]


def test_kernel_timestamps_and_interleaved_log_lines_are_tolerated():
    d = ktap.parse(
        "[    0.000000] Linux version 6.1\n"
        "[    1.100000] KTAP version 1\n"
        "[    1.100001] 1..1\n"
        "[    1.100002]     KTAP version 1\n"
        "[    1.100003]     # Subtest: s\n"
        "[    1.100004]     1..1\n"
        "[    1.200000] random: crng init done\n"
        "[    1.300000]     ok 1 c\n"
        "[    1.300001] ok 1 s\n"
    )
    assert d.complete and flat(d) == [("s::c", "pass")]
    assert next(t for p, t in d.walk() if p == ("s", "c")).log == ["random: crng init done"]


def test_no_ktap_in_the_output():
    d = ktap.parse("hello\nworld\nok 1 not a tap doc without a header\n")
    assert not d.found and d.tests == [] and not d.complete


def test_wrong_numbers_and_missing_plan_are_errors_not_exceptions():
    d = doc(
        """
        KTAP version 1
        ok 1 a
        ok 3 b
        """
    )
    assert flat(d) == [("a", "pass"), ("b", "pass")]
    assert any("test number 3, expected 2" in e for e in d.errors)
    assert any("no plan" in e for e in d.errors)
    assert not d.complete


def test_malformed_lines_become_log_and_names_default_to_numbers():
    d = doc(
        """
        KTAP version 1
        1..2
        ok
        okay 2 not a result line
        not ok 2
        """
    )
    assert flat(d) == [("#?", "pass"), ("#2", "fail")]
    assert d.tests[1].log == ["okay 2 not a result line"]


def test_subtest_without_version_line_and_second_document():
    d = doc(
        """
        KTAP version 1
        1..1
            1..1
            ok 1 inner
        ok 1 outer
        KTAP version 1
        1..1
        not ok 1 ignored
        """
    )
    assert flat(d) == [("outer::inner", "pass")]
    assert any("without a version line" in e for e in d.errors)
    assert any("second KTAP document" in e for e in d.errors)


def test_empty_plan_and_bytes_input():
    d = ktap.parse(b"KTAP version 1\r\n1..0\r\n")
    assert d.complete and d.tests == [] and d.ok


def test_subtest_name_from_header_comment_fills_an_unnamed_result():
    d = doc(
        """
        KTAP version 1
        1..1
            KTAP version 1
            # Subtest: named
            1..1
            ok 1 c
        ok 1
        """
    )
    assert flat(d) == [("named::c", "pass")]


@given(st.text(alphabet=st.sampled_from(list("ok not 12.#\n KTAPversion\tSKIP-")), max_size=400))
def test_parser_never_raises_on_garbage(text):
    d = ktap.parse("KTAP version 1\n" + text)
    for _, t in d.walk():
        assert isinstance(t.status, Status)


@given(st.lists(st.sampled_from(["pass", "fail", "skip"]), max_size=12), st.integers(min_value=0, max_value=12))
def test_truncation_at_any_line_reports_only_what_was_printed(results, stop):
    words = {"pass": "ok {n} c{n}", "fail": "not ok {n} c{n}", "skip": "ok {n} c{n} # SKIP r"}
    lines = ["KTAP version 1", "1..1", "    KTAP version 1", "    # Subtest: s", f"    1..{len(results)}"]
    lines += ["    " + words[r].format(n=i + 1) for i, r in enumerate(results)]
    lines.append("not ok 1 s" if "fail" in results else "ok 1 s")
    cut = min(stop, len(results))
    d = ktap.parse("\n".join(lines[: 5 + cut]))
    got = flat(d)
    assert got[:cut] == [(f"s::c{i + 1}", results[i]) for i in range(cut)]
    if cut < len(results):
        assert got[cut:] == [(f"s::#{cut + 1}", "crash")]
    else:
        assert got[cut:] == ([] if "fail" in results else [("s", "crash")])
    assert not d.complete
