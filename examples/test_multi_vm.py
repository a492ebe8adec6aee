"""Several VMs in one test: the factory makes them, and reaps them all at teardown."""

import pytest


def test_three_echo_guests_are_independent(microvm_factory):
    vms = [microvm_factory(kernel="tiny:echo", name=f"node{i}").start() for i in range(3)]
    for vm in vms:
        vm.console.expect("echo: ready")
    for vm in vms:
        vm.console.sendline(f"I am {vm.name}")
    for vm in vms:
        vm.console.expect(r"echo: I am (node\d+)\r?\n")
        assert vm.console.match.group(1) == vm.name
    vms[1].console.sendline("exit 3")
    assert vms[1].wait().code == 3
    assert vms[0].running and vms[2].running  # the others keep going; teardown kills them


@pytest.mark.parametrize("vcpus", [1, 2])
def test_memory_and_vcpu_options(microvm_factory, vcpus):
    vm = microvm_factory(kernel="tiny:hello", vcpus=vcpus, mem_mib=64).start()
    assert vm.wait().ok
    assert vm.spec.vcpus == vcpus and vm.spec.mem_mib == 64
