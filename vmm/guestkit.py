"""Find and build the reference tiny guests (guests/tiny in the source tree).

The kit's build driver lives with its sources (guests/tiny/build.py); this
module only locates it, so `microvm guest build`, the pytest plugin and bench/
share one cached build.  MICROVM_GUEST_KIT points at another kit directory.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

from .errors import VmmError


def kit_dir() -> Path:
    env = os.environ.get("MICROVM_GUEST_KIT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "guests" / "tiny"


_module: ModuleType | None = None


def kit() -> ModuleType:
    """The kit's build module, imported by file path."""
    global _module
    if _module is None:
        path = kit_dir() / "build.py"
        if not path.is_file():
            raise VmmError(
                f"the tiny-guest kit is not at {path.parent} (install pytest-microvm from its source "
                "tree, or set MICROVM_GUEST_KIT to the kit directory)"
            )
        spec = importlib.util.spec_from_file_location("microvm_tiny_guest_build", path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _module = mod
    return _module


def build_tiny(names: list[str] | None = None) -> dict[str, Path]:
    return kit().build(names)


def tiny_guest(name: str, fmt: str = "pvh") -> Path:
    """Path of a built tiny guest (building the kit first if needed)."""
    return kit().guest_path(name, fmt)
