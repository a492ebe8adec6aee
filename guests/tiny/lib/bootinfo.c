/*
 * What the loader handed over, read from whichever structure the entry
 * protocol uses and normalised into `struct boot_info`.  Nothing here trusts
 * a pointer above 4 GiB (outside the identity map); bootcheck reports those.
 */
#include "bootparam.h"
#include "tiny.h"

struct boot_info boot;

const char *proto_name(int proto)
{
	switch (proto) {
	case PROTO_PVH: return "pvh";
	case PROTO_MULTIBOOT: return "multiboot";
	case PROTO_LINUX64: return "linux-64";
	case PROTO_LINUX32: return "linux-32";
	case PROTO_LINUX16: return "linux-16";
	default: return "unknown";
	}
}

static uint32_t rd32(uint64_t a) { return *(const volatile uint32_t *)a; }
static uint64_t rd64(uint64_t a) { return *(const volatile uint64_t *)a; }

static void add_mem(uint64_t addr, uint64_t size, uint32_t type)
{
	if (boot.n_mem == BOOT_MAX_MEM) {
		boot.mem_truncated = true;
		return;
	}
	boot.mem[boot.n_mem++] = (struct mem_range){ addr, size, type };
}

static void from_boot_params(uint64_t bp)
{
	if (!addr_ok(bp, 4096))
		return;
	uint16_t version = *(const uint16_t *)(bp + BP_VERSION);
	boot.cmdline_addr = rd32(bp + BP_CMD_LINE_PTR) | (uint64_t)rd32(bp + BP_EXT_CMD_LINE_PTR) << 32;
	boot.cmdline_limit = version >= 0x206 ? (uint64_t)rd32(bp + BP_CMDLINE_SIZE) + 1 : 256;
	boot.initrd_addr = rd32(bp + BP_RAMDISK_IMAGE) | (uint64_t)rd32(bp + BP_EXT_RAMDISK_IMAGE) << 32;
	boot.initrd_size = rd32(bp + BP_RAMDISK_SIZE) | (uint64_t)rd32(bp + BP_EXT_RAMDISK_SIZE) << 32;
	if (!boot.initrd_size)
		boot.initrd_addr = 0;
	boot.rsdp_addr = rd64(bp + BP_ACPI_RSDP_ADDR);
	unsigned n = *(const uint8_t *)(bp + BP_E820_ENTRIES);
	if (n > BP_E820_MAX) {
		n = BP_E820_MAX;
		boot.mem_truncated = true;
	}
	const struct boot_e820_entry *e = (const void *)(bp + BP_E820_TABLE);
	for (unsigned i = 0; i < n; i++)
		add_mem(e[i].addr, e[i].size, e[i].type);
}

static void from_pvh(uint64_t a)
{
	if (!addr_ok(a, sizeof(struct hvm_start_info)))
		return;
	const struct hvm_start_info *si = (const void *)a;
	boot.cmdline_addr = si->cmdline_paddr;
	boot.cmdline_limit = CMDLINE_MAX;
	boot.rsdp_addr = si->rsdp_paddr;
	if (si->nr_modules && addr_ok(si->modlist_paddr, sizeof(struct hvm_modlist_entry))) {
		const struct hvm_modlist_entry *m = (const void *)si->modlist_paddr;
		boot.initrd_addr = m->paddr;
		boot.initrd_size = m->size;
	}
	if (si->version >= 1 && si->memmap_paddr &&
	    addr_ok(si->memmap_paddr, (uint64_t)si->memmap_entries * sizeof(struct hvm_memmap_table_entry))) {
		const struct hvm_memmap_table_entry *e = (const void *)si->memmap_paddr;
		for (uint32_t i = 0; i < si->memmap_entries; i++)
			add_mem(e[i].addr, e[i].size, e[i].type);
	}
}

static void from_multiboot(uint64_t a)
{
	if (!addr_ok(a, sizeof(struct multiboot_info)))
		return;
	const struct multiboot_info *mbi = (const void *)a;
	if (mbi->flags & MULTIBOOT_INFO_CMDLINE) {
		boot.cmdline_addr = mbi->cmdline;
		boot.cmdline_limit = CMDLINE_MAX;
	}
	if ((mbi->flags & MULTIBOOT_INFO_MODS) && mbi->mods_count &&
	    addr_ok(mbi->mods_addr, sizeof(struct multiboot_module))) {
		const struct multiboot_module *m = (const void *)(uint64_t)mbi->mods_addr;
		boot.initrd_addr = m->mod_start;
		boot.initrd_size = m->mod_end >= m->mod_start ? m->mod_end - m->mod_start : 0;
	}
	if ((mbi->flags & MULTIBOOT_INFO_MEM_MAP) && addr_ok(mbi->mmap_addr, mbi->mmap_length)) {
		uint64_t p = mbi->mmap_addr, end = p + mbi->mmap_length;
		while (p + sizeof(struct multiboot_mmap_entry) <= end) {
			const struct multiboot_mmap_entry *e = (const void *)p;
			add_mem(e->addr, e->len, e->type);
			if (e->size < 20)	/* malformed: stop rather than loop */
				break;
			p += (uint64_t)e->size + 4;
		}
	} else if (mbi->flags & MULTIBOOT_INFO_MEMORY) {
		add_mem(0, (uint64_t)mbi->mem_lower << 10, E820_RAM);
		add_mem(HIGH_MEMORY_START, (uint64_t)mbi->mem_upper << 10, E820_RAM);
	}
}

void bootinfo_init(void)
{
	boot.proto = (int)boot_proto;
	boot.proto_name = proto_name(boot.proto);
	boot.info_addr = boot_info;
	boot.entry_eax = boot_entry_eax;
	switch (boot.proto) {
	case PROTO_LINUX64:
	case PROTO_LINUX32:
	case PROTO_LINUX16:
		from_boot_params(boot_info);
		break;
	case PROTO_PVH:
		from_pvh(boot_info);
		break;
	case PROTO_MULTIBOOT:
		from_multiboot(boot_info);
		break;
	}
}
