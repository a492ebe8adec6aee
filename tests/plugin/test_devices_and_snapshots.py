"""virtio devices through the marker and factory, and snapshots through the plugin."""

from __future__ import annotations

import pytest

from pytest_microvm import ExitReason, MicroVMError
from pytest_microvm.backends.qemu import qemu_device_args
from pytest_microvm.spec import SpecError, VmSpec, apply_overrides
from vmm.devices.virtio.spec import BlockSpec, ConsoleSpec, RngSpec


def test_device_arguments_parse_like_microvm_run(tmp_path):
    (tmp_path / "a.img").write_bytes(b"\0" * 4096)
    spec = apply_overrides(
        VmSpec(kernel="tiny:hello"),
        {"disk": ["a.img,ro", "a.img"], "rng": True, "console": "socket=/tmp/c.sock"},
        "marker",
        tmp_path,
    )
    assert spec.devices == (
        BlockSpec(str(tmp_path / "a.img"), read_only=True),
        BlockSpec(str(tmp_path / "a.img")),
        ConsoleSpec("/tmp/c.sock"),
        RngSpec(),
    )


@pytest.mark.parametrize(
    "args,message",
    [
        ({"disk": "x.img,bogus"}, "marker: --disk: unknown or malformed item 'bogus'"),
        ({"rng": "yes"}, "marker rng=: 'yes' is not True or False"),
        ({"disk": [3]}, "marker disk=: 3 is not a string"),
        ({"restore": "nowhere"}, "marker restore=: 'nowhere' is not a snapshot directory"),
    ],
)
def test_bad_device_arguments_name_themselves(tmp_path, args, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        apply_overrides(VmSpec(kernel="tiny:hello"), args, "marker", tmp_path)


def test_qemu_device_arguments():
    argv = qemu_device_args((BlockSpec("/d.img", read_only=True), RngSpec(), ConsoleSpec("/c.sock")))
    assert "if=none,id=disk0,file=/d.img,format=raw,readonly=on" in argv
    assert "virtio-rng-device,rng=rng1" in argv
    assert argv.count("virtio-serial-device") == 1 and "virtconsole,chardev=vcon2" in argv


@pytest.mark.parametrize("backend", ["kvm", "qemu"])
def test_devices_reach_the_vm(microvm_factory, tmp_path, backend):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    vm = microvm_factory(kernel="tiny:hello", backend=backend, disk=str(disk), rng=True).start()
    assert vm.wait().ok
    if backend == "kvm":
        devices = vm.metrics.get("devices") or vm.backend.machine.metrics()["devices"]
        assert {"virtio-blk0", "virtio-rng1"} <= set(devices)


def test_snapshot_and_restore_through_the_factory(microvm_factory, tmp_path):
    vm = microvm_factory(kernel="tiny:echo").start()
    vm.console.expect("echo: ready")
    snap = vm.snapshot(tmp_path / "snap")
    vm.kill()
    results = []
    for word in ("one", "two"):
        clone = microvm_factory(restore=str(snap)).start()
        clone.console.sendline(word)
        clone.console.expect(f"echo: {word}")
        clone.console.sendline("exit 5")
        results.append(clone.wait().code)
    assert results == [5, 5]


def test_snapshot_on_qemu_is_a_clear_error(microvm_factory, tmp_path):
    vm = microvm_factory(kernel="tiny:echo", backend="qemu").start()
    with pytest.raises(MicroVMError, match="qemu backend cannot take snapshots"):
        vm.snapshot(tmp_path / "s")
    assert vm.kill().reason is ExitReason.KILLED
