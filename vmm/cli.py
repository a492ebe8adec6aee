"""`microvm`: run a guest, probe the host, build guests, fuzz devices.

`microvm run` streams the guest's serial output to stdout and exits with the
guest's own exit code when it wrote one to the debug-exit port (or made the
uhyve exit hypercall), 0 when it powered off or rebooted, and otherwise one of
the reserved codes below with a one-line reason on stderr:

    250  triple fault
    251  the host's KVM could not emulate an instruction, or another KVM error
    252  guest panic
    253  timeout (--timeout)
    254  VMM error: bad image, bad option, missing /dev/kvm, internal error
    255  killed (Ctrl-C)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

T0 = time.monotonic()

EXIT_VMM_ERROR = 254
EXIT_KILLED = 255


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def _add_machine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", required=True, help="bzImage, vmlinux, PVH ELF, multiboot or Hermit image")
    p.add_argument("--initrd", help="initial ramdisk (Linux, PVH) or first module (multiboot)")
    p.add_argument("--append", default="", help="kernel command line")
    p.add_argument("--mem", type=_positive_int, default=128, metavar="MIB", help="guest RAM in MiB (default 128)")
    p.add_argument("--vcpus", type=_positive_int, default=1, metavar="N", help="number of vCPUs (default 1)")
    p.add_argument("--timeout", type=_positive_float, metavar="S", help="end the VM after S seconds")
    p.add_argument("--no-acpi", action="store_true", help="do not build ACPI tables")
    p.add_argument(
        "--direct-elf",
        action="store_true",
        help="decompress a bzImage on the host (cached) and boot its ELF, skipping the in-guest decompressor",
    )
    p.add_argument("--disk", action="append", default=[], metavar="PATH[,ro]", help="virtio-blk disk (repeatable)")
    p.add_argument("--net", action="append", default=[], metavar="tap=NAME", help="virtio-net on a tap device")
    p.add_argument("--console", dest="vconsole", metavar="socket=PATH", help="virtio-console on a Unix socket")
    p.add_argument("--rng", action="store_true", help="virtio-rng from the host's random source")
    p.add_argument("--vsock", metavar="cid=N,path=PATH", help="virtio-vsock (Firecracker's hybrid Unix-socket form)")
    p.add_argument("--ioeventfd", action="store_true",
                   help="blk/rng notifications through KVM ioeventfds and a device thread (faster when a CPU is free)")
    p.add_argument("--hermit-fs", metavar="DIR", help="directory a Hermit guest may open files in")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for guests that take one (Hermit); repeatable")
    p.add_argument("--kvm", default="/dev/kvm", help=argparse.SUPPRESS)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microvm", description="A KVM microVM monitor for testing guests.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="boot a guest; serial output on stdout", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_machine_options(run)
    run.add_argument("--summary-json", metavar="PATH", help="write exit reason, timings, exits and RSS as JSON")
    run.add_argument("--quiet", action="store_true", help="do not copy guest output to stdout")
    sub.add_parser("host-info", help="measure whether this host runs guest ring 0 natively")
    guest = sub.add_parser("guest", help="build the reference guests")
    guest.add_argument("action", choices=["build", "path"])
    guest.add_argument("names", nargs="*")
    fuzz = sub.add_parser("fuzz", help="fuzz a device model (Hypothesis campaign; needs the fuzz extra)")
    args = list(sys.argv[1:] if argv is None else argv)
    add_arguments = None
    if args[:1] == ["fuzz"]:  # the campaign module (Hypothesis) costs start-up time: only for `fuzz`
        try:
            from pytest_microvm.fuzz.campaign import add_arguments
        except ImportError:  # the fuzzing package (or Hypothesis) is not installed
            pass
    if add_arguments is None:
        fuzz.add_argument("target")
    else:
        add_arguments(fuzz)
    return parser


def _device_specs(args: argparse.Namespace) -> list:
    if not (args.disk or args.net or args.vconsole or args.rng or args.vsock):
        return []
    from .devices.virtio.spec import parse_cli_devices

    return parse_cli_devices(disks=args.disk, nets=args.net, console=args.vconsole, rng=args.rng, vsock=args.vsock)


def _parse_env(items: list[str]) -> dict[str, str]:
    from .errors import ConfigError

    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env: {item!r} is not KEY=VALUE")
        env[key] = value
    return env


def cmd_run(args: argparse.Namespace) -> int:
    from .errors import VmmError
    from .exitstatus import ExitReason
    from .machine import Machine, MachineConfig

    out = sys.stdout.buffer
    lock = threading.Lock()

    def to_stdout(data: bytes) -> None:
        with lock:
            try:
                out.write(data)
                out.flush()
            except (BrokenPipeError, ValueError):
                pass

    try:
        config = MachineConfig(
            kernel=args.kernel,
            initrd=args.initrd,
            cmdline=args.append,
            mem_mib=args.mem,
            vcpus=args.vcpus,
            timeout=args.timeout,
            acpi=not args.no_acpi,
            direct_elf=args.direct_elf,
            kvm_path=args.kvm,
            devices=_device_specs(args),
            hermit_fs_root=args.hermit_fs,
            ioeventfd=args.ioeventfd,
            env=_parse_env(args.env),
        )
        machine = Machine(config, t0=T0)
    except VmmError as exc:
        print(f"microvm: {exc}", file=sys.stderr)
        return EXIT_VMM_ERROR
    with machine:
        if not args.quiet:
            machine.console.add_listener(to_stdout)
        stdin_thread = _forward_stdin(machine)
        machine.start()
        try:
            status = machine.wait()
        except KeyboardInterrupt:
            status = machine.kill("interrupted (Ctrl-C)")
        assert status is not None
        if args.summary_json:
            _write_summary(Path(args.summary_json), machine.summary())
        del stdin_thread
    if status.reason is not ExitReason.GUEST_EXIT and not status.ok:
        print(f"microvm: {status.describe()}", file=sys.stderr)
        tb = status.extra.get("traceback")
        if tb and status.reason is ExitReason.VMM_ERROR:
            print(tb, file=sys.stderr)
    return status.process_exit_code


def _forward_stdin(machine) -> threading.Thread | None:
    """Type what arrives on stdin into the guest's serial console (not from a terminal)."""
    if sys.stdin is None or sys.stdin.isatty():
        return None
    try:
        fd = sys.stdin.fileno()
    except (OSError, ValueError):
        return None

    def pump() -> None:
        # Input typed before the guest reads it waits in the UART's bounded host
        # queue; when that is full, wait for the guest to drain it.
        while machine.status is None:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return
            if not data:
                return
            while data and machine.status is None:
                n = machine.send_input(data)
                data = data[n:]
                if data:
                    time.sleep(0.005)

    t = threading.Thread(target=pump, name="stdin", daemon=True)
    t.start()
    return t


def _write_summary(path: Path, summary: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def cmd_host_info(args: argparse.Namespace) -> int:
    from .hostinfo import measure

    info = measure()
    print(info.describe())
    return 0


def cmd_guest(args: argparse.Namespace) -> int:
    from .guestkit import build_tiny

    paths = build_tiny(args.names or None)
    for name, path in sorted(paths.items()):
        print(f"{name}\t{path}")
    return 0


def cmd_fuzz(args: argparse.Namespace) -> int:
    try:
        from pytest_microvm.fuzz.campaign import main as fuzz_main
    except ImportError as exc:
        print(f"microvm fuzz: needs the fuzz extra (pip install pytest-microvm[fuzz]): {exc}", file=sys.stderr)
        return EXIT_VMM_ERROR
    return fuzz_main(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    from .errors import VmmError

    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "host-info":
            return cmd_host_info(args)
        if args.command == "guest":
            return cmd_guest(args)
        if args.command == "fuzz":
            return cmd_fuzz(args)
    except VmmError as exc:
        print(f"microvm: {exc}", file=sys.stderr)
        return EXIT_VMM_ERROR
    except KeyboardInterrupt:
        return EXIT_KILLED
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
