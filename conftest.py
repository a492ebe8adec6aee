"""Project-wide test configuration: Hypothesis profiles.

- ci: bounded and deterministic, the default: part of every test run.
- dev: more examples, still quick (HYPOTHESIS_PROFILE=dev or --hypothesis-profile=dev).
- campaign: long runs (`microvm fuzz` and `-m campaign`).
"""

from __future__ import annotations

import os

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
