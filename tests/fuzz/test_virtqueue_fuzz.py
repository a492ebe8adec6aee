"""The split virtqueue on its own, against the chain parser model and the ring rules."""

from pytest_microvm.fuzz.stateful.virtqueue import VirtqueueMachine

TestVirtqueue = VirtqueueMachine.TestCase
