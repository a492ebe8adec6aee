/*
 * bootcheck: verifies from inside the guest what the loader promised, as TAP
 * (`ok N - name`, `not ok N - name # detail`, `ok N - name # SKIP why`),
 * and exits with the number of failures.
 *
 * Command line words it reads (all optional):
 *   mem_mib=N                   total RAM the VMM was given
 *   vcpus=N                     vCPU count: MADT LAPICs, and N > 1 starts the APs
 *   initrd_size=N initrd_sum=H  initrd length and CRC-32 (zlib's) in hex;
 *                               build.py's initrd_cmdline() writes both
 *   acpi=off                    skip the ACPI checks
 *   smp_timeout_ms=N            how long to wait for the APs (default 2000)
 */
#include "bootparam.h"
#include "tap.h"
#include "tiny.h"

const char tiny_guest_name[] = "bootcheck";

#define PLAN 19
#define MIB (1ull << 20)

/* ---- CPU ---- */
static void check_long_mode(void)
{
	uint64_t efer = rdmsr(MSR_EFER), cr0 = read_cr(0), cr4 = read_cr(4);
	bool ok = (efer & EFER_LMA) && (efer & EFER_LME) && (cr0 & CR0_PG) && (cr4 & CR4_PAE);
	tap_result(ok, "long mode active", ok ? NULL : "efer %#lx cr0 %#lx cr4 %#lx", efer, cr0, cr4);
}

static void check_cpuid(void)
{
	uint32_t a, b, c, d, max;
	cpuid(0, 0, &max, &b, &c, &d);
	cpuid(1, 0, &a, &b, &c, &d);
	tap_result(c & (1u << 31), "cpuid hypervisor bit", c & (1u << 31) ? NULL : "leaf 1 ecx %#x", c);

	uint32_t lapic = lapic_id();
	uint32_t initial = b >> 24;
	uint32_t a3, b3, c3, d3;
	cpuid_ring3(1, 0, &a3, &b3, &c3, &d3);
	if (b3 >> 24 != initial)	/* a host fact worth seeing, not a loader failure */
		printf("# note: cpuid in ring 3 reports apic id %u, in ring 0 %u: this host does not intercept "
		       "ring-3 cpuid\n", b3 >> 24, initial);
	tap_result(initial == lapic, "apic id: cpuid leaf 1 matches the local APIC",
	       "cpuid %u, lapic %u", initial, lapic);
	if (max < 0xb) {
		tap_skip("apic id: cpuid leaf 0xb matches the local APIC", "no leaf 0xb");
		return;
	}
	cpuid(0xb, 0, &a, &b, &c, &d);
	if (!b)
		tap_skip("apic id: cpuid leaf 0xb matches the local APIC", "leaf 0xb not populated");
	else
		tap_result(d == lapic, "apic id: cpuid leaf 0xb matches the local APIC", "x2apic id %u, lapic %u", d, lapic);
}

/* ---- boot information ---- */
static void check_entry_magic(void)
{
	const char *name = "boot information magic";
	uint64_t info = boot.info_addr;
	switch (boot.proto) {
	case PROTO_PVH: {
		if (!addr_ok(info, sizeof(struct hvm_start_info))) {
			tap_result(false, name, "hvm_start_info at %#lx is beyond 4 GiB", info);
			return;
		}
		const struct hvm_start_info *si = (const void *)info;
		tap_result(si->magic == XEN_HVM_START_MAGIC_VALUE, name, "pvh: hvm_start_info at %#lx magic %#x version %u",
		       info, si->magic, si->version);
		return;
	}
	case PROTO_MULTIBOOT:
		tap_result(boot.entry_eax == MULTIBOOT_BOOTLOADER_MAGIC, name, "multiboot: eax %#x, info at %#lx",
		       boot.entry_eax, info);
		return;
	case PROTO_LINUX64:
	case PROTO_LINUX32:
	case PROTO_LINUX16: {
		if (!addr_ok(info, 4096)) {
			tap_result(false, name, "boot_params at %#lx is beyond 4 GiB", info);
			return;
		}
		uint16_t flag = *(const uint16_t *)(info + BP_BOOT_FLAG);
		uint32_t hdrs = *(const uint32_t *)(info + BP_HEADER);
		uint16_t version = *(const uint16_t *)(info + BP_VERSION);
		tap_result(flag == BOOT_FLAG_MAGIC && hdrs == HDRS_MAGIC && version >= 0x200, name,
		       "%s: boot_params at %#lx boot_flag %#x header %#x version %#x", boot.proto_name, info, flag,
		       hdrs, version);
		return;
	}
	default:
		tap_result(false, name, "unknown entry protocol %d", boot.proto);
	}
}

