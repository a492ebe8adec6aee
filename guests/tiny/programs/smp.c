/*
 * smp: starts the application processors; each prints its APIC ID, and the
 * boot CPU exits 0 once all of them did (EXIT_SMP_FAILED otherwise).  The
 * vCPU count comes from `vcpus=N` on the command line, else from the MADT.
 */
#include "tiny.h"

const char tiny_guest_name[] = "smp";

static volatile uint32_t reported;

void ap_main(int cpu)
{
	printf("smp: cpu %d up, apic id %u\n", cpu, smp_cpus[cpu].lapic_id);
	__atomic_add_fetch(&reported, 1, __ATOMIC_SEQ_CST);
}

static int vcpus_from_madt(void)
{
	const struct acpi_sdt *madt = acpi_find_table(acpi_find_rsdp(NULL), "APIC");
	uint32_t ids[MAX_CPUS];
	int ioapics;
	return madt ? acpi_madt_cpus(madt, ids, MAX_CPUS, &ioapics) : 1;
}

int main(void)
{
	int vcpus = (int)cmdline_u64("vcpus", 0);
	if (vcpus <= 0)
		vcpus = vcpus_from_madt();
	if (vcpus > MAX_CPUS)
		vcpus = MAX_CPUS;
	printf("smp: cpu 0 up, apic id %u; starting %d more\n", lapic_id(), vcpus - 1);
	int arrived = smp_boot(vcpus - 1, 2000);
	uint64_t end = rdtsc() + 2000 * 3000000ull;
	while (reported < (uint32_t)arrived && rdtsc() < end)
		cpu_relax();
	printf("smp: %d of %d cpus up\n", arrived + 1, vcpus);
	return arrived == vcpus - 1 ? 0 : EXIT_SMP_FAILED;
}
