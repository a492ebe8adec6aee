"""The x86 guest-physical memory map of a microVM.

One place for every fixed address, so loaders, devices, ACPI tables and the
machine agree.  The low-memory addresses follow Firecracker's layout (which
follows Linux's expectations for the boot protocol); the MMIO window and IRQ
numbers are the ones our ACPI tables and ``virtio_mmio.device=`` announce.
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# ---- low memory (below 1 MiB) --------------------------------------------
#: Boot GDT of the 64-bit entry state (6 descriptors, 0x30 bytes).
BOOT_GDT_ADDR = 0x500
#: Boot GDT of the 32-bit entry state (5 descriptors, 0x28 bytes).
BOOT_GDT32_ADDR = 0x530
#: Boot IDT (empty, limit 0): a fault before the guest loads its own triple-faults.
BOOT_IDT_ADDR = 0x560
#: Linux zero page (struct boot_params), Documentation/arch/x86/boot.rst.
ZERO_PAGE_ADDR = 0x7000
#: Initial stack pointer for guests entered in 64-bit mode.
BOOT_STACK_POINTER = 0x8FF0
#: Identity-mapping page tables for 64-bit entry: PML4, PDPT, then 4 PDs (4 GiB in 2 MiB pages).
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
PD_COUNT = 4
#: PVH hvm_start_info and its memory map / module list.
PVH_INFO_ADDR = 0x6000
PVH_MEMMAP_ADDR = 0x6100
PVH_MODLIST_ADDR = 0x6800
#: Kernel command line (max CMDLINE_MAX bytes including the NUL).
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
#: Start of the legacy EBDA; RAM below it is usable, above it is reserved.
EBDA_START = 0x9FC00
#: The BIOS read-only area where guests scan for the ACPI RSDP and MP table.
BIOS_AREA_START = 0xE0000
BIOS_AREA_END = 0x100000
#: ACPI tables live here (RSDP first, 16-byte aligned, as the spec's scan expects).
ACPI_TABLES_ADDR = 0xE0000
#: Where kernels are loaded (the boot protocol's default for protected-mode code).
HIGH_MEMORY_START = 1 * MiB

# ---- the 32-bit MMIO hole --------------------------------------------------
#: RAM below 4 GiB ends here; above it sits device MMIO up to 4 GiB.
MMIO_GAP_START = 0xC000_0000
MMIO_GAP_END = 0x1_0000_0000
#: virtio-mmio devices: one 4 KiB window each, from here up.
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_SIZE = 0x1000
#: A register the bench/test guests write from ring 3 to measure MMIO exits.
TEST_MMIO_ADDR = 0xCFFF_F000
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
#: KVM_SET_IDENTITY_MAP_ADDR and KVM_SET_TSS_ADDR (3 pages), inside the hole.
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000
KVM_TSS_ADDR = 0xFFFB_D000

# ---- legacy I/O ports and IRQs --------------------------------------------
COM1_PORT = 0x3F8
COM1_IRQ = 4
COM2_PORT = 0x2F8
COM2_IRQ = 3
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
#: Debug-exit port (QEMU's isa-debug-exit address; we report the value as written).
DEBUG_EXIT_PORT = 0xF4
#: Firecracker's boot-timer port: the guest writes 123 when it has booted.
BOOT_TIMER_PORT = 0x3F0
BOOT_TIMER_MAGIC = 123
#: ACPI hardware-reduced sleep control/status registers (FADT SLEEP_CONTROL_REG,
#: SLEEP_STATUS_REG, ACPI 6.4 §4.8.3.7) and the FADT RESET_REG.
ACPI_SLEEP_CONTROL_PORT = 0x3C0
ACPI_SLEEP_STATUS_PORT = 0x3C1
ACPI_RESET_PORT = 0x3C2
ACPI_RESET_VALUE = 0x1
#: The sleep type value our DSDT's \_S5_ package gives for soft-off.
ACPI_S5_SLP_TYP = 5
#: First IRQ (GSI) handed to virtio-mmio devices.
VIRTIO_IRQ_BASE = 5
#: GSIs the in-kernel IOAPIC has (KVM's IOAPIC has 24 pins).
IOAPIC_NUM_PINS = 24


def virtio_mmio_slot(index: int) -> tuple[int, int]:
    """(MMIO base, GSI) of the ``index``-th virtio-mmio device."""
    irq = VIRTIO_IRQ_BASE + index
    if irq in (COM1_IRQ, COM2_IRQ) or irq >= IOAPIC_NUM_PINS:
        raise ValueError(f"no IRQ left for virtio device #{index}")
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE, irq