static void check_cmdline(void)
{
	const char *name = "cmdline pointer and bytes";
	uint64_t a = boot.cmdline_addr;
	if (!a) {
		tap_result(false, name, "no cmdline pointer");
		return;
	}
	if (!addr_ok(a, 1)) {
		tap_result(false, name, "cmdline at %#lx is beyond 4 GiB", a);
		return;
	}
	const char *s = (const char *)a;
	uint64_t limit = boot.cmdline_limit;
	uint64_t n = 0;
	while (n < limit && addr_ok(a, n + 1) && s[n])
		n++;
	if (n == limit) {
		tap_result(false, name, "no NUL within %lu bytes at %#lx", limit, a);
		return;
	}
	for (uint64_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c < 0x20 || c > 0x7e) {
			tap_result(false, name, "byte %#x at offset %lu is not printable", c, i);
			return;
		}
	}
	tap_result(true, name, "%lu bytes at %#lx", n, a);
}

static bool overlaps(const struct mem_range *x, const struct mem_range *y)
{
	return x->addr < y->addr + y->size && y->addr < x->addr + x->size;
}

static void check_memory_map(void)
{
	tap_result(boot.n_mem > 0 && !boot.mem_truncated, "memory map present", "%d entries%s", boot.n_mem,
	       boot.mem_truncated ? ", truncated" : "");

	int bad_i = -1, bad_j = -1;
	for (int i = 0; i < boot.n_mem && bad_i < 0; i++)
		for (int j = i + 1; j < boot.n_mem; j++)
			if (boot.mem[i].size && boot.mem[j].size && overlaps(&boot.mem[i], &boot.mem[j])) {
				bad_i = i, bad_j = j;
				break;
			}
	if (bad_i >= 0)
		tap_result(false, "memory map has no overlaps", "[%#lx, +%#lx) type %u overlaps [%#lx, +%#lx) type %u",
		       boot.mem[bad_i].addr, boot.mem[bad_i].size, boot.mem[bad_i].type, boot.mem[bad_j].addr,
		       boot.mem[bad_j].size, boot.mem[bad_j].type);
	else
		tap_result(true, "memory map has no overlaps", NULL);

	uint64_t k0 = (uint64_t)_start, k1 = (uint64_t)_end;
	bool covered = false;
	for (int i = 0; i < boot.n_mem; i++) {
		const struct mem_range *m = &boot.mem[i];
		if (m->type == E820_RAM && m->addr <= k0 && k1 <= m->addr + m->size)
			covered = true;
	}
	tap_result(covered, "memory map: a RAM entry covers the kernel", "kernel [%#lx, %#lx)", k0, k1);

	uint64_t total = 0;
	for (int i = 0; i < boot.n_mem; i++)
		if (boot.mem[i].type == E820_RAM)
			total += boot.mem[i].size;
	if (!cmdline_has("mem_mib")) {
		tap_skip("memory map: total RAM matches mem_mib", "no mem_mib= on the cmdline");
		return;
	}
	/* Everything but the legacy area below 1 MiB (EBDA, VGA, BIOS) must be RAM. */
	uint64_t want = cmdline_u64("mem_mib", 0) * MIB;
	tap_result(total <= want && total + MIB >= want, "memory map: total RAM matches mem_mib",
	       "RAM %lu KiB, mem_mib %lu KiB", total >> 10, want >> 10);
}

static void check_initrd(void)
{
	bool have_size = cmdline_has("initrd_size"), have_sum = cmdline_has("initrd_sum");
	uint64_t size = cmdline_u64("initrd_size", 0);
	if (!have_size)
		tap_skip("initrd size", "no initrd_size= on the cmdline");
	else
		tap_result(boot.initrd_size == size && (size == 0 || boot.initrd_addr), "initrd size",
		       "loader says %lu bytes at %#lx, cmdline %lu", boot.initrd_size, boot.initrd_addr, size);

	if (!have_sum) {
		tap_skip("initrd checksum", "no initrd_sum= on the cmdline");
		return;
	}
	uint32_t want = (uint32_t)cmdline_hex("initrd_sum", 0);
	if (!addr_ok(boot.initrd_addr, boot.initrd_size) || (boot.initrd_size && !boot.initrd_addr)) {
		tap_result(false, "initrd checksum", "initrd [%#lx, +%#lx) is not reachable", boot.initrd_addr,
		       boot.initrd_size);
		return;
	}
	uint32_t got = crc32(0, (const void *)boot.initrd_addr, boot.initrd_size);
	tap_result(got == want, "initrd checksum", "crc32 %08x, cmdline %08x over %lu bytes", got, want, boot.initrd_size);
}

