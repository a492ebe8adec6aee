"""COM1, the i8042, debug-exit, boot-timer and ACPI ports on one port bus, against their models."""

from pytest_microvm.fuzz.stateful.legacy import LegacyPortsMachine

TestLegacyPorts = LegacyPortsMachine.TestCase
