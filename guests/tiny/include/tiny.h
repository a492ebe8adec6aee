/*
 * The tiny guests' runtime: everything a guest's main() may call.
 *
 * main() runs in ring 3 on the boot CPU, with interrupts off and IOPL 3; the
 * TSS I/O bitmap grants every port, the page tables map the low 4 GiB (RAM,
 * the MMIO hole, the local APIC) user-accessible.  Ring 0 is reached only
 * through faults (see tiny_abi.h, SYS_*).
 */
#ifndef TINY_H
#define TINY_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tiny_abi.h"
#include "tiny_layout.h"

#define NORETURN __attribute__((noreturn))
#define PRINTF_LIKE(f, a) __attribute__((format(printf, f, a)))
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* Each guest program defines its name, e.g. `const char tiny_guest_name[] = "hello";`. */
extern const char tiny_guest_name[];
/* Each guest program's entry: runs in ring 3 on the boot CPU; returns the exit code. */
int main(void);

/* ---- port I/O, MMIO, CPU ---- */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint16_t inw(uint16_t port) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* A pointer to physical address `a` (identity-mapped) that the compiler cannot reason about. */
static inline volatile void *phys(uint64_t a)
{
	__asm__("" : "+r"(a));
	return (volatile void *)a;
}

static inline void mmio_write32(uint64_t addr, uint32_t v) { *(volatile uint32_t *)addr = v; }
static inline uint32_t mmio_read32(uint64_t addr) { return *(volatile uint32_t *)addr; }
static inline void mmio_write8(uint64_t addr, uint8_t v) { *(volatile uint8_t *)addr = v; }

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* Local APIC registers (SDM Vol. 3A 10.4.1), reachable from ring 3. */
#define LAPIC_ID        0x020
#define LAPIC_SVR       0x0f0
#define LAPIC_ICR_LOW   0x300
#define LAPIC_ICR_HIGH  0x310
static inline uint32_t lapic_read(uint32_t reg) { return mmio_read32(LAPIC_ADDR + reg); }
static inline void lapic_write(uint32_t reg, uint32_t v) { mmio_write32(LAPIC_ADDR + reg, v); }
/* This CPU's xAPIC ID (bits 31:24 of the ID register). */
static inline uint32_t lapic_id(void) { return lapic_read(LAPIC_ID) >> 24; }

/* ---- ring-0 requests ---- */
static inline uint64_t tiny_syscall(uint64_t nr, uint64_t a0, uint64_t a1)
{
	uint64_t ret;
	__asm__ volatile("hlt" : "=a"(ret) : "a"(nr), "D"(a0), "S"(a1) : "memory");
	return ret;
}
/*
 * CPUID as the VM defines it, executed in ring 0.  Some hosts (KVM-PVM) do not
 * intercept CPUID in guest ring 3, where it reports the host CPU instead:
 * cpuid_ring3() is that raw instruction, for comparison only.
 */
