/*
 * Application-processor start-up, driven from ring 3.
 *
 * The page tables map the local APIC and low memory user-accessible, so the
 * BSP prepares each AP's TSS and GDT descriptor, copies the real-mode
 * trampoline below 1 MiB and sends INIT-SIPI-SIPI (SDM Vol. 3A 8.4.4.1)
 * without leaving ring 3.  Each AP runs a few dozen ring-0 instructions
 * (trampoline.S, ap_entry64 in head.S) and continues in ring 3 in ap_start().
 */
#include "bootparam.h"
#include "tiny.h"

#define SVR_APIC_ENABLE     0x100
#define SVR_SPURIOUS_VECTOR 0xff
#define ICR_DELIVERY_STATUS (1u << 12)
/* Interrupt Command Register fields (SDM Vol. 3A 10.6.1). */
#define ICR_ALL_BUT_SELF    (3u << 18)
#define ICR_LEVEL_ASSERT    (1u << 14)
#define ICR_INIT            (5u << 8)
#define ICR_STARTUP         (6u << 8)
#define TSC_PER_MS          3000000ull	/* an upper bound: timeouts only get longer */

struct __attribute__((packed)) tss64 {
	uint32_t reserved0;
	uint64_t rsp[3];
	uint64_t reserved1;
	uint64_t ist[7];
	uint64_t reserved2;
	uint16_t reserved3;
	uint16_t iomap_base;
};

extern char smp_trampoline_start[], smp_trampoline_end[];
extern uint64_t gdt_tss[];
extern uint8_t tss_array[];
extern char kstacks[];

struct cpu_report smp_cpus[MAX_CPUS];
volatile uint32_t smp_ap_count;

void ap_start(int cpu);

void spin_ms(uint32_t ms)
{
	uint64_t end = rdtsc() + ms * TSC_PER_MS;
	while (rdtsc() < end)
		cpu_relax();
}

static void record_self(int cpu)
{
	struct cpu_report *r = &smp_cpus[cpu];
	uint32_t a, b, c, d, max;
	r->lapic_id = lapic_id();
	cpuid(0, 0, &max, &b, &c, &d);
	cpuid(1, 0, &a, &b, &c, &d);
	r->cpuid_apic_id = b >> 24;
	r->x2apic_id = ~0u;
	if (max >= 0xb) {
		cpuid(0xb, 0, &a, &b, &c, &d);
		if (b)	/* leaf 0xB is valid when EBX is non-zero */
			r->x2apic_id = d;
	}
}

/* The AP's own TSS (ring-0 stacks) and its available-TSS descriptor. */
static void prepare_cpu(int cpu)
{
	struct tss64 *t = (struct tss64 *)(tss_array + cpu * TSS_STRIDE);
	t->rsp[0] = (uint64_t)kstacks + (uint64_t)(cpu + 1) * KSTACK_SIZE;
	t->ist[0] = (uint64_t)kstacks + (uint64_t)cpu * KSTACK_SIZE + DFSTACK_SIZE;
	uint64_t base = (uint64_t)t;
	uint32_t limit = t->iomap_base + IO_BITMAP_SIZE;
	gdt_tss[2 * cpu] = (limit & 0xffff) | (base & 0xffffff) << 16 | 0x89ull << 40 |
			   (uint64_t)((limit >> 16) & 0xf) << 48 | ((base >> 24) & 0xff) << 56;
	gdt_tss[2 * cpu + 1] = base >> 32;
}

static void send_ipi(uint32_t icr)
{
	lapic_write(LAPIC_ICR_HIGH, 0);
	lapic_write(LAPIC_ICR_LOW, icr);
	for (int i = 0; i < 100000 && (lapic_read(LAPIC_ICR_LOW) & ICR_DELIVERY_STATUS); i++)
		cpu_relax();
}

void ap_start(int cpu)
{
	record_self(cpu);
	__atomic_store_n(&smp_cpus[cpu].arrived, 1, __ATOMIC_RELEASE);
	__atomic_add_fetch(&smp_ap_count, 1, __ATOMIC_SEQ_CST);
	ap_main(cpu);
	halt_forever();
}

__attribute__((weak)) void ap_main(int cpu)
{
	(void)cpu;
}

/* The loader's memory map must call the trampoline page RAM before we write it. */
static bool trampoline_page_is_ram(void)
{
	for (int i = 0; i < boot.n_mem; i++) {
		const struct mem_range *m = &boot.mem[i];
		if (m->type == E820_RAM && m->addr <= SMP_TRAMPOLINE_ADDR && SMP_TRAMPOLINE_ADDR + 0x1000 <= m->addr + m->size)
			return true;
	}
	return false;
}

int smp_boot(int want, uint32_t timeout_ms)
{
	static bool started;
	record_self(0);
	smp_cpus[0].arrived = 1;
	if (want <= 0 || started)
		return (int)smp_ap_count;
	started = true;
	if (!trampoline_page_is_ram()) {
		printf("tiny: smp: the memory map does not list [%#x, %#x) as RAM; not starting APs\n",
		       SMP_TRAMPOLINE_ADDR, SMP_TRAMPOLINE_ADDR + 0x1000);
		return 0;
	}
	for (int cpu = 1; cpu < MAX_CPUS; cpu++)
		prepare_cpu(cpu);
	memcpy((void *)SMP_TRAMPOLINE_ADDR, smp_trampoline_start,
	       (size_t)(smp_trampoline_end - smp_trampoline_start));
	lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | SVR_APIC_ENABLE | SVR_SPURIOUS_VECTOR);

	uint32_t vector = SMP_TRAMPOLINE_ADDR >> 12;
	send_ipi(ICR_ALL_BUT_SELF | ICR_LEVEL_ASSERT | ICR_INIT);
	spin_ms(1);
	send_ipi(ICR_ALL_BUT_SELF | ICR_LEVEL_ASSERT | ICR_STARTUP | vector);
	uint64_t end = rdtsc() + timeout_ms * TSC_PER_MS;
	uint64_t second_sipi = rdtsc() + TSC_PER_MS / 5;	/* ~200 us, as the MP spec asks */
	bool resent = false;
	while (smp_ap_count < (uint32_t)want && rdtsc() < end) {
		if (!resent && rdtsc() >= second_sipi) {
			send_ipi(ICR_ALL_BUT_SELF | ICR_LEVEL_ASSERT | ICR_STARTUP | vector);
			resent = true;
		}
		cpu_relax();
	}
	return (int)smp_ap_count;
}
