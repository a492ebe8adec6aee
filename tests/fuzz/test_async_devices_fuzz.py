"""virtio-console, virtio-net and virtio-vsock (worker threads, host sides) under the safety oracles."""

from pytest_microvm.fuzz.stateful.async_devices import ConsoleMachine, NetMachine, VsockMachine

TestConsole = ConsoleMachine.TestCase
TestNet = NetMachine.TestCase
TestVsock = VsockMachine.TestCase
