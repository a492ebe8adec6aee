"""The reference Linux guest: Debian's cloud kernel and a busybox initramfs.

Nothing is installed on the host: packages are fetched with `apt-get download`
and unpacked with `dpkg-deb -x` into the cache (vmm/cache.py), with the
package version and the kernel's sha256 recorded in ``manifest.json``.

    python3 guests/linux/build.py            # fetch + build, print the paths
    python3 guests/linux/build.py --json

The initramfs holds busybox, ``init.sh`` as /init, the ``microvm-exit`` helper
(hands a command's exit status to the host through the debug-exit port), the
``microvm-agent`` exec agent (agent.c with the shared protocol core in
guests/agent/; started by init when the command line says
``microvm.agent=DEVICE``) and the virtio modules with their dependency order,
resolved from each module's ``.modinfo`` section (the package ships no
modules.dep).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The exec agent's protocol core, shared with the tiny guests' agent.
AGENT_CORE_DIR = HERE.parent / "agent"
AGENT_SOURCES = (HERE / "agent.c", AGENT_CORE_DIR / "agent_proto.c")
AGENT_HEADERS = (AGENT_CORE_DIR / "agent_proto.h",)
if str(HERE.parent.parent) not in sys.path:  # run as a script from a source tree
    sys.path.insert(0, str(HERE.parent.parent))

from vmm.boot.elf import ElfImage  # noqa: E402
from vmm.cache import cache_root, produce_dir, produce_file, sha256_file  # noqa: E402
from vmm.errors import VmmError  # noqa: E402

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"

#: Modules the initramfs carries: every virtio driver a microVM offers.
VIRTIO_MODULES = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio-rng",
    "vmw_vsock_virtio_transport",
)


class GuestRecipeError(VmmError):
    pass


@dataclass
class LinuxGuest:
    kernel: Path
    initrd: Path
    kernel_package: str
    kernel_version: str
    kernel_sha256: str
    busybox_version: str


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise GuestRecipeError(f"{cmd[0]} is not installed: the Linux guest recipe needs Debian's apt and dpkg") from None
    except subprocess.CalledProcessError as exc:
        raise GuestRecipeError(f"`{' '.join(cmd)}` failed (exit {exc.returncode}): {exc.stderr.strip()[-800:]}") from None
    return out.stdout


def resolve_package(meta: str) -> str:
    """The concrete package a Debian meta-package depends on (e.g. linux-image-6.1.0-NN-cloud-amd64)."""
    for line in _run(["apt-cache", "depends", meta]).splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image" in line:
            return line.split()[1]
    return meta


def package_version(pkg: str) -> str:
    for line in _run(["apt-cache", "policy", pkg]).splitlines():
        line = line.strip()
        if line.startswith("Candidate:"):
            return line.split()[1]
    raise GuestRecipeError(f"apt-cache knows no candidate version of {pkg}: run `apt-get update`")


def fetch_package(pkg: str, version: str) -> Path:
    """Download and unpack one .deb into the cache; return the unpacked tree."""
    safe = f"{pkg}_{version}".replace(":", "%3a")
    dest = cache_root() / "debian" / safe

    def make(tmp: Path) -> None:
        dl = tmp / "dl"
        dl.mkdir()
        os.chmod(dl, 0o777)  # apt's _apt user must be able to write there
        _run(["apt-get", "download", "-q", f"{pkg}={version}"], cwd=dl)
        debs = list(dl.glob("*.deb"))
        if len(debs) != 1:
            raise GuestRecipeError(f"apt-get download {pkg}={version} produced {len(debs)} files")
        _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")])
        (tmp / "deb-sha256").write_text(sha256_file(debs[0]) + "\n")
        shutil.rmtree(dl)

    return produce_dir(dest, make) / "root"


def _modinfo(path: Path) -> dict[str, str]:
    img = ElfImage.from_file(path)
    info: dict[str, str] = {}
    for sec in img.section_headers():
        if sec.name == ".modinfo":
            raw = img.data[sec.offset : sec.offset + sec.size]
            for item in raw.split(b"\0"):
                if b"=" in item:
                    k, v = item.decode("latin-1").split("=", 1)
                    info.setdefault(k, v)
    return info


def module_index(modules_root: Path) -> dict[str, Path]:
    """Module name (as in `depends=`, with '-' and '_' equal) → .ko path."""
    index = {}
    for ko in modules_root.rglob("*.ko"):
        index[ko.stem.replace("-", "_")] = ko
    return index


def dependency_order(name: str, index: dict[str, Path]) -> list[str]:
    """``name`` and everything it needs, dependencies first (built-ins omitted)."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(n: str) -> None:
        key = n.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        ko = index.get(key)
        if ko is None:
            return  # built into the kernel
        for dep in filter(None, _modinfo(ko).get("depends", "").split(",")):
            visit(dep)
        order.append(key)

    visit(name)
    return order


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the "newc" format the kernel's initramfs unpacker reads."""
    out = bytearray()
    ino = 1
    for name, mode, data in entries + [("TRAILER!!!", 0, b"")]:
        nameb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nameb), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + nameb
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
        ino += 1
    return bytes(out)


