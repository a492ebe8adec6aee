/* Finding and checksumming ACPI tables (ACPI 6.4 sections 5.2.5 - 5.2.7). */
#include "tiny.h"

#define EBDA_SEGMENT_PTR 0x40e	/* BIOS data area: EBDA segment (ACPI 5.2.5.1) */

bool addr_ok(uint64_t addr, uint64_t len)
{
	return addr < MMIO_GAP_END && len <= MMIO_GAP_END - addr;
}

bool acpi_sum_ok(const void *p, size_t len)
{
	const uint8_t *b = p;
	uint8_t sum = 0;
	for (size_t i = 0; i < len; i++)
		sum = (uint8_t)(sum + b[i]);
	return sum == 0;
}

static bool rsdp_at(uint64_t a)
{
	return !memcmp((const void *)a, "RSD PTR ", 8) && acpi_sum_ok((const void *)a, 20);
}

static uint64_t scan(uint64_t start, uint64_t end)
{
	for (uint64_t a = start; a + 20 <= end; a += 16)
		if (rsdp_at(a))
			return a;
	return 0;
}

uint64_t acpi_find_rsdp(const char **how)
{
	const char *dummy;
	if (!how)
		how = &dummy;
	if (boot.rsdp_addr) {
		*how = "boot information";
		return boot.rsdp_addr;
	}
	uint64_t ebda = (uint64_t)*(volatile uint16_t *)phys(EBDA_SEGMENT_PTR) << 4;
	if (ebda >= 0x80000 && ebda < 0xa0000) {
		uint64_t a = scan(ebda, ebda + 1024);
		if (a) {
			*how = "EBDA scan";
			return a;
		}
	}
	uint64_t a = scan(BIOS_AREA_START, BIOS_AREA_END);
	*how = a ? "BIOS area scan" : "not found";
	return a;
}

/* The XSDT when the RSDP has one (revision 2+), else the RSDT; 0 if unusable. */
uint64_t acpi_root_table(uint64_t rsdp, unsigned *entry_size)
{
	if (!rsdp || !addr_ok(rsdp, sizeof(struct acpi_rsdp)))
		return 0;
	const struct acpi_rsdp *r = (const void *)rsdp;
	if (r->revision >= 2 && r->xsdt_address) {
		*entry_size = 8;
		return r->xsdt_address;
	}
	*entry_size = 4;
	return r->rsdt_address;
}

int acpi_tables(uint64_t rsdp, uint64_t *out, int max)
{
	unsigned esize;
	uint64_t root = acpi_root_table(rsdp, &esize);
	if (!root || !addr_ok(root, sizeof(struct acpi_sdt)))
		return 0;
	const struct acpi_sdt *sdt = (const void *)root;
	if (sdt->length < sizeof(*sdt) || !addr_ok(root, sdt->length))
		return 0;
	int n = 0;
	for (uint64_t p = root + sizeof(*sdt); p + esize <= root + sdt->length && n < max; p += esize)
		out[n++] = esize == 8 ? *(const uint64_t *)p : *(const uint32_t *)p;
	return n;
}

const struct acpi_sdt *acpi_find_table(uint64_t rsdp, const char *sig)
{
	uint64_t tables[64];
	int n = acpi_tables(rsdp, tables, (int)ARRAY_SIZE(tables));
	for (int i = 0; i < n; i++)
		if (addr_ok(tables[i], sizeof(struct acpi_sdt)) && !memcmp((const void *)tables[i], sig, 4))
			return (const void *)tables[i];
	return NULL;
}

#define MADT_ENTRIES_OFFSET 44	/* header, local APIC address, flags */
#define MADT_LOCAL_APIC     0
#define MADT_IO_APIC        1
#define MADT_LOCAL_X2APIC   9
#define MADT_ENABLED        1u

int acpi_madt_cpus(const struct acpi_sdt *madt, uint32_t *ids, int max, int *n_ioapic)
{
	int n = 0;
	*n_ioapic = 0;
	const uint8_t *p = (const uint8_t *)madt + MADT_ENTRIES_OFFSET;
	const uint8_t *end = (const uint8_t *)madt + madt->length;
	while (p + 2 <= end && p[1] >= 2 && p + p[1] <= end) {
		uint32_t id = ~0u, flags = 0;
		if (p[0] == MADT_LOCAL_APIC && p[1] >= 8) {
			id = p[3];
			memcpy(&flags, p + 4, 4);
		} else if (p[0] == MADT_LOCAL_X2APIC && p[1] >= 16) {
			memcpy(&id, p + 4, 4);
			memcpy(&flags, p + 8, 4);
		} else if (p[0] == MADT_IO_APIC) {
			(*n_ioapic)++;
		}
		if (id != ~0u && (flags & MADT_ENABLED)) {
			if (n < max)
				ids[n] = id;
			n++;
		}
		p += p[1];
	}
	return n;
}
