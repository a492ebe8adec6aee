import pytest

from vmm.vcpu import describe_instruction


@pytest.mark.parametrize(
    "insn,name",
    [
        ("dbe3", "fninit"),
        ("9bdbe3", "fninit"),
        ("cc", "int3"),
        ("480fc70e", "cmpxchg16b"),
        ("f0480fc74d20", "cmpxchg16b"),
        ("0fae2f", "xrstor"),
        ("480fae2f", "xrstor"),
        ("0fae27", "xsave"),
    ],
)
def test_known_unemulated_instructions(insn, name):
    assert name in describe_instruction(bytes.fromhex(insn))


def test_unknown_instruction():
    assert describe_instruction(b"\x90") == "an instruction the host cannot emulate"
