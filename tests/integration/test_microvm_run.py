"""`microvm run` end to end: the tiny guests through every entry protocol, on real KVM.

The CLI runs as a separate process, exactly as a user runs it; what is checked
is its stdout (guest serial output), its exit status, its stderr (one line
naming the problem) and the --summary-json file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vmm.guestkit import kit, tiny_guest

FORMATS = ("pvh", "bzimage", "multiboot")


def microvm(*args: str, timeout: float = 60, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vmm.cli", "run", *args],
        capture_output=True,
        timeout=timeout,
        input=stdin,
        check=False,
    )


@pytest.mark.parametrize("vcpus", [1, 2, 4])
@pytest.mark.parametrize("fmt", FORMATS)
def test_bootcheck_passes(fmt, vcpus, tmp_path):
    initrd = tmp_path / "initrd.img"
    data = os.urandom(150_000)
    initrd.write_bytes(data)
    mem = 192
    append = f"vcpus={vcpus} mem_mib={mem} {kit().initrd_cmdline(data)}"
    summary = tmp_path / "summary.json"
    p = microvm(
        "--kernel", str(tiny_guest("bootcheck", fmt)), "--initrd", str(initrd), "--mem", str(mem),
        "--vcpus", str(vcpus), "--append", append, "--timeout", "30", "--summary-json", str(summary),
    )
    out = p.stdout.decode()
    assert p.returncode == 0, out + p.stderr.decode()
    assert "# bootcheck: 0 of" in out and "not ok" not in out
    if vcpus > 1:
        assert f"{vcpus - 1} of {vcpus - 1} APs" in out
    s = json.loads(summary.read_text())
    assert s["exit"]["reason"] == "guest-exit" and s["guest_exit_code"] == 0
    assert s["boot"]["protocol"] == {"pvh": "pvh", "bzimage": "linux-bzimage", "multiboot": "multiboot"}[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_hello_summary(fmt, tmp_path):
    summary = tmp_path / "s.json"
    p = microvm("--kernel", str(tiny_guest("hello", fmt)), "--summary-json", str(summary))
    assert p.returncode == 0
    assert b"Hello from tiny guest" in p.stdout
    s = json.loads(summary.read_text())
    assert 0 < s["boot_time_s"] <= s["wall_time_s"]
    assert s["exits"]["io"] > 0
    assert s["peak_rss_kib"] > 0
    assert s["process_exit_code"] == 0


@pytest.mark.parametrize("code", [0, 1, 42, 249])
def test_guest_exit_code_is_process_exit_code(code):
    p = microvm("--kernel", str(tiny_guest("exitcode")), "--append", f"code={code}")
    assert p.returncode == code
    assert p.stderr == b""


def test_triple_fault_code_and_reason():
    p = microvm("--kernel", str(tiny_guest("triple")))
    assert p.returncode == 250
    err = p.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "triple-fault" in err[0] and "RIP 0x" in err[0]


def test_timeout_code_and_reason():
    p = microvm("--kernel", str(tiny_guest("panic")), "--timeout", "0.5")
    assert p.returncode == 253
    assert b"Kernel panic" in p.stdout
    assert p.stderr.decode().strip() == "microvm: timeout: the VM ran longer than its timeout of 0.5 s"


def test_serial_input_from_stdin():
    p = microvm("--kernel", str(tiny_guest("echo")), "--timeout", "20", stdin=b"hello there\nexit 7\n")
    assert b"echo: hello there" in p.stdout
    assert p.returncode == 7


@pytest.mark.parametrize(
    "make,expect",
    [
        (lambda d: d[:0x1000], "truncated"),
        (lambda d: b"\0" * len(d), "not a kernel image"),
        (lambda d: d[:0x202] + b"XXXX" + d[0x206:], "not a kernel image"),
        (lambda d: d[:0x206] + b"\x00\x02" + d[0x208:], "version is 2.00"),
    ],
    ids=["truncated", "zeroes", "bad-header-magic", "old-protocol"],
)
def test_malformed_bzimage_one_line_error(make, expect, tmp_path):
    bad = tmp_path / "bad.bzImage"
    bad.write_bytes(make(tiny_guest("hello", "bzimage").read_bytes()))
    p = microvm("--kernel", str(bad))
    err = p.stderr.decode().strip().splitlines()
    assert p.returncode == 254
    assert len(err) == 1, err
    assert str(bad) in err[0] and expect in err[0], err[0]


def test_elf_without_usable_entry(tmp_path):
    data = bytearray(tiny_guest("hello", "pvh").read_bytes())
    # Drop the PVH note's owner and point e_entry outside every segment.
    data[data.find(b"Xen\0")] = ord("Y")
    data[24:32] = (0xDEAD0000).to_bytes(8, "little")
    bad = tmp_path / "noentry.elf"
    bad.write_bytes(bytes(data))
    p = microvm("--kernel", str(bad))
    assert p.returncode == 254
    err = p.stderr.decode().strip()
    assert str(bad) in err and "entry" in err


def test_initrd_too_large(tmp_path):
    big = tmp_path / "big.img"
    big.write_bytes(b"\0" * (40 << 20))
    p = microvm("--kernel", str(tiny_guest("hello")), "--initrd", str(big), "--mem", "32")
    assert p.returncode == 254
    err = p.stderr.decode().strip()
    assert "big.img" in err and "32" in err


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--kernel", "/nonexistent/bzImage"], "--kernel: /nonexistent/bzImage does not exist"),
        (["--vcpus", "0"], "--vcpus"),
        (["--mem", "abc"], "--mem"),
        (["--timeout", "-3"], "--timeout"),
        (["--disk", "/nonexistent.img"], "--disk"),
    ],
)
def test_bad_options(args, expect):
    if args[0] != "--kernel":
        args = ["--kernel", str(tiny_guest("hello")), *args]
    p = microvm(*args)
    assert p.returncode in (2, 254)
    assert expect in p.stderr.decode()


def test_missing_kvm_device_is_a_clear_error(tmp_path):
    p = microvm("--kernel", str(tiny_guest("hello")), "--kvm", str(tmp_path / "kvm"))
    assert p.returncode == 254
    err = p.stderr.decode().strip()
    assert len(err.splitlines()) == 1
    assert f"{tmp_path / 'kvm'} does not exist" in err and "modprobe kvm" in err


def test_unusable_kvm_device_is_a_clear_error(tmp_path):
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    fake.chmod(0)
    p = microvm("--kernel", str(tiny_guest("hello")), "--kvm", str(fake))
    assert p.returncode == 254
    err = p.stderr.decode().strip()
    # Without root: a permission error; as root, the file opens and is then not a KVM device.
    assert str(fake) in err and ("is not accessible" in err or "is not a KVM device" in err), err
