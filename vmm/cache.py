"""The on-disk cache shared by builds and downloads (keyed by content hashes).

One directory, ``$MICROVM_CACHE_DIR`` or ``$XDG_CACHE_HOME/pytest-microvm``
(``~/.cache/pytest-microvm``).  Entries are produced at most once even when
several processes (pytest-xdist workers) ask at the same time: the producer
holds an fcntl lock and publishes its result with an atomic rename.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    env = os.environ.get("MICROVM_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-microvm"


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``.lock, across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def produce_file(dest: Path, make: Callable[[Path], None]) -> Path:
    """Return ``dest``, calling ``make(tmp_path)`` to create it first if missing."""
    if dest.exists():
        return dest
    with locked(dest):
        if dest.exists():
            return dest
        fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", dir=dest.parent)
        os.close(fd)
        try:
            make(Path(tmp))
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return dest


def produce_dir(dest: Path, make: Callable[[Path], None]) -> Path:
    """Return directory ``dest``, calling ``make(tmp_dir)`` to fill it first if missing."""
    if dest.is_dir():
        return dest
    with locked(dest):
        if dest.is_dir():
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        try:
            make(tmp)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest
