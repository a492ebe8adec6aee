/*
 * Ring 0's only C code: the exception handler.
 *
 * A #GP from ring 3 is one of three things: an `in`/`out` the CPU refused
 * although IOPL is 3 and the TSS bitmap allows it (some nested hypervisors
 * ignore both), performed here and counted; a `hlt`, which is how ring 3 asks
 * ring 0 for something (SYS_* in tiny_abi.h); or a real fault.  Every other
 * exception is fatal: it is reported and the guest exits with
 * EXIT_EXCEPTION_BASE + vector.  This code is emulated instruction by
 * instruction on some hosts, so the fast paths are short.
 */
#include "tiny.h"

#define VEC_PF 14
#define VEC_GP 13
#define OPSIZE_PREFIX 0x66
#define OP_HLT 0xf4

volatile uint64_t gp_io_emulated;

void trap_dispatch(struct trap_frame *f);
void triple_fault_now(void);

static const char *const exception_names[IDT_VECTORS] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM",
	"#DF", "CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "reserved",
	"#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "reserved", "reserved",
	"reserved", "reserved", "reserved", "reserved", "#HV", "#VC", "#SX", "reserved",
};

static NORETURN void ring0_halt(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

static uint64_t read_cr2(void)
{
	uint64_t v;
	__asm__ volatile("mov %%cr2, %0" : "=r"(v));
	return v;
}

static NORETURN void fatal(struct trap_frame *f, const char *why)
{
	unsigned vec = (unsigned)f->vector;
	kprintf("\ntiny: %s: vector %u (%s) error %#lx rip %#lx cs %#lx rsp %#lx ring %lu",
		why, vec, vec < IDT_VECTORS ? exception_names[vec] : "?", f->error, f->rip, f->cs,
		f->rsp, f->cs & 3);
	if (vec == VEC_PF)
		kprintf(" cr2 %#lx", read_cr2());
	kprintf("\ntiny: exit code %#x\n", EXIT_EXCEPTION_BASE + vec);
	outl(DEBUG_EXIT_PORT, EXIT_EXCEPTION_BASE + vec);
	ring0_halt();
}

/* in/out, imm8 or DX port forms, 1/2/4 bytes (SDM Vol. 2 "IN", "OUT"). */
static bool emulate_port_io(struct trap_frame *f, const uint8_t *ip)
{
	unsigned len = 0, size = 4;
	if (ip[0] == OPSIZE_PREFIX)
		size = 2, len = 1;
	uint8_t op = ip[len];
	uint16_t port;
	if (op >= 0xe4 && op <= 0xe7)
		port = ip[len + 1], len += 2;
	else if (op >= 0xec && op <= 0xef)
		port = (uint16_t)f->rdx, len += 1;
	else
		return false;
	if (!(op & 1))
		size = 1;
	if (op & 2) {	/* out */
		if (size == 1) outb(port, (uint8_t)f->rax);
		else if (size == 2) outw(port, (uint16_t)f->rax);
		else outl(port, (uint32_t)f->rax);
	} else if (size == 1) {
		f->rax = (f->rax & ~0xffull) | inb(port);
	} else if (size == 2) {
		f->rax = (f->rax & ~0xffffull) | inw(port);
	} else {
		f->rax = inl(port);	/* a 32-bit write zero-extends */
	}
	f->rip += len;
	gp_io_emulated++;
	return true;
}

static void ring0_request(struct trap_frame *f)
{
	uint64_t lo, hi;
	switch (f->rax) {
	case SYS_HALT:
		ring0_halt();
	case SYS_RDMSR:
		__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"((uint32_t)f->rdi));
		f->rax = (hi << 32) | (uint32_t)lo;
		return;
	case SYS_WRMSR:
		__asm__ volatile("wrmsr" : : "c"((uint32_t)f->rdi), "a"((uint32_t)f->rsi),
				 "d"((uint32_t)(f->rsi >> 32)));
		return;
	case SYS_READ_CR:
		switch (f->rdi) {
		case 0: __asm__ volatile("mov %%cr0, %0" : "=r"(f->rax)); return;
		case 2: f->rax = read_cr2(); return;
		case 3: __asm__ volatile("mov %%cr3, %0" : "=r"(f->rax)); return;
		case 4: __asm__ volatile("mov %%cr4, %0" : "=r"(f->rax)); return;
		}
		break;
	case SYS_TRIPLE_FAULT:
		triple_fault_now();
	case SYS_CPUID: {
		uint32_t a, b, c, d;
		__asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"((uint32_t)f->rdi), "c"((uint32_t)f->rsi));
		f->rax = a, f->rbx = b, f->rcx = c, f->rdx = d;
		return;
	}
	}
	fatal(f, "unknown ring-0 request");
}

void trap_dispatch(struct trap_frame *f)
{
	if (f->vector == VEC_GP && (f->cs & 3) == 3 && f->error == 0) {
		const uint8_t *ip = (const uint8_t *)f->rip;
		if (ip[0] == OP_HLT) {
			f->rip += 1;
			ring0_request(f);
			return;
		}
		if (emulate_port_io(f, ip))
			return;
	}
	fatal(f, "unexpected exception");
}
