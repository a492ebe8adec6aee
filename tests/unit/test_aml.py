"""The AML encoder: byte-exact encodings, a decoder round trip, and iasl as a second opinion."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from vmm.acpi import aml
from vmm.acpi.amldecode import AmlDecodeError, _Reader, decode_resources, decode_terms
from vmm.acpi.dsdt import Dsdt, build_dsdt, mmio_device
from vmm.boot.types import MmioDeviceInfo


# ---- PkgLength -----------------------------------------------------------------
@pytest.mark.parametrize(
    "payload, encoded",
    [
        (0, b"\x01"),
        (62, b"\x3f"),  # 63 total: the largest one-byte length
        (63, b"\x41\x04"),  # 65 total = 0x41: two bytes, low nibble 1, next byte 4
        (0xFFD, b"\x4f\xff"),  # 0xFFF total: largest two-byte length
        (0xFFE, b"\x81\x00\x01"),  # 0x1001 total
        (0xFFFFC, b"\x8f\xff\xff"),  # 0xFFFFF total: largest three-byte length
        (0xFFFFD, b"\xc1\x00\x00\x01"),
    ],
)
def test_pkg_length(payload, encoded):
    assert aml.pkg_length(payload) == encoded
    r = _Reader(encoded + bytes(payload))
    assert r.pkg_end() == len(encoded) + payload


def test_pkg_length_limit():
    with pytest.raises(ValueError):
        aml.pkg_length(1 << 28)


# ---- names ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, encoded",
    [
        ("COM1", b"COM1"),
        ("_S5", b"_S5_"),
        ("\\_SB_", b"\\_SB_"),
        ("\\_SB_.COM1", b"\\\x2e_SB_COM1"),
        ("\\_SB_.PCI0.VR00", b"\\\x2f\x03_SB_PCI0VR00"),
        ("^^PARN", b"^^PARN"),
        ("\\", b"\\\x00"),
    ],
)
def test_name_string(name, encoded):
    assert aml.name_string(name) == encoded


@pytest.mark.parametrize("bad", ["com1", "1ABC", "ABCDE", "A-B", ""])
def test_bad_name_segments(bad):
    with pytest.raises(ValueError):
        aml.name_seg(bad)


# ---- data objects -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (2, b"\x0a\x02"),
        (0xFF, b"\x0a\xff"),
        (0x100, b"\x0b\x00\x01"),
        (0x3F8, b"\x0b\xf8\x03"),
        (0x10000, b"\x0c\x00\x00\x01\x00"),
        (0xD000_0000, b"\x0c\x00\x00\x00\xd0"),
        (0x1_0000_0000, b"\x0e" + (1 << 32).to_bytes(8, "little")),
    ],
)
def test_integers(value, encoded):
    assert aml.Integer(value).encode() == encoded
    assert decode_terms(aml.Name("X", value).encode()) == [aml.Name("X___", aml.Integer(value))]


def test_integer_range():
    with pytest.raises(ValueError):
        aml.Integer(-1).encode()
    with pytest.raises(ValueError):
        aml.Integer(1 << 64).encode()


def test_string():
    assert aml.String("LNRO0005").encode() == b"\x0dLNRO0005\x00"
    with pytest.raises(ValueError):
        aml.String("caf\u00e9").encode()


@pytest.mark.parametrize(
    "eisa, value",
    [("PNP0501", 0x0105D041), ("PNP0303", 0x0303D041), ("PNP0A03", 0x030AD041), ("QEMU0002", None)],
)
def test_eisaid(eisa, value):
    if value is None:
        with pytest.raises(ValueError):
            aml.EisaId(eisa).as_int()
        assert isinstance(aml.hardware_id(eisa), aml.String)
    else:
        assert aml.EisaId(eisa).as_int() == value
        assert aml.EisaId(eisa).encode() == b"\x0c" + value.to_bytes(4, "little")
        assert aml.hardware_id(eisa) == aml.EisaId(eisa)


def test_buffer_and_package():
    assert aml.Buffer(b"\xaa\xbb").encode() == b"\x11\x05\x0a\x02\xaa\xbb"
    assert aml.Package([5, 0]).encode() == b"\x12\x05\x02\x0a\x05\x00"
    nested = aml.Package([1, "A", [2, 3], b"\x01"])
    assert decode_terms(aml.Name("PKG", nested).encode()) == [
        aml.Name(
            "PKG_",
            aml.Package(
                [aml.Integer(1), aml.String("A"), aml.Package([aml.Integer(2), aml.Integer(3)]), aml.Buffer(b"\x01")]
            ),
        )
    ]


def test_method_returning_a_constant():
    m = aml.Method.returning("_STA", 0x0F)
    assert m.encode() == b"\x14\x09_STA\x00\xa4\x0a\x0f"
    assert decode_terms(m.encode()) == [aml.Method("_STA", [aml.Return(aml.Integer(0x0F))])]
    assert aml.Method("SRLZ", [], args=2, serialized=True).encode()[-1] == 0x0A


def test_device_in_scope_exact_bytes():
    dev = aml.Scope("\\_SB_", [aml.Device("DEV0", [aml.Name("_UID", 0)])])
    assert dev.encode() == (
        b"\x10\x13\\_SB_"  # Scope, PkgLength 0x13, \_SB_
        + b"\x5b\x82\x0b"
        + b"DEV0"  # Device, PkgLength 11
        + b"\x08_UID\x00"
    )


# ---- resource templates ----------------------------------------------------------
def test_resource_descriptors_exact_bytes():
    assert aml.Io(0x3F8, 0x3F8, 1, 8).descriptor() == b"\x47\x01\xf8\x03\xf8\x03\x01\x08"
    assert aml.Memory32Fixed(0xD000_0000, 0x1000).descriptor() == b"\x86\x09\x00\x01\x00\x00\x00\xd0\x00\x10\x00\x00"
    assert aml.Interrupt((5,)).descriptor() == b"\x89\x06\x00\x03\x01\x05\x00\x00\x00"
    assert aml.Interrupt((9, 10), edge=False, active_low=True, shared=True).descriptor() == (
        b"\x89\x0a\x00\x0d\x02\x09\x00\x00\x00\x0a\x00\x00\x00"
    )


def test_resource_template_round_trip():
    descs = [aml.Io(0x60, 0x60, 1, 1), aml.Memory32Fixed(0xFEC0_0000, 0x1000, writable=False), aml.Interrupt((4,))]
    encoded = aml.ResourceTemplate(descs).encode()
    (buf,) = [t.value for t in decode_terms(aml.Name("_CRS", aml.ResourceTemplate(descs)).encode())]
    assert buf.data.endswith(b"\x79\x00")
    assert decode_resources(buf.data) == descs
    assert encoded[0] == aml.BUFFER_OP


def test_resource_template_without_end_tag():
    with pytest.raises(AmlDecodeError, match="end tag"):
        decode_resources(aml.Io(1, 1, 1, 1).descriptor())


# ---- the machine's DSDT contents ----------------------------------------------------
def sb_devices(dsdt: Dsdt) -> dict[str, list]:
    body = dsdt.encode()[36:]
    terms = decode_terms(body)
    (scope,) = [t for t in terms if isinstance(t, aml.Scope)]
    assert scope.name == "\\_SB_"
    return {d.name: d.children for d in scope.children}


def named(children, name):
    (value,) = [c for c in children if getattr(c, "name", None) == name]
    return value


def test_uart_device():
    devs = sb_devices(build_dsdt(serial_ports=[(0x3F8, 4)], mmio_devices=[], i8042=False))
    com1 = devs["COM1"]
    assert named(com1, "_HID").value == aml.Integer(aml.EisaId("PNP0501").as_int())
    assert named(com1, "_STA") == aml.Method("_STA", [aml.Return(aml.Integer(0x0F))])
    crs = decode_resources(named(com1, "_CRS").value.data)
    assert crs == [aml.Io(0x3F8, 0x3F8, 1, 8), aml.Interrupt((4,), edge=True, active_low=False, shared=False)]


def test_virtio_devices():
    mmio = [MmioDeviceInfo(0xD000_0000 + i * 0x1000, 0x1000, 5 + i) for i in range(3)]
    mmio.append(MmioDeviceInfo(0xD000_8000, 0x200, 12, name="BLK0"))
    devs = sb_devices(build_dsdt(serial_ports=[], mmio_devices=mmio, i8042=False))
    assert list(devs) == ["VR00", "VR01", "VR02", "BLK0"]
    for i, name in enumerate(devs):
        dev = devs[name]
        assert named(dev, "_HID").value == aml.String("LNRO0005")
        assert named(dev, "_UID").value == aml.Integer(i)
        crs = decode_resources(named(dev, "_CRS").value.data)
        assert crs == [aml.Memory32Fixed(mmio[i].base, mmio[i].size), aml.Interrupt((mmio[i].gsi,))]


def test_i8042_device_only_when_present():
    assert "PS2K" not in sb_devices(build_dsdt(serial_ports=[], mmio_devices=[], i8042=False))
    ps2 = sb_devices(build_dsdt(serial_ports=[], mmio_devices=[], i8042=True))["PS2K"]
    assert named(ps2, "_HID").value == aml.Integer(aml.EisaId("PNP0303").as_int())
    assert decode_resources(named(ps2, "_CRS").value.data) == [
        aml.Io(0x60, 0x60, 1, 1),
        aml.Io(0x64, 0x64, 1, 1),
        aml.Interrupt((1,)),
    ]


def test_s5_package():
    terms = decode_terms(build_dsdt(serial_ports=[], mmio_devices=[], i8042=False).encode()[36:])
    s5 = named(terms, "_S5_")
    assert s5.value.elements[0] == aml.Integer(5)


def test_dsdt_is_extensible():
    dsdt = build_dsdt(serial_ports=[(0x3F8, 4)], mmio_devices=[], i8042=False)
    dsdt.add_device(aml.Device("RTC0", [aml.Name("_HID", aml.EisaId("PNP0B00"))]))
    dsdt.add(aml.Name("FLAG", 7))
    devs = sb_devices(dsdt)
    assert list(devs) == ["COM1", "RTC0"]
    assert named(decode_terms(dsdt.encode()[36:]), "FLAG").value == aml.Integer(7)
    extra = build_dsdt(serial_ports=[], mmio_devices=[], i8042=False, extra_devices=[aml.Device("PWRB", [])])
    assert "PWRB" in sb_devices(extra)


def test_duplicate_device_names_are_refused():
    dsdt = Dsdt()
    dsdt.add_device(mmio_device(0, 0xD000_0000, 0x1000, 5))
    dsdt.add_device(mmio_device(0, 0xD000_1000, 0x1000, 6))
    with pytest.raises(ValueError, match="VR00"):
        dsdt.encode()


# ---- iasl as a second opinion (optional) ---------------------------------------------
ASL = r"""
DefinitionBlock ("", "DSDT", 2, "PYMVM ", "PYMVDSDT", 1)
{
    Name (_S5, Package (0x04) { 0x05, Zero, Zero, Zero })
    Scope (\_SB)
    {
        Device (COM1)
        {
            Name (_HID, EisaId ("PNP0501"))
            Name (_UID, Zero)
            Method (_STA, 0, NotSerialized) { Return (0x0F) }
            Name (_CRS, ResourceTemplate ()
            {
                IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08, )
                Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 4 }
            })
        }
        Device (VR00)
        {
            Name (_HID, "LNRO0005")
            Name (_UID, Zero)
            Name (_CRS, ResourceTemplate ()
            {
                Memory32Fixed (ReadWrite, 0xD0000000, 0x00001000, )
                Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 5 }
            })
        }
    }
}
"""


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_compiles_the_same_bytes(tmp_path):
    (tmp_path / "dsdt.asl").write_text(ASL)
    # -oa: no optimizations (iasl would shorten \_SB_ to _SB_).
    subprocess.run(
        ["iasl", "-oa", "-p", str(tmp_path / "ref"), str(tmp_path / "dsdt.asl")], check=True, capture_output=True
    )
    ref = (tmp_path / "ref.aml").read_bytes()
    ours = build_dsdt(
        serial_ports=[(0x3F8, 4)], mmio_devices=[MmioDeviceInfo(0xD000_0000, 0x1000, 5)], i8042=False
    ).encode()
    assert ours[36:] == ref[36:]