/* ---- ACPI ---- */
#define FADT_DSDT      40	/* u32 */
#define FADT_X_DSDT    140	/* u64, ACPI 2.0+ */

static bool table_ok(uint64_t a, char *bad, size_t badsize)
{
	if (!addr_ok(a, sizeof(struct acpi_sdt))) {
		snprintf(bad, badsize, "table at %#lx beyond 4 GiB", a);
		return false;
	}
	const struct acpi_sdt *t = (const void *)a;
	if (t->length < sizeof(*t) || !addr_ok(a, t->length) || !acpi_sum_ok(t, t->length)) {
		snprintf(bad, badsize, "%.4s at %#lx (length %u) has a bad checksum", t->signature, a, t->length);
		return false;
	}
	return true;
}

static void check_acpi(uint32_t *madt_ids, int *n_madt)
{
	static const char *const names[] = {
		"acpi: RSDP found and checksummed",
		"acpi: XSDT (or RSDT) checksum",
		"acpi: every table's checksum",
		"acpi: MADT has one enabled LAPIC per vCPU",
		"acpi: MADT has an IOAPIC",
	};
	*n_madt = -1;
	char off[8] = "";
	if (cmdline_get("acpi", off, sizeof(off)) && !strcmp(off, "off")) {
		for (size_t i = 0; i < ARRAY_SIZE(names); i++)
			tap_skip(names[i], "acpi=off");
		return;
	}

	const char *how;
	uint64_t rsdp = acpi_find_rsdp(&how);
	bool rsdp_ok = false;
	if (!rsdp) {
		tap_result(false, names[0], "no RSDP from the loader, in the EBDA or in [%#x, %#x)", BIOS_AREA_START,
		       BIOS_AREA_END);
	} else if (!addr_ok(rsdp, sizeof(struct acpi_rsdp))) {
		tap_result(false, names[0], "RSDP at %#lx beyond 4 GiB", rsdp);
	} else {
		const struct acpi_rsdp *r = (const void *)rsdp;
		bool sig = !memcmp(r->signature, "RSD PTR ", 8);
		bool sum = acpi_sum_ok(r, 20);
		bool ext = r->revision < 2 ||
			   (r->length >= sizeof(*r) && addr_ok(rsdp, r->length) && acpi_sum_ok(r, r->length));
		rsdp_ok = sig && sum && ext;
		tap_result(rsdp_ok, names[0], "at %#lx (%s), revision %u%s%s%s", rsdp, how, r->revision,
		       sig ? "" : ", bad signature", sum ? "" : ", bad checksum", ext ? "" : ", bad extended checksum");
	}
	if (!rsdp_ok) {
		for (size_t i = 1; i < ARRAY_SIZE(names); i++)
			tap_result(false, names[i], "no usable RSDP");
		return;
	}

	unsigned esize;
	uint64_t root = acpi_root_table(rsdp, &esize);
	char bad[96] = "";
	const char *root_sig = esize == 8 ? "XSDT" : "RSDT";
	bool root_ok = root && table_ok(root, bad, sizeof(bad)) && !memcmp((const void *)root, root_sig, 4);
	tap_result(root_ok, names[1], "%s at %#lx%s%s", root_sig, root, root_ok ? "" : ": ",
	       root_ok ? "" : bad[0] ? bad : "bad signature");
	if (!root_ok) {
		for (size_t i = 2; i < ARRAY_SIZE(names); i++)
			tap_result(false, names[i], "no usable %s", root_sig);
		return;
	}

	uint64_t tables[64];
	int n = acpi_tables(rsdp, tables, (int)ARRAY_SIZE(tables));
	int good = 0, checked = 0;
	bad[0] = 0;
	char sigs[160] = "";
	size_t used = 0;
	for (int i = 0; i <= n; i++) {
		uint64_t a;
		if (i < n) {
			a = tables[i];
		} else {	/* the DSDT hangs off the FADT, not the XSDT */
			const struct acpi_sdt *fadt = acpi_find_table(rsdp, "FACP");
			if (!fadt)
				break;
			a = fadt->length >= FADT_X_DSDT + 8 ? *(const uint64_t *)((const char *)fadt + FADT_X_DSDT) : 0;
			if (!a)
				a = *(const uint32_t *)((const char *)fadt + FADT_DSDT);
			if (!a)
				break;
		}
		checked++;
		char why[96];
		if (table_ok(a, why, sizeof(why))) {
			good++;
			if (used + 6 < sizeof(sigs))
				used += (size_t)snprintf(sigs + used, sizeof(sigs) - used, "%s%.4s", used ? " " : "",
							 (const char *)a);
		} else if (!bad[0]) {
			memcpy(bad, why, sizeof(why));
		}
	}
	tap_result(good == checked && checked > 0, names[2], "%s", bad[0] ? bad : sigs);

	const struct acpi_sdt *madt = acpi_find_table(rsdp, "APIC");
	if (!madt) {
		tap_result(false, names[3], "no MADT (APIC) table");
		tap_result(false, names[4], "no MADT (APIC) table");
		return;
	}
	int ioapics;
	int lapics = acpi_madt_cpus(madt, madt_ids, MAX_CPUS, &ioapics);
	*n_madt = lapics;
	uint64_t vcpus = cmdline_u64("vcpus", 0);
	if (vcpus)
		tap_result(lapics == (int)vcpus, names[3], "%d enabled LAPICs, vcpus=%lu", lapics, vcpus);
	else
		tap_result(lapics >= 1, names[3], "%d enabled LAPICs (no vcpus= on the cmdline)", lapics);
	tap_result(ioapics >= 1, names[4], "%d IOAPICs", ioapics);
}

