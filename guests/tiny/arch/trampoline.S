/*
 * Application-processor start-up code.  The BSP copies the bytes between
 * smp_trampoline_start and smp_trampoline_end to SMP_TRAMPOLINE_ADDR (below
 * 1 MiB, page aligned) and sends INIT-SIPI-SIPI with that page as the vector;
 * each AP starts here in real mode with CS = page << 8, IP = 0.
 *
 * It goes straight from real mode to long mode (PAE, EFER.LME, then CR0.PE and
 * CR0.PG in one write, which the architecture permits) and far-jumps into
 * ap_entry64 with the shared GDT and page tables.  Everything it reads is
 * addressed relative to its own start, so it runs from any page.
 */
#include "tiny_abi.h"

#define REL(sym) ((sym) - smp_trampoline_start)

	.section .rodata.trampoline, "a"
	.code16
	.balign 16
	.globl smp_trampoline_start, smp_trampoline_end
smp_trampoline_start:
	cli
	cld
	movw	%cs, %ax
	movw	%ax, %ds
	movl	$CR4_PAE, %eax
	movl	%eax, %cr4
	movl	REL(tramp_cr3), %eax
	movl	%eax, %cr3
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	wrmsr
	lgdtl	REL(tramp_gdtr)
	movl	%cr0, %eax
	andl	$~(CR0_CD | CR0_NW), %eax
	orl	$(CR0_PE | CR0_PG), %eax
	movl	%eax, %cr0
	ljmpl	*REL(tramp_target)

	.balign 8
	.word	0
tramp_gdtr:				/* limit, 32-bit base of the shared GDT */
	.word	gdt_limit
	.long	gdt
tramp_cr3:
	.long	pml4
tramp_target:				/* m16:32 far pointer */
	.long	ap_entry64
	.word	KERNEL_CS
smp_trampoline_end:
