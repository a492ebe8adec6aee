/*
 * The boot information structures a loader hands over, as the specs lay them
 * out.  Only the fields the kit reads are named; the rest is padding.
 */
#ifndef TINY_BOOTPARAM_H
#define TINY_BOOTPARAM_H

#include <stdint.h>

/* ---- Linux: struct boot_params (Documentation/arch/x86/zero-page.rst) ---- */
#define BP_ACPI_RSDP_ADDR      0x070	/* u64 */
#define BP_EXT_RAMDISK_IMAGE   0x0c0	/* u32 */
#define BP_EXT_RAMDISK_SIZE    0x0c4	/* u32 */
#define BP_EXT_CMD_LINE_PTR    0x0c8	/* u32 */
#define BP_E820_ENTRIES        0x1e8	/* u8 */
#define BP_HDR                 0x1f1	/* struct setup_header */
#define BP_E820_TABLE          0x2d0	/* struct boot_e820_entry[128] */
#define BP_E820_MAX            128
/* setup_header fields, as offsets into boot_params (boot.rst). */
#define BP_SETUP_SECTS         0x1f1
#define BP_BOOT_FLAG           0x1fe	/* u16, 0xAA55 */
#define BP_HEADER              0x202	/* u32, "HdrS" */
#define BP_VERSION             0x206	/* u16 */
#define BP_TYPE_OF_LOADER      0x210
#define BP_LOADFLAGS           0x211
#define BP_CODE32_START        0x214
#define BP_RAMDISK_IMAGE       0x218
#define BP_RAMDISK_SIZE        0x21c
#define BP_CMD_LINE_PTR        0x228
#define BP_CMDLINE_SIZE        0x238
#define BOOT_FLAG_MAGIC        0xAA55
#define HDRS_MAGIC             0x53726448

struct __attribute__((packed)) boot_e820_entry {
	uint64_t addr;
	uint64_t size;
	uint32_t type;
};

/* ---- PVH: struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h) ---- */
#define XEN_HVM_START_MAGIC_VALUE 0x336ec578

struct hvm_start_info {
	uint32_t magic;
	uint32_t version;
	uint32_t flags;
	uint32_t nr_modules;
	uint64_t modlist_paddr;
	uint64_t cmdline_paddr;
	uint64_t rsdp_paddr;
	/* version 1 and later */
	uint64_t memmap_paddr;
	uint32_t memmap_entries;
	uint32_t reserved;
};

struct hvm_modlist_entry {
	uint64_t paddr;
	uint64_t size;
	uint64_t cmdline_paddr;
	uint64_t reserved;
};

struct hvm_memmap_table_entry {
	uint64_t addr;
	uint64_t size;
	uint32_t type;
	uint32_t reserved;
};

/* ---- Multiboot v1 (Multiboot Specification 0.6.96, section 3.3) ---- */
#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002
#define MULTIBOOT_INFO_MEMORY      (1u << 0)
#define MULTIBOOT_INFO_CMDLINE     (1u << 2)
#define MULTIBOOT_INFO_MODS        (1u << 3)
#define MULTIBOOT_INFO_MEM_MAP     (1u << 6)

struct multiboot_info {
	uint32_t flags;
	uint32_t mem_lower;
	uint32_t mem_upper;
	uint32_t boot_device;
	uint32_t cmdline;
	uint32_t mods_count;
	uint32_t mods_addr;
	uint32_t syms[4];
	uint32_t mmap_length;
	uint32_t mmap_addr;
};

struct multiboot_module {
	uint32_t mod_start;
	uint32_t mod_end;
	uint32_t string;
	uint32_t reserved;
};

/* `size` counts the bytes after itself; the next entry is at +size+4. */
struct __attribute__((packed)) multiboot_mmap_entry {
	uint32_t size;
	uint64_t addr;
	uint64_t len;
	uint32_t type;
};

/* E820 / memory map entry types (ACPI 6.4 table 15.312). */
#define E820_RAM        1
#define E820_RESERVED   2
#define E820_ACPI       3
#define E820_NVS        4
#define E820_UNUSABLE   5

#endif
