"""Find and build the reference tiny guests (guests/tiny in the source tree).

The kit's build driver lives with its sources (guests/tiny/build.py); this
module only locates it, so `microvm guest build`, the pytest plugin and bench/
share one cached build.  MICROVM_GUEST_KIT points at another kit directory.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from .errors import VmmError


def kit_dir() -> Path:
    env = os.environ.get("MICROVM_GUEST_KIT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "guests" / "tiny"


def _import(path: Path, name: str) -> ModuleType:
    """Import a build script by file path (once per process)."""
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    if not path.is_file():
        raise VmmError(
            f"{path} is missing: install pytest-microvm from its source tree (guests/ lives there), "
            "or set MICROVM_GUEST_KIT to the tiny-guest kit directory"
        )
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def kit() -> ModuleType:
    """The tiny-guest kit's build module."""
    return _import(kit_dir() / "build.py", "microvm_tiny_guest_build")


def debian_linux():
    """Debian's cloud kernel + the reference busybox initramfs (guests/linux; fetched with apt, cached)."""
    return _import(kit_dir().parent / "linux" / "build.py", "microvm_linux_guest_build").build()


def build_tiny(names: list[str] | None = None) -> dict[str, Path]:
    return kit().build(names)


def tiny_guest(name: str, fmt: str = "pvh") -> Path:
    """Path of a built tiny guest (building the kit first if needed)."""
    return kit().guest_path(name, fmt)
