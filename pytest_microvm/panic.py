"""Watch a console for guest panic lines and end the VM at once when one appears.

A panicking guest often spins forever; waiting for the VM's timeout would
waste it and hide the reason.  The watcher is a ConsoleLog listener: it keeps
the current partial line (bounded) and checks each completed line against the
patterns, so it costs a substring test per chunk of output.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Callable

#: Longest line kept for matching; longer lines are matched on their first bytes.
MAX_LINE = 4096


class PanicWatcher:
    def __init__(self, patterns: Sequence[str], on_panic: Callable[[str], None]) -> None:
        self._regexes = [re.compile(p.encode() if isinstance(p, str) else p) for p in patterns]
        self._on_panic = on_panic
        self._line = bytearray()
        self._lock = threading.Lock()
        #: The first panic line seen, decoded.
        self.panic_line: str | None = None

    def feed(self, data: bytes) -> None:
        if self.panic_line is not None or not self._regexes:
            return
        hit = None
        with self._lock:
            start = 0
            while True:
                nl = data.find(b"\n", start)
                if nl < 0:
                    room = MAX_LINE - len(self._line)
                    if room > 0:
                        self._line += data[start : start + room]
                    break
                room = MAX_LINE - len(self._line)
                if room > 0:
                    self._line += data[start : min(nl, start + room)]
                line = bytes(self._line).rstrip(b"\r")
                self._line.clear()
                start = nl + 1
                if any(r.search(line) for r in self._regexes):
                    hit = line.decode("utf-8", "replace")
                    self.panic_line = hit
                    break
        if hit is not None:
            self._on_panic(hit)
