"""Shared fixtures for the plugin's own tests (pytester runs pytest on small test files)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # pytester provides the `pytester` fixture; registering it here keeps it local to these tests.
    if not config.pluginmanager.has_plugin("pytester"):
        config.pluginmanager.import_plugin("pytester")


@pytest.fixture
def tiny():
    """Path of a built tiny guest: tiny("echo")."""
    from vmm.guestkit import tiny_guest

    return tiny_guest


@pytest.fixture(autouse=True)
def _shared_guest_cache(monkeypatch):
    """pytester points HOME at a temporary directory; keep using the one built-guest cache."""
    from vmm.cache import cache_root

    monkeypatch.setenv("MICROVM_CACHE_DIR", str(cache_root()))
