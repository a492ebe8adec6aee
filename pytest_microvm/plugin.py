"""The pytest11 entry point of pytest-microvm: options, ini keys, marker, fixtures, hooks.

Fixtures:
  microvm_factory  the owner: ``microvm_factory(kernel=..., ...)`` returns a configured,
                   not yet started MicroVM; every VM it made is killed and reaped at
                   teardown, pass or fail.
  microvm          a started MicroVM from the options and the test's marker.
  microvm_spec     the VmSpec those two start from (options + marker + kernel parameter).
  microvm_kernel   the kernel for this test; parametrized once per --microvm-kernel.

A failing test's report gets, per VM, a section with the serial log and one with
the exit reason and metrics; passing tests carry none.  Boot times go to
junitxml as properties.  Guest images matched by ``microvm_guest_tests`` (or
named on the command line) are test items themselves: see guest_items.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .spec import (
    BACKENDS,
    DEFAULT_GUEST,
    DEFAULT_MEM_MIB,
    DEFAULT_PANIC_PATTERNS,
    DEFAULT_TIMEOUT,
    DEFAULT_VCPUS,
    MARKER_ARGS,
    QemuOptions,
    SpecError,
    VmSpec,
    absolutize,
    apply_overrides,
    check_image_file,
    parse_backend,
    parse_positive_float,
    parse_positive_int,
    split_args,
)
from .vm import MicroVM, MicroVMFactory

BASE_SPEC_KEY = pytest.StashKey[VmSpec]()
KERNELS_KEY = pytest.StashKey["list[str]"]()
FACTORY_KEY = pytest.StashKey[MicroVMFactory]()

#: Bytes of serial output a failure report shows (the newest ones).
REPORT_SERIAL_LIMIT = 64 << 10
#: junitxml property holding the first VM's boot time (others get ".<vm name>" appended).
BOOT_TIME_PROPERTY = "microvm_boot_time_s"

_OPTIONS = (
    # (option suffix, ini type, help)
    ("kernel", "linelist", (
        "guest kernel or image (repeatable: tests run once per kernel); tiny:NAME for a "
        f"reference tiny guest (default {DEFAULT_GUEST})"
    )),
    ("initrd", "string", "initial ramdisk"),
    ("append", "string", "kernel command line"),
    ("mem", "string", f"guest memory in MiB (default {DEFAULT_MEM_MIB})"),
    ("vcpus", "string", f"number of vCPUs (default {DEFAULT_VCPUS})"),
    ("timeout", "string", f"seconds each VM may run before it is ended (default {DEFAULT_TIMEOUT:g})"),
    ("backend", "string", "VMM: kvm (the in-process monitor, default) or qemu (qemu-system-x86_64 -M microvm)"),
    ("qemu-binary", "string", "QEMU program for --microvm-backend=qemu (default qemu-system-x86_64)"),
    ("qemu-cpu", "string", "QEMU -cpu value (default auto: host, or host,-arch-capabilities where KVM needs it)"),
    ("qemu-args", "args", "extra QEMU arguments (shell words; repeatable)"),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("microvm", "microVMs (pytest-microvm)")
    for suffix, ini_type, help_text in _OPTIONS:
        dest = "microvm_" + suffix.replace("-", "_")
        kwargs: dict[str, Any] = {"dest": dest, "default": None, "help": help_text}
        if suffix in ("kernel", "qemu-args"):
            kwargs["action"] = "append"
        if suffix == "backend":
            kwargs["choices"] = BACKENDS
        group.addoption(f"--microvm-{suffix}", **kwargs)
        parser.addini(dest, help=help_text, type=ini_type, default=None)
    parser.addini(
        "microvm_guest_tests", type="linelist", default=[],
        help="globs (relative to the rootdir, or file names) of guest images collected as tests",
    )
    parser.addini(
        "microvm_panic_patterns", type="linelist", default=[],
        help="extra regular expressions that mark a guest panic on the console (added to the defaults)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "microvm(kernel=None, initrd=None, append=None, mem_mib=None, vcpus=None, timeout=None, backend=None): "
        "override the pytest-microvm options for this test's VMs",
    )
    try:
        base, kernels = _base_spec(config)
    except SpecError as exc:
        raise pytest.UsageError(str(exc)) from None
    if base.backend == "qemu":
        from .backends.qemu import find_binary
        from .errors import BackendNotInstalled

        try:
            find_binary(base.qemu.binary)
        except BackendNotInstalled as exc:
            raise pytest.UsageError(str(exc)) from None
    config.stash[BASE_SPEC_KEY] = base
    config.stash[KERNELS_KEY] = kernels


def _value(config: pytest.Config, name: str) -> tuple[Any, str, Path] | None:
    """(value, where it came from, base dir for relative paths) of option ``name``, or None."""
    dest = "microvm_" + name.replace("-", "_")
    cli = config.getoption(dest, None)
    if cli is not None:
        return cli, f"--microvm-{name}", Path(config.invocation_params.dir)
    ini = config.getini(dest)
    if ini not in (None, "", []):
        base = Path(config.inipath).parent if config.inipath else Path(config.rootpath)
        return ini, f"ini {dest}", base
    return None


def _base_spec(config: pytest.Config) -> tuple[VmSpec, list[str]]:
    kernels: list[str] = []
    got = _value(config, "kernel")
    if got is not None:
        values, where, base = got
        for v in values:
            path = absolutize(v, base)
            assert path is not None
            check_image_file(path, f"{where} {v}")
            kernels.append(path)
    changes: dict[str, Any] = {"kernel": kernels[0] if kernels else DEFAULT_GUEST}
    got = _value(config, "initrd")
    if got is not None:
        value, where, base = got
        path = absolutize(value, base)
        assert path is not None
        check_image_file(path, where)
        changes["initrd"] = path
    got = _value(config, "append")
    if got is not None:
        changes["append"] = got[0]
    for name, field, parse in (
        ("mem", "mem_mib", parse_positive_int),
        ("vcpus", "vcpus", parse_positive_int),
        ("timeout", "timeout", parse_positive_float),
        ("backend", "backend", parse_backend),
    ):
        got = _value(config, name)
        if got is not None:
            changes[field] = parse(got[0], got[1])
    qemu: dict[str, Any] = {}
    for name, field in (("qemu-binary", "binary"), ("qemu-cpu", "cpu")):
        got = _value(config, name)
        if got is not None:
            qemu[field] = got[0]
    got = _value(config, "qemu-args")
    if got is not None:
        qemu["extra_args"] = split_args(got[0])
    changes["qemu"] = QemuOptions(**qemu)
    extra_panics = tuple(config.getini("microvm_panic_patterns") or ())
    changes["panic_patterns"] = DEFAULT_PANIC_PATTERNS + extra_panics
    return VmSpec(**changes), kernels


# ---- marker and parametrization ---------------------------------------------------------


def marker_overrides(node: Any) -> dict[str, Any]:
    """The merged arguments of every @pytest.mark.microvm on ``node`` (closest wins)."""
    merged: dict[str, Any] = {}
    for mark in reversed(list(node.iter_markers("microvm"))):
        if mark.args:
            raise SpecError(
                f"{node.nodeid}: @pytest.mark.microvm takes keyword arguments only "
                f"({', '.join(MARKER_ARGS)}), got positional {mark.args!r}"
            )
        merged.update(mark.kwargs)
    return merged


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "microvm_kernel" not in metafunc.fixturenames:
        return
    config = metafunc.config
    try:
        overrides = marker_overrides(metafunc.definition)
        apply_overrides(
            config.stash[BASE_SPEC_KEY], overrides, f"{metafunc.definition.nodeid}: @pytest.mark.microvm",
            metafunc.definition.path.parent,
        )
    except SpecError as exc:
        raise pytest.UsageError(str(exc)) from None
    kernels = config.stash[KERNELS_KEY]
    if kernels and "kernel" not in overrides:
        metafunc.parametrize("microvm_kernel", kernels, indirect=True, ids=[Path(k).name for k in kernels])


@pytest.fixture
def microvm_kernel(request: pytest.FixtureRequest) -> str:
    """This test's kernel: one --microvm-kernel per parametrized run, else the marker's or the default."""
    param = getattr(request, "param", None)
    if param is not None:
        return param
    return request.config.stash[BASE_SPEC_KEY].kernel


@pytest.fixture
def microvm_spec(request: pytest.FixtureRequest, microvm_kernel: str) -> VmSpec:
    """The VmSpec for this test's VMs: options, then the marker, then the kernel parameter."""
    base = request.config.stash[BASE_SPEC_KEY].replace(kernel=microvm_kernel)
    node = request.node
    try:
        return apply_overrides(
            base, marker_overrides(node), f"{node.nodeid}: @pytest.mark.microvm", Path(node.path).parent
        )
    except SpecError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def microvm_factory(
    request: pytest.FixtureRequest, microvm_spec: VmSpec, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MicroVMFactory]:
    """Makes MicroVMs (``microvm_factory(kernel=..., mem_mib=..., name=...)``), not yet started.

    Every VM is killed and reaped at teardown, pass or fail.
    """
    node = request.node
    base_dir = Path(node.path).parent

    def make_dir(name: str) -> Path:
        return tmp_path_factory.mktemp(f"microvm-{name}")

    def apply(spec: VmSpec, overrides: dict[str, Any]) -> VmSpec:
        try:
            return apply_overrides(spec, overrides, "microvm_factory()", base_dir)
        except SpecError as exc:
            raise pytest.UsageError(str(exc)) from None

    factory = MicroVMFactory(microvm_spec, make_dir, apply)
    node.stash[FACTORY_KEY] = factory
    try:
        yield factory
    finally:
        errors = factory.close_all()
        record_boot_times(node, factory.vms)
    if errors:
        raise errors[0]