/* ---- SMP ---- */
static void check_smp(const uint32_t *madt_ids, int n_madt)
{
	const char *started = "smp: every vCPU started with a distinct APIC ID";
	const char *match = "smp: MADT APIC IDs match the running CPUs";
	uint64_t vcpus = cmdline_u64("vcpus", 1);
	if (vcpus < 2) {
		tap_skip(started, "vcpus < 2");
		tap_skip(match, "vcpus < 2");
		return;
	}
	if (vcpus > MAX_CPUS) {
		tap_result(false, started, "vcpus=%lu exceeds the guest's %d", vcpus, MAX_CPUS);
		tap_skip(match, "too many vCPUs");
		return;
	}
	int want = (int)vcpus - 1;
	int got = smp_boot(want, (uint32_t)cmdline_u64("smp_timeout_ms", 2000));
	char detail[200];
	size_t used = (size_t)snprintf(detail, sizeof(detail), "%d of %d APs; apic ids", got, want);
	bool ok = got == want;
	int cpus = 0;
	uint32_t ids[MAX_CPUS];
	for (int cpu = 0; cpu < MAX_CPUS; cpu++) {
		const struct cpu_report *r = &smp_cpus[cpu];
		if (!r->arrived)
			continue;
		for (int j = 0; j < cpus; j++)
			if (ids[j] == r->lapic_id)
				ok = false;	/* duplicate */
		ids[cpus++] = r->lapic_id;
		if (used + 12 < sizeof(detail))
			used += (size_t)snprintf(detail + used, sizeof(detail) - used, " %u", r->lapic_id);
		if (r->cpuid_apic_id != r->lapic_id) {
			ok = false;
			if (used + 24 < sizeof(detail))
				used += (size_t)snprintf(detail + used, sizeof(detail) - used, " (cpuid says %u)",
							 r->cpuid_apic_id);
		}
	}
	tap_result(ok, started, "%s", detail);

	if (n_madt < 0) {
		tap_skip(match, "no MADT");
		return;
	}
	bool same = n_madt == cpus;
	for (int i = 0; same && i < cpus; i++) {
		bool found = false;
		for (int j = 0; j < n_madt && j < MAX_CPUS; j++)
			found |= madt_ids[j] == ids[i];
		same = found;
	}
	tap_result(same, match, "%d in the MADT, %d running", n_madt, cpus);
}

int main(void)
{
	uint32_t madt_ids[MAX_CPUS];
	int n_madt;
	printf("TAP version 13\n");
	tap_plan(PLAN);
	check_long_mode();
	check_entry_magic();
	check_cpuid();
	check_cmdline();
	check_memory_map();
	check_initrd();
	check_acpi(madt_ids, &n_madt);
	check_smp(madt_ids, n_madt);
	return tap_done();
}
