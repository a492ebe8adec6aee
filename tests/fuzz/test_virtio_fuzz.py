from pytest_microvm.fuzz.stateful.virtio import VirtioMachine, RngMachine, BlkMachine, BlkReadOnlyMachine
TestTransport = VirtioMachine.TestCase
TestRng = RngMachine.TestCase
TestBlk = BlkMachine.TestCase
TestBlkRo = BlkReadOnlyMachine.TestCase
