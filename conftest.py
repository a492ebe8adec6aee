"""Project-wide test configuration: Hypothesis profiles, and strict mode.

MICROVM_STRICT=1 (set by .ci/run) turns every skipped test into a failure:
tests skip only when the machine lacks something (QEMU, iasl, a tap device, a
compiler), and a CI machine that lacks it must fail loudly.  The one exception
is test data that lives outside the repository (the Hermit images), which
.ci/run looks for and warns about.

- ci: bounded and deterministic, the default: part of every test run.
- dev: more examples, still quick (HYPOTHESIS_PROFILE=dev or --hypothesis-profile=dev).
- campaign: long runs (`microvm fuzz` and `-m campaign`).
"""

from __future__ import annotations

import os

import pytest

try:
    from hypothesis import HealthCheck, Phase, settings
except ImportError:  # hypothesis is an optional extra
    settings = None

if settings is not None:
    settings.register_profile(
        "ci",
        max_examples=60,
        derandomize=True,
        # No "explain" phase: it re-runs a failure under a line tracer, which costs minutes on
        # the stateful device fuzzers and adds nothing the falsifying program does not show.
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        # One bug at a time: shrinking several distinct failures of a broken device takes minutes.
        report_multiple_bugs=False,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile("dev", max_examples=200, deadline=None, print_blob=True)
    settings.register_profile(
        "campaign",
        max_examples=1_000_000,
        deadline=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


#: Skip reasons strict mode still allows: test data kept outside the repository.
STRICT_ALLOWED_SKIPS = ("Hermit test image",)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("MICROVM_STRICT") != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if any(allowed in reason for allowed in STRICT_ALLOWED_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = f"MICROVM_STRICT=1: this test skipped ({reason}); this machine lacks something it needs"
