"""Guest images as test items: boot once, pass iff the guest exits with code 0.

Images are collected when they match an ini ``microvm_guest_tests`` glob, or
when named on the command line (``pytest build/selftest.elf``) and they look
like a kernel (ELF, or a bzImage's "HdrS" header).  Each image is one item,
``<image>::boot``; KTAP/TAP printed by the guest becomes one reported result
per test case (pass, fail, skip with its reason, xfail, and a failure for a
case that crashed because the output stopped), reported as subtests of that
item, so pytest-xdist and junitxml carry them.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import pytest

from vmm.exitstatus import ExitReason, ExitStatus

from . import ktap
from .spec import SpecError, VmSpec
from .vm import MicroVM, MicroVMFactory

ELF_MAGIC = b"\x7fELF"
#: bzImage: "HdrS" at offset 0x202 (Documentation/arch/x86/boot.rst, the setup header).
BZIMAGE_MAGIC_OFFSET = 0x202
BZIMAGE_MAGIC = b"HdrS"


def looks_like_kernel(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(BZIMAGE_MAGIC_OFFSET + 4)
    except OSError:
        return False
    return head.startswith(ELF_MAGIC) or head[BZIMAGE_MAGIC_OFFSET : BZIMAGE_MAGIC_OFFSET + 4] == BZIMAGE_MAGIC


def _explicit_args(config: pytest.Config) -> set[Path]:
    out = set()
    base = Path(config.invocation_params.dir)
    for arg in config.args:
        path = arg.split("::", 1)[0]
        if path:
            out.add((base / path).resolve())
    return out


def is_guest_test(file_path: Path, config: pytest.Config) -> bool:
    if file_path.suffix == ".py":
        return False
    globs = config.getini("microvm_guest_tests") or []
    matched = False
    if globs:
        try:
            rel = file_path.resolve().relative_to(Path(config.rootpath).resolve()).as_posix()
        except ValueError:
            rel = file_path.as_posix()
        for g in globs:
            if fnmatch.fnmatch(rel, g) or ("/" not in g and fnmatch.fnmatch(file_path.name, g)):
                matched = True
                break
    if not matched:
        matched = file_path.resolve() in _explicit_args(config)
        if matched and not looks_like_kernel(file_path):
            return False
    return matched


class GuestFailed(Exception):
    def __init__(self, message: str, status: ExitStatus | None) -> None:
        super().__init__(message)
        self.status = status


class GuestImageFile(pytest.File):
    def collect(self) -> Any:
        yield GuestImageItem.from_parent(self, name="boot")


class GuestImageItem(pytest.Item):
    """Boots one guest image; passes iff its exit code is 0."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.vm: MicroVM | None = None
        self.ktap: ktap.KtapDocument | None = None

    def runtest(self) -> None:
        from .plugin import BASE_SPEC_KEY, FACTORY_KEY, record_boot_times

        base: VmSpec = self.config.stash[BASE_SPEC_KEY]
        path = Path(self.path)
        if not path.is_file():
            raise GuestFailed(f"{path}: the image does not exist", None)
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise GuestFailed(f"{path}: cannot read the image: {exc.strerror}", None) from None
        spec = base.replace(kernel=str(path))
        factory = MicroVMFactory(spec, None, lambda s, o: s)
        self.stash[FACTORY_KEY] = factory
        vm = factory(name=path.name)
        self.vm = vm
        try:
            vm.start()
            status = vm.wait()
            self.ktap = doc = ktap.parse(vm.serial_output)
            if doc.found:
                report_ktap(self, doc)
        finally:
            factory.close_all()
            record_boot_times(self, factory.vms)
        if status.reason is not ExitReason.GUEST_EXIT or status.code != 0:
            raise GuestFailed(f"{path.name}: {_verdict(status)}", status)

    def repr_failure(self, excinfo: Any, style: Any = None) -> Any:
        if isinstance(excinfo.value, (GuestFailed, SpecError)):
            return str(excinfo.value)
        from vmm.errors import VmmError

        from .errors import MicroVMError

        if isinstance(excinfo.value, (MicroVMError, VmmError)):
            return f"{Path(self.path).name}: {excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"guest image {Path(self.path).name}"


def _verdict(status: ExitStatus) -> str:
    if status.reason is ExitReason.GUEST_EXIT:
        return f"the guest exited with code {status.code} (expected 0)"
    return f"the guest did not exit with a code: {status.describe()}"


# ---- KTAP results as subtest reports ------------------------------------------------------------


def report_ktap(item: pytest.Item, doc: ktap.KtapDocument) -> None:
    """One report per KTAP test case, under ``item``'s node id (as subtests)."""
    import contextlib

    capman = item.config.pluginmanager.getplugin("capturemanager")
    # Reports are written to the terminal as they come: not into this item's captured output.
    suspended = capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()
    with suspended:
        for path, test in ktap.reportable(doc):
            item.ihook.pytest_runtest_logreport(report=_case_report(item, "::".join(path), test))


def _case_report(item: pytest.Item, name: str, test: ktap.KtapTest) -> pytest.TestReport:
    location = (item.location[0], item.location[1], f"{item.location[2]}::{name}")
    longrepr: Any = None
    extra: dict[str, Any] = {}
    if test.status is ktap.Status.PASS:
        outcome = "passed"
    elif test.status is ktap.Status.SKIP:
        outcome = "skipped"
        longrepr = (str(item.path), 0, f"Skipped: {test.reason or 'skipped by the guest'}")
    elif test.status is ktap.Status.XFAIL:
        outcome = "skipped"
        longrepr = (str(item.path), 0, f"xfail: {test.reason or test.directive or ''}")
        extra["wasxfail"] = test.reason or (test.directive or "")
    else:
        outcome = "failed"
        what = "crashed" if test.status is ktap.Status.CRASH else "failed"
        lines = [f"KTAP test {name} {what}" + (f": {test.reason}" if test.reason else "")]
        lines += test.log[-50:]
        longrepr = "\n".join(lines)
    report = pytest.TestReport(
        item.nodeid, location, {}, outcome, longrepr, "call", sections=[], duration=0.0, user_properties=[]
    )
    for k, v in extra.items():
        setattr(report, k, v)
    return _as_subtest(report, name)


def _as_subtest(report: pytest.TestReport, name: str) -> pytest.TestReport:
    """pytest >= 9 has subtest reports (shown as SUBPASSED[name] and carried by xdist)."""
    try:
        from _pytest.subtests import SubtestContext, SubtestReport
    except ImportError:  # pragma: no cover - older pytest: a plain report under the item's id
        return report
    data = report._to_json()
    data["_subtest.context"] = SubtestContext(msg=name, kwargs={})._to_json()
    sub = SubtestReport._from_json(data)
    if hasattr(report, "wasxfail"):
        sub.wasxfail = report.wasxfail  # type: ignore[attr-defined]
    return sub
