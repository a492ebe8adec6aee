"""virtio-mmio devices behind the transport, against the transport, ring and device models."""

from pytest_microvm.fuzz.stateful.virtio import BlkMachine, BlkReadOnlyMachine, RngMachine, VirtioMachine

TestTransport = VirtioMachine.TestCase
TestRng = RngMachine.TestCase
TestBlk = BlkMachine.TestCase
TestBlkReadOnly = BlkReadOnlyMachine.TestCase
