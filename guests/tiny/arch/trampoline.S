/*
 * Application-processor start-up code.  The BSP copies the bytes between
 * smp_trampoline_start and smp_trampoline_end to SMP_TRAMPOLINE_ADDR (below
 * 1 MiB, page aligned) and sends INIT-SIPI-SIPI with that page as the vector;
 * each AP starts here in real mode with CS = page << 8, IP = 0.
 *
 * Real mode -> 32-bit protected mode on the shared GDT -> long mode (PAE,
 * EFER.LME, CR0.PG: SDM Vol. 3A 9.9.1 and 9.8.5), then a far jump into
 * ap_entry64.  The 16-bit part addresses its data relative to CS; the
 * 32-bit part runs at the fixed copy address.
 */
#include "tiny_abi.h"

#define REL(sym) ((sym) - smp_trampoline_start)
#define ABS(sym) (SMP_TRAMPOLINE_ADDR + REL(sym))

	.section .rodata.trampoline, "a"
	.code16
	.balign 16
	.globl smp_trampoline_start, smp_trampoline_end
smp_trampoline_start:
	cli
	cld
	movw	%cs, %ax
	movw	%ax, %ds
	lgdtl	REL(tramp_gdtr)
	movl	%cr0, %eax
	andl	$~(CR0_CD | CR0_NW), %eax
	orl	$CR0_PE, %eax
	movl	%eax, %cr0
	ljmpl	*REL(tramp_pm32)

	.code32
pm32:
	movl	$KERNEL_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	$CR4_PAE, %eax
	movl	%eax, %cr4
	movl	$pml4, %eax
	movl	%eax, %cr3
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	wrmsr
	movl	%cr0, %eax
	orl	$CR0_PG, %eax
	movl	%eax, %cr0
	ljmp	$KERNEL_CS, $ap_entry64

	.balign 8
	.word	0
tramp_gdtr:				/* limit, 32-bit base of the shared GDT */
	.word	gdt_limit
	.long	gdt
tramp_pm32:				/* m16:32 far pointer into pm32 above */
	.long	ABS(pm32)
	.word	KERNEL_CS32
smp_trampoline_end:
