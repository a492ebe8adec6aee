"""Hypothesis fuzzing of the VMM's device models.

Importable pieces, each usable on its own:

``strategies``  Hypothesis strategies for what a hostile guest can send: port
                and MMIO accesses, virtqueue layouts and descriptor chains,
                virtio-blk requests, net frames, UART programs.
``tracing``     ``TracingGuestMemory``: the ``GuestMemory`` interface with every
                access recorded and memory hooks that edit RAM between two
                device reads.
``oracles``     what must hold beyond "it did not crash": allowed errors,
                write sets, bounded work, exactly-once completion, a watchdog
                and a host-memory bound.
``models``      small reference models (16550 UART, virtio-mmio transport,
                split-ring chain parser) the devices are compared with.
``stateful``    ``RuleBasedStateMachine``s per target; ``TARGETS`` names them.
``campaign``    the ``microvm fuzz`` command: long runs, a database, reproducers.

Nothing here runs at import time; Hypothesis is imported by the modules that
need it.
"""
