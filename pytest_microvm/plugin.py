"""The pytest11 entry point of pytest-microvm (options, fixtures, hooks)."""
