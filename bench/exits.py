"""Exit round-trip cost: our VMM vs QEMU microvm vs a minimal C loop over KVM_RUN.

    python3 bench/exits.py [--rounds 5] [--n 2000,20000]

Each measurement boots a guest twice, with N1 and N2 exits, and divides the
difference in run time by N2 - N1: boot and teardown cancel out, what is left
is the cost of one exit (guest write -> KVM -> VMM handler -> KVM_RUN).

- floor:      bench/exit_floor.c running bench/guest_loop.S (ring-3 loop).
- ours-raw:   our VMM (in-process Machine) running the same guest bytes.
- ours-tiny:  our VMM running the tiny guests portloop / mmioloop.
- qemu-tiny:  qemu-system-x86_64 -M microvm running the same tiny guests.
All runs alternate, in one process, on one machine.
"""

from __future__ import annotations

import argparse
import subprocess
import time

from common import QEMU, exit_floor_binary, host_line, loop_guest, median, qemu_cpu_flags

from vmm import layout
from vmm.boot.types import BootRequest, BootSetup
from vmm.cpustate import CpuState, Segment
from vmm.guestkit import tiny_guest
from vmm.machine import Machine, MachineConfig

GDT, TSS, TSS_LIMIT, PML4, PDPT, PD, CODE, STACK0 = 0x500, 0x1000, 0x68 + 8192, 0x9000, 0xA000, 0xB000, 0x100000, 0x8000
GDT_ENTRIES = [
    0,
    0x00AF9B000000FFFF,  # 0x08 kernel code
    0x00CF93000000FFFF,  # 0x10 kernel data
    0x00CFF3000000FFFF,  # 0x1b user data
    0x00AFFB000000FFFF,  # 0x23 user code
]


def _raw_loader(code: bytes, n: int, mmio: bool):
    """Lay memory out exactly as bench/exit_floor.c does."""

    def loader(req: BootRequest) -> BootSetup:
        mem = req.memory
        mem.write(CODE, code)
        mem.write_u64(PML4, PDPT | 7)
        for j in range(4):
            mem.write_u64(PDPT + 8 * j, (PD + 0x1000 * j) | 7)
            mem.write(PD + 0x1000 * j, b"".join(((((j * 512 + i) << 21) | 0x87).to_bytes(8, "little")) for i in range(512)))
        for i, d in enumerate(GDT_ENTRIES):
            mem.write_u64(GDT + 8 * i, d)
        tss_desc = (TSS_LIMIT & 0xFFFF) | (TSS << 16) | (0x89 << 40) | ((TSS_LIMIT >> 16) << 48)
        mem.write_u64(GDT + 40, tss_desc)
        mem.write_u64(GDT + 48, 0)
        mem.write_u64(TSS + 4, STACK0)
        mem.write_u16(TSS + 0x66, 0x68)
        mem.write_u8(TSS + 0x68 + 8192, 0xFF)
        st = CpuState.flat_long64(CODE, cr3=PML4, rsp=STACK0, rbx=n, rsi=int(mmio), rdi=layout.TEST_MMIO_ADDR)
        st.cs = Segment.from_descriptor(0x08, GDT_ENTRIES[1])
        data = Segment.from_descriptor(0x10, GDT_ENTRIES[2])
        st.ds = st.es = st.fs = st.gs = st.ss = data
        st.tr = Segment(selector=0x28, base=TSS, limit=TSS_LIMIT, type=11, s=0)
        st.gdt = (GDT, 7 * 8 - 1)
        return BootSetup("bench-loop", st, details={"boot_gdt": False})

    return loader


def run_ours_raw(code: bytes, n: int, mmio: bool) -> float:
    cfg = MachineConfig(kernel="<bench loop>", mem_mib=4, acpi=False, timeout=120)
    with Machine(cfg, loader=_raw_loader(code, n, mmio)) as m:
        t = time.perf_counter()
        m.start()
        st = m.wait()
        dt = time.perf_counter() - t
    assert st is not None and st.code == 0, st
    return dt


def run_ours_tiny(kind: str, n: int) -> float:
    cfg = MachineConfig(kernel=tiny_guest(kind, "pvh"), cmdline=f"n={n}", timeout=120)
    with Machine(cfg) as m:
        t = time.perf_counter()
        m.start()
        st = m.wait()
        dt = time.perf_counter() - t
    assert st is not None and st.code == 0, (st, m.console.text()[-500:])
    return dt


def run_floor(binary: str, code_path: str, n: int, mmio: bool) -> float:
    out = subprocess.run([binary, "mmio" if mmio else "pio", str(n), code_path], check=True, capture_output=True, text=True)
    return float(out.stdout.split()[1])


def run_qemu_tiny(kind: str, n: int) -> float:
    cmd = [QEMU, "-M", "microvm", "-enable-kvm", *qemu_cpu_flags(), "-m", "128", "-nographic", "-no-reboot",
           "-nodefaults", "-serial", "null", "-kernel", str(tiny_guest(kind, "pvh")), "-append", f"n={n}",
           "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, check=False)
    dt = time.perf_counter() - t
    assert p.returncode == 1, (p.returncode, p.stderr[-300:])  # isa-debug-exit: (0 << 1) | 1
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", default="2000,20000", help="N1,N2 exits per boot")
    args = ap.parse_args()
    n1, n2 = (int(x) for x in args.n.split(","))
    code = loop_guest()
    floor = str(exit_floor_binary())
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(code)
        f.flush()
        results: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for mmio in (False, True):
                kind = "mmio" if mmio else "pio"
                tiny = "mmioloop" if mmio else "portloop"
                runs = {
                    f"floor {kind}": lambda n, mmio=mmio: run_floor(floor, f.name, n, mmio),
                    f"ours-raw {kind}": lambda n, mmio=mmio: run_ours_raw(code, n, mmio),
                    f"ours-tiny {kind}": lambda n, tiny=tiny: run_ours_tiny(tiny, n),
                }
                if QEMU:
                    runs[f"qemu-tiny {kind}"] = lambda n, tiny=tiny: run_qemu_tiny(tiny, n)
                for name, fn in runs.items():
                    per_exit = (fn(n2) - fn(n1)) / (n2 - n1)
                    results.setdefault(name, []).append(per_exit)
    print(f"# exit round trip, median of {args.rounds} rounds, N = {n1} and {n2}")
    print(f"# host: {host_line()}")
    print(f"{'what':<18} {'µs/exit':>9} {'vs floor':>9}")
    for kind in ("pio", "mmio"):
        base = median(results[f"floor {kind}"])
        for name in (f"floor {kind}", f"ours-raw {kind}", f"ours-tiny {kind}", f"qemu-tiny {kind}"):
            if name in results:
                v = median(results[name])
                print(f"{name:<18} {v * 1e6:9.2f} {v / base:9.2f}x")


if __name__ == "__main__":
    main()