def _build_exit_helper(dest: Path) -> None:
    cc = os.environ.get("CC", "gcc")
    cmd = [cc, "-static", "-nostdlib", "-ffreestanding", "-fno-pie", "-no-pie", "-Os", "-o", str(dest), str(HERE / "exit.c")]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        raise GuestRecipeError(f"building microvm-exit failed: {' '.join(cmd)}\n{exc.stderr}") from None


def build_agent(dest: Path) -> Path:
    """Compile ``microvm-agent`` (a static binary: gcc -static with Debian's libc6-dev) to ``dest``."""
    cc = os.environ.get("CC", "gcc")
    cmd = [
        cc, "-static", "-O2", "-std=gnu11", "-Wall", "-Wextra", "-I", str(AGENT_CORE_DIR),
        "-o", str(dest), *map(str, AGENT_SOURCES),
    ]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise GuestRecipeError(f"{cc} is not installed: building microvm-agent needs gcc and libc6-dev") from None
    except subprocess.CalledProcessError as exc:
        raise GuestRecipeError(f"building microvm-agent failed: {' '.join(cmd)}\n{exc.stderr}") from None
    return dest


def build(kernel_package: str | None = None) -> LinuxGuest:
    pkg = kernel_package or os.environ.get("MICROVM_DEBIAN_KERNEL") or resolve_package(KERNEL_META_PACKAGE)
    kver_pkg = package_version(pkg)
    kroot = fetch_package(pkg, kver_pkg)
    vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise GuestRecipeError(f"{pkg} {kver_pkg} has no /boot/vmlinuz-*")
    kernel = vmlinuz[-1]
    release = kernel.name[len("vmlinuz-") :]
    bb_version = package_version(BUSYBOX_PACKAGE)
    bbroot = fetch_package(BUSYBOX_PACKAGE, bb_version)
    busybox = bbroot / "bin" / "busybox"

    recipe = (HERE / "build.py", HERE / "init.sh", HERE / "exit.c", *AGENT_SOURCES, *AGENT_HEADERS)
    sources = b"".join(p.read_bytes() for p in recipe)
    import hashlib

    key = hashlib.sha256(sources + f"{pkg}={kver_pkg} busybox={bb_version}".encode()).hexdigest()[:16]
    initrd = cache_root() / "linux" / f"initramfs-{release}-{key}.cpio.gz"

    def make_initrd(tmp: Path) -> None:
        modules_root = kroot / "lib" / "modules" / release
        index = module_index(modules_root)
        entries: list[tuple[str, int, bytes]] = []
        for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules", "etc"):
            entries.append((d, 0o040755, b""))
        entries.append(("init", 0o100755, (HERE / "init.sh").read_bytes()))
        entries.append(("bin/busybox", 0o100755, busybox.read_bytes()))
        # /init is a shell script: its interpreter must exist before busybox --install runs.
        entries.append(("bin/sh", 0o120777, b"busybox"))
        with tempfile.TemporaryDirectory() as td:
            helper = Path(td) / "microvm-exit"
            _build_exit_helper(helper)
            entries.append(("bin/microvm-exit", 0o100755, helper.read_bytes()))
            agent = build_agent(Path(td) / "microvm-agent")
            entries.append(("bin/microvm-agent", 0o100755, agent.read_bytes()))
        shipped: set[str] = set()
        for mod in VIRTIO_MODULES:
            order = dependency_order(mod, index)
            key_name = mod.replace("-", "_")
            entries.append((f"lib/modules/{key_name}.order", 0o100644, "\n".join(order[:-1]).encode() + b"\n"))
            for m in order:
                if m not in shipped:
                    shipped.add(m)
                    entries.append((f"lib/modules/{m}.ko", 0o100644, index[m].read_bytes()))
        with gzip.open(tmp, "wb", compresslevel=6) as f:
            f.write(_cpio_newc(entries))

    produce_file(initrd, make_initrd)
    guest = LinuxGuest(kernel, initrd, pkg, kver_pkg, sha256_file(kernel), bb_version)
    manifest = initrd.parent / "manifest.json"
    manifest.write_text(json.dumps({k: str(v) for k, v in asdict(guest).items()}, indent=2) + "\n")
    return guest


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", help="kernel package (default: what linux-image-cloud-amd64 depends on)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    g = build(args.package)
    if args.json:
        print(json.dumps({k: str(v) for k, v in asdict(g).items()}, indent=2))
    else:
        print(f"kernel  {g.kernel}  ({g.kernel_package} {g.kernel_version}, sha256 {g.kernel_sha256})")
        print(f"initrd  {g.initrd}  (busybox {g.busybox_version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
