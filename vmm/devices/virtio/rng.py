"""virtio-rng, the entropy device (virtio 1.2 §5.4).

Every device-writable buffer the driver offers is filled with bytes from the
host's CSPRNG (``os.urandom``, i.e. getrandom(2)), up to a fixed amount per
request: §5.4.6.1 lets the device "use less than the entire buffer length",
and the used length tells the driver how much it got.  That bound keeps the
work and the host buffer of one notification at most queue size x
``max_bytes``, whatever lengths the guest writes into its descriptors.

Device-readable buffers are a driver error (§5.4.6.1 "MUST NOT"); they are
ignored and counted.  A chain with no writable byte is returned with a used
length of 0 and counted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Callable

from .device import VIRTIO_ID_RNG, VirtioDevice

DEFAULT_QUEUE_SIZE = 64
#: At most this many random bytes per request.
DEFAULT_MAX_BYTES = 64 * 1024


class VirtioRng(VirtioDevice):
    """An entropy device; ``source(n)`` returns ``n`` random bytes (default ``os.urandom``)."""

    device_id = VIRTIO_ID_RNG
    name = "rng"

    def __init__(
        self,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_bytes: int = DEFAULT_MAX_BYTES,
        source: Callable[[int], bytes] = os.urandom,
    ) -> None:
        super().__init__()
        if max_bytes <= 0:
            raise ValueError(f"virtio-rng: max_bytes must be positive, not {max_bytes}")
        self.queue_size = queue_size
        self.max_bytes = max_bytes
        self._source = source

    def queue_max_sizes(self) -> Sequence[int]:
        return (self.queue_size,)

    def handle_queue(self, index: int) -> None:
        assert self.link is not None
        q = self.link.queues[index]
        m = self.metrics
        for chain in q.drain():
            m.requests += 1
            if chain.readable_len:
                m.error("readable-buffer")
            n = min(chain.writable_len, self.max_bytes)
            if n == 0:
                m.error("no-writable-buffer")
            else:
                data = self._source(n)
                if len(data) != n:
                    raise RuntimeError(f"virtio-rng: entropy source returned {len(data)} bytes, not {n}")
                chain.write(0, data)
                m.bytes_written += n
            q.add_used(chain, n)
