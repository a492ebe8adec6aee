"""The 16550 UART against its reference model (stateful; runs under HypoFuzz unchanged)."""

from pytest_microvm.fuzz.stateful.uart import UartMachine

TestUart = UartMachine.TestCase