static inline void cpuid(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
	uint64_t ra = SYS_CPUID, rb, rc, rd;
	__asm__ volatile("hlt" : "+a"(ra), "=b"(rb), "=c"(rc), "=d"(rd) : "D"((uint64_t)leaf), "S"((uint64_t)sub) : "memory");
	*a = (uint32_t)ra, *b = (uint32_t)rb, *c = (uint32_t)rc, *d = (uint32_t)rd;
}
static inline void cpuid_ring3(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static inline uint64_t rdmsr(uint32_t msr) { return tiny_syscall(SYS_RDMSR, msr, 0); }
static inline void wrmsr(uint32_t msr, uint64_t v) { tiny_syscall(SYS_WRMSR, msr, v); }
static inline uint64_t read_cr(int n) { return tiny_syscall(SYS_READ_CR, (uint64_t)n, 0); }
NORETURN void halt_forever(void);
NORETURN void triple_fault(void);

/* ---- exit, timers ---- */
/* Write `code` to the debug-exit port (32-bit out); halt if nobody is listening. */
NORETURN void exit(int code);
/* Firecracker's boot-timer convention: byte 123 to port 0x3f0. */
static inline void boot_timer_mark(void) { outb(BOOT_TIMER_PORT, BOOT_TIMER_MAGIC); }

/* ---- serial console (COM1, polled 16550) ---- */
void serial_init(void);
void serial_write(const char *s, size_t n);	/* "\n" goes out as "\r\n" */
int serial_getc(void);				/* blocks */
int serial_trygetc(void);			/* -1 when nothing is waiting */

/* ---- formatted output: %d %i %u %x %X %o %c %s %p %%, flags -0+ space, width, precision, l ll z ---- */
int printf(const char *fmt, ...) PRINTF_LIKE(1, 2);
int vprintf(const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) PRINTF_LIKE(3, 4);
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int puts(const char *s);
/* Unbuffered and lock-free, for ring 0 and for last words. */
int kprintf(const char *fmt, ...) PRINTF_LIKE(1, 2);

/* ---- command line: space-separated words, `key=value` or bare `key` ---- */
const char *cmdline(void);			/* the whole line (a bounded copy) */
bool cmdline_has(const char *key);		/* `key` or `key=...` present */
/* Copies the value of the last `key=value` into buf (NUL-terminated); false if absent. */
bool cmdline_get(const char *key, char *buf, size_t size);
/* Decimal or 0x-hex value of `key`, else dflt; a malformed value ends the guest (EXIT_BAD_CMDLINE). */
uint64_t cmdline_u64(const char *key, uint64_t dflt);
/* Like cmdline_u64 but the value is always hexadecimal (0x prefix optional). */
uint64_t cmdline_hex(const char *key, uint64_t dflt);

/* ---- what the loader said, normalised over the entry protocols ---- */
#define BOOT_MAX_MEM 128
struct mem_range {
	uint64_t addr;
	uint64_t size;
	uint32_t type;		/* E820_* */
};
struct boot_info {
	int proto;		/* PROTO_* */
	const char *proto_name;	/* "pvh", "multiboot", "linux-64", "linux-32", "linux-16" */
	uint64_t info_addr;	/* hvm_start_info, multiboot_info or boot_params */
	uint32_t entry_eax;	/* EAX at entry (the multiboot magic) */
	uint64_t cmdline_addr;	/* 0: none */
	uint64_t cmdline_limit;	/* the longest cmdline the protocol allows, NUL included */
	uint64_t initrd_addr;	/* 0: none */
	uint64_t initrd_size;
	uint64_t rsdp_addr;	/* 0: the loader did not say */
	int n_mem;
	bool mem_truncated;	/* more entries than BOOT_MAX_MEM */
	struct mem_range mem[BOOT_MAX_MEM];
};
extern struct boot_info boot;
extern uint64_t boot_info;	/* raw pointer register at entry (head.S) */
extern uint32_t boot_proto, boot_entry_eax;
void bootinfo_init(void);
const char *proto_name(int proto);
/* The image's extent, from the linker script. */
extern char _start[], _end[];

/* ---- port-I/O mode ---- */
/* How many in/out instructions ring 0 had to perform for ring 3 (#GP fallback). */
extern volatile uint64_t gp_io_emulated;
/* "native" when ring-3 in/out never faulted, else "gp-emulated". */
const char *portio_mode(void);

/* ---- SMP ---- */
struct cpu_report {
	volatile uint32_t arrived;	/* set last, by the AP itself */
	volatile uint32_t lapic_id;	/* LAPIC ID register */
	volatile uint32_t cpuid_apic_id;	/* CPUID.1:EBX[31:24] */
	volatile uint32_t x2apic_id;	/* CPUID.0BH:EDX, or ~0 when leaf 0xB is absent */
};
extern struct cpu_report smp_cpus[MAX_CPUS];	/* index: CPU number, 0 = BSP */
extern volatile uint32_t smp_ap_count;
/*
 * Start the APs (INIT-SIPI-SIPI to all but self) and wait until `want` of them
 * reported or about `timeout_ms` passed (assuming a TSC of at most 3 GHz).
 * Returns how many arrived.  Each AP runs ap_main(cpu) in ring 3 afterwards.
 */
int smp_boot(int want, uint32_t timeout_ms);
/* Weak; the default returns at once.  The AP halts when it returns. */
void ap_main(int cpu);
/* Busy-wait about `ms` milliseconds (TSC, assuming at most 3 GHz). */
void spin_ms(uint32_t ms);

/* ---- ACPI ---- */
struct __attribute__((packed)) acpi_rsdp {
	char signature[8];
	uint8_t checksum;
	char oem_id[6];
	uint8_t revision;
	uint32_t rsdt_address;
	uint32_t length;		/* revision 2+ */
	uint64_t xsdt_address;
	uint8_t extended_checksum;
	uint8_t reserved[3];
};
struct __attribute__((packed)) acpi_sdt {
	char signature[4];
	uint32_t length;
	uint8_t revision;
	uint8_t checksum;
	char oem_id[6];
	char oem_table_id[8];
	uint32_t oem_revision;
	uint32_t creator_id;
	uint32_t creator_revision;
};
/* Where the RSDP is: the loader's pointer, else the EBDA and BIOS-area scan; 0 if none. */
uint64_t acpi_find_rsdp(const char **how);
bool acpi_sum_ok(const void *p, size_t len);
/* Physical addresses of the tables the XSDT (or RSDT) lists; returns how many. */
int acpi_tables(uint64_t rsdp, uint64_t *out, int max);
/* The XSDT (entry_size 8) or RSDT (4) address, 0 when the RSDP is unusable. */
uint64_t acpi_root_table(uint64_t rsdp, unsigned *entry_size);
/* The first listed table with this signature, or NULL. */
const struct acpi_sdt *acpi_find_table(uint64_t rsdp, const char *sig);
/* Enabled local (x2)APIC IDs of a MADT into ids[max]; returns their count; counts IOAPICs. */
int acpi_madt_cpus(const struct acpi_sdt *madt, uint32_t *ids, int max, int *n_ioapic);
/* True when [addr, addr+len) lies below 4 GiB, where the page tables reach. */
bool addr_ok(uint64_t addr, uint64_t len);

/* ---- memory, strings, checksums ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
char *strchr(const char *s, int c);
/* CRC-32 (IEEE 802.3, zlib's crc32()): crc32(0, data, len) == zlib.crc32(data). */
uint32_t crc32(uint32_t crc, const void *data, size_t len);

/* ---- a spinlock that works in ring 0 and ring 3 ---- */
typedef struct { volatile uint32_t locked; } spinlock_t;
static inline void spin_lock(spinlock_t *l)
{
	while (__atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE))
		while (l->locked)
			cpu_relax();
}
static inline void spin_unlock(spinlock_t *l) { __atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE); }

/* ---- ring 0: the exception frame head.S builds (kept here for trap.c) ---- */
struct trap_frame {
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
	uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
	uint64_t vector, error;
	uint64_t rip, cs, rflags, rsp, ss;	/* pushed by the CPU */
};

#endif
