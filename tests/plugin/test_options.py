"""Options, ini keys, marker arguments and test ids (pytester; VMs boot only where needed)."""

from __future__ import annotations

import pytest

SPEC_DUMP = r"""
import json
def test_spec(microvm_spec, request):
    s = microvm_spec
    print("\nSPEC=" + json.dumps({"kernel": s.kernel, "initrd": s.initrd, "append": s.append, "mem": s.mem_mib,
                               "vcpus": s.vcpus, "timeout": s.timeout, "backend": s.backend,
                               "qemu_cpu": s.qemu.cpu, "qemu_args": list(s.qemu.extra_args)}))
"""


def spec_of(result) -> dict:
    import json

    lines = [ln for ln in result.outlines if ln.startswith("SPEC=")]
    assert len(lines) == 1, result.outlines
    return json.loads(lines[0][5:])


def test_defaults(pytester):
    pytester.makepyfile(SPEC_DUMP)
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    spec = spec_of(result)
    assert spec == {"kernel": "tiny:hello", "initrd": None, "append": "", "mem": 128, "vcpus": 1,
                    "timeout": 30.0, "backend": "kvm", "qemu_cpu": "auto", "qemu_args": []}


def test_command_line_options(pytester):
    pytester.makepyfile(SPEC_DUMP)
    kernel = pytester.path / "bzImage"
    kernel.write_bytes(b"k")
    initrd = pytester.path / "initrd.img"
    initrd.write_bytes(b"i")
    result = pytester.runpytest(
        "-s", "--microvm-kernel=bzImage", "--microvm-initrd=initrd.img", "--microvm-append=console=ttyS0 quiet",
        "--microvm-mem=256", "--microvm-vcpus=2", "--microvm-timeout=7.5", "--microvm-backend=qemu",
        "--microvm-qemu-cpu=host,-arch-capabilities", "--microvm-qemu-args=-smbios type=0",
    )
    result.assert_outcomes(passed=1)
    assert spec_of(result) == {
        "kernel": str(kernel), "initrd": str(initrd), "append": "console=ttyS0 quiet", "mem": 256, "vcpus": 2,
        "timeout": 7.5, "backend": "qemu", "qemu_cpu": "host,-arch-capabilities", "qemu_args": ["-smbios", "type=0"],
    }


def test_ini_keys_and_command_line_precedence(pytester):
    sub = pytester.mkdir("images")
    (sub / "vmlinux").write_bytes(b"k")
    pytester.makeini(
        """
        [pytest]
        microvm_kernel = images/vmlinux
        microvm_append = from_ini
        microvm_mem = 64
        microvm_vcpus = 3
        microvm_timeout = 12
        microvm_backend = kvm
        microvm_qemu_cpu = max
        """
    )
    pytester.makepyfile(SPEC_DUMP)
    spec = spec_of(pytester.runpytest("-s"))
    assert spec["kernel"] == str(sub / "vmlinux")  # relative to the ini file
    assert (spec["append"], spec["mem"], spec["vcpus"], spec["timeout"], spec["qemu_cpu"]) == (
        "from_ini", 64, 3, 12.0, "max")
    spec = spec_of(pytester.runpytest("-s", "--microvm-mem=32", "--microvm-append=from_cli"))
    assert (spec["mem"], spec["append"], spec["vcpus"]) == (32, "from_cli", 3)


def test_marker_overrides_options(pytester):
    pytester.makepyfile(
        """
        import pytest
        pytestmark = pytest.mark.microvm(mem_mib=48, append="module")

        @pytest.mark.microvm(vcpus=2, append="function", timeout=3)
        def test_m(microvm_spec):
            assert (microvm_spec.mem_mib, microvm_spec.vcpus, microvm_spec.append, microvm_spec.timeout) == (
                48, 2, "function", 3.0)
            assert microvm_spec.kernel == "tiny:echo"
        """
    )
    pytester.runpytest("--microvm-vcpus=4", "--microvm-kernel=tiny:echo").assert_outcomes(passed=1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--microvm-mem=lots"], "--microvm-mem: 'lots' is not a positive integer"),
        (["--microvm-vcpus=0"], "--microvm-vcpus: '0' must be positive"),
        (["--microvm-timeout=-1"], "--microvm-timeout: '-1' must be a positive, finite number of seconds"),
        (["--microvm-kernel=no/such/bzImage"], "no/such/bzImage does not exist"),
        (["--microvm-initrd=missing.cpio"], "missing.cpio does not exist"),
        (["--microvm-kernel=tiny:"], "names no tiny guest"),
        (["--microvm-backend=qemu", "--microvm-qemu-binary=qemu-system-nonexistent"],
         "qemu-system-nonexistent is not installed"),
    ],
)
def test_bad_options_are_usage_errors_naming_the_option(pytester, args, message):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_bad_ini_value_names_the_ini_key(pytester):
    pytester.makeini("[pytest]\nmicrovm_vcpus = two\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini microvm_vcpus: 'two' is not a positive integer*"])


def test_kernel_that_is_not_a_file_is_a_clear_error(pytester):
    pytester.mkdir("build")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--microvm-kernel=build")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--microvm-kernel build: */build is not a regular file*"])


def test_unknown_and_positional_marker_arguments_are_clear_errors(pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.microvm(kernal="tiny:echo")
        def test_typo(microvm):
            pass
        """
    )
    result = pytester.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*@pytest.mark.microvm: unknown argument 'kernal' (known: kernel, initrd,*"])
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.microvm("tiny:echo")
        def test_positional(microvm_factory):
            pass
        """
    )
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(["*@pytest.mark.microvm takes keyword arguments only*"])


def test_marker_kernel_that_does_not_exist(pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.microvm(kernel="nowhere.elf", mem_mib="x")
        def test_x(microvm):
            pass
        """
    )
    result = pytester.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*kernel=: */nowhere.elf does not exist*"])


def test_factory_argument_errors(pytester):
    pytester.makepyfile(
        """
        import pytest
        from pytest_microvm.spec import SpecError

        def test_x(microvm_factory):
            with pytest.raises(pytest.UsageError, match="unknown argument 'memory'"):
                microvm_factory(memory=3)
            with pytest.raises(pytest.UsageError, match="vcpus=: 'many' is not a positive integer"):
                microvm_factory(vcpus="many")
            with pytest.raises(SpecError, match="no tiny guest named 'nosuch'"):
                microvm_factory(kernel="tiny:nosuch").start()
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_one_run_per_kernel_with_the_file_name_in_the_id(pytester, tiny):
    import shutil as sh

    a = pytester.mkdir("a")
    b = pytester.mkdir("b")
    sh.copy(tiny("hello"), a / "hello.elf")
    sh.copy(tiny("exitcode"), b / "exitcode.elf")
    pytester.makepyfile(
        """
        import pytest

        def test_boot(microvm):
            microvm.wait()

        @pytest.mark.microvm(kernel="tiny:hello")
        def test_pinned(microvm):
            assert microvm.wait().ok

        def test_no_vm():
            pass
        """
    )
    result = pytester.runpytest("-v", "--microvm-kernel=a/hello.elf", "--microvm-kernel", "b/exitcode.elf")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines_random([
        "*test_boot?hello.elf? PASSED*",
        "*test_boot?exitcode.elf? PASSED*",
        "*test_pinned PASSED*",
        "*test_no_vm PASSED*",
    ])
