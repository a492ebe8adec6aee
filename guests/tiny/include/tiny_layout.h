/*
 * Fixed guest-physical addresses, ports and IRQs of a microVM.
 *
 * Duplicated from vmm/layout.py (the single source of truth); keep the two in
 * sync -- tests/unit/test_guest_build.py compares every value below with it.
 * Usable from C and from assembler sources.
 */
#ifndef TINY_LAYOUT_H
#define TINY_LAYOUT_H

/* ---- low memory (below 1 MiB) ---- */
#define BOOT_GDT_ADDR        0x500
#define BOOT_GDT32_ADDR      0x530
#define BOOT_IDT_ADDR        0x560
#define ZERO_PAGE_ADDR       0x7000
#define BOOT_STACK_POINTER   0x8FF0
#define PML4_ADDR            0x9000
#define PVH_INFO_ADDR        0x6000
#define PVH_MEMMAP_ADDR      0x6100
#define PVH_MODLIST_ADDR     0x6800
#define CMDLINE_ADDR         0x20000
#define CMDLINE_MAX          0x10000
#define EBDA_START           0x9FC00
#define BIOS_AREA_START      0xE0000
#define BIOS_AREA_END        0x100000
#define ACPI_TABLES_ADDR     0xE0000
#define HIGH_MEMORY_START    0x100000

/* ---- the 32-bit MMIO hole ---- */
#define MMIO_GAP_START       0xC0000000
#define MMIO_GAP_END         0x100000000
#define VIRTIO_MMIO_BASE     0xD0000000
#define VIRTIO_MMIO_SIZE     0x1000
#define TEST_MMIO_ADDR       0xCFFFF000
#define IOAPIC_ADDR          0xFEC00000
#define LAPIC_ADDR           0xFEE00000

/* ---- legacy I/O ports and IRQs ---- */
#define COM1_PORT            0x3F8
#define COM1_IRQ             4
#define DEBUG_EXIT_PORT      0xF4
#define BOOT_TIMER_PORT      0x3F0
#define BOOT_TIMER_MAGIC     123

#endif
