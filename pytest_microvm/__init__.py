"""pytest-microvm: a fresh microVM per test, guest results as pytest results."""

__version__ = "0.1.0"