@pytest.fixture
def microvm(microvm_factory: MicroVMFactory) -> MicroVM:
    """A started MicroVM from the options and the test's @pytest.mark.microvm."""
    return microvm_factory().start()


# ---- reports ------------------------------------------------------------------------------


def record_boot_times(item: Any, vms: list[MicroVM]) -> None:
    for i, vm in enumerate(vms):
        bt = vm.boot_time
        if bt is None:
            continue
        name = BOOT_TIME_PROPERTY if i == 0 else f"{BOOT_TIME_PROPERTY}.{vm.name}"
        item.user_properties.append((name, f"{bt:.6f}"))


def vm_report_sections(vms: list[MicroVM]) -> list[tuple[str, str]]:
    sections = []
    for vm in vms:
        if not vm.started:
            continue
        log = vm.serial_output
        if len(log) > REPORT_SERIAL_LIMIT:
            log = f"[... {len(log) - REPORT_SERIAL_LIMIT} earlier characters not shown ...]\n" + log[
                -REPORT_SERIAL_LIMIT:
            ]
        sections.append((f"microvm {vm.name}: serial log ({vm.spec.kernel_name})", log or "(no output)"))
        sections.append((f"microvm {vm.name}: exit and metrics", describe_vm(vm)))
    return sections


def describe_vm(vm: MicroVM) -> str:
    status = vm.exit_status
    lines = []
    if status is None:
        lines.append("exit: still running when the test failed (killed at teardown)")
    else:
        lines.append(f"exit: {status.describe()}")
        if status.rip is not None:
            lines.append(f"rip: {status.rip:#x}")
        if status.insn_bytes:
            lines.append(f"instruction bytes: {status.insn_bytes.hex(' ')}")
    lines.append(f"backend: {vm.spec.backend}; kernel: {vm.spec.kernel}")
    if vm.spec.append:
        lines.append(f"append: {vm.spec.append}")
    metrics = vm.metrics
    for key in ("boot_time_s", "run_time_s", "peak_rss_kib", "console_bytes"):
        if metrics.get(key) is not None:
            lines.append(f"{key}: {metrics[key]}")
    if metrics.get("exits"):
        lines.append("exits: " + json.dumps(metrics["exits"], sort_keys=True))
    if metrics.get("qemu_command"):
        lines.append(f"qemu: {metrics['qemu_command']}")
    return "\n".join(lines)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    factory = item.stash.get(FACTORY_KEY, None)
    if factory is None or not factory.vms:
        return
    already = {name for name, _ in report.sections}
    for section in vm_report_sections(factory.vms):
        if section[0] not in already:
            report.sections.append(section)


# ---- guest images as tests ---------------------------------------------------------------------


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> Any:
    from .guest_items import GuestImageFile, is_guest_test

    if is_guest_test(file_path, parent.config):
        return GuestImageFile.from_parent(parent, path=file_path)
    return None
