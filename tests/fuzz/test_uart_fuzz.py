"""The 16550 UART against its reference model (stateful; runs under HypoFuzz unchanged)."""

from hypothesis import settings

from pytest_microvm.fuzz.stateful.uart import UartMachine

TestUart = UartMachine.TestCase
# The UART is the cheapest target (thousands of steps per second): five times the
# profile's examples cost seconds and reach interrupt sequences (ETBEI, then a THR
# write, then IIR) that the plain budget can miss.
TestUart.settings = settings(settings.default, max_examples=5 * settings.default.max_examples)
