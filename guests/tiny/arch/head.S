/*
 * The image's first bytes and every ring-0 instruction of a normal boot.
 *
 * All entry protocols converge here: PVH, multiboot and the Linux 32-bit
 * protocol arrive in 32-bit protected mode at enter_long_mode; the Linux 64-bit
 * protocol arrives in long mode at startup_64 (image + 0x200).  From there one
 * 64-bit path loads our GDT, IDT and TSS and drops to ring 3 with iretq.
 *
 * Ring-0 code is emulated one instruction at a time on some hosts (KVM-PVM), so
 * everything that can be static is: page tables, GDT, TSS contents and the
 * I/O permission bitmap are assembled into .data.  The whole ring-0 path is a
 * few hundred instructions.
 */
#include "tiny_abi.h"

/* CPU 0's TSS limit: it reaches the byte after the shared I/O bitmap. */
#define TSS0_LIMIT (MAX_CPUS * TSS_STRIDE + IO_BITMAP_SIZE)

#if KSTACK_SIZE != 0x4000 || USTACK_SIZE != 0x4000
#error "ap_entry64 computes both stack tops with one shift by 14"
#endif

/* ------------------------------------------------------------------------ */
/* Image head: fixed offsets the boot protocol and build.py rely on.       */
/* ------------------------------------------------------------------------ */
	.section .head.text, "ax"
	.code32
	.globl startup_32
startup_32:				/* image + 0: Linux 32-bit boot protocol */
	jmp	linux32_entry

	/* boot.rst "The kernel_info": LToP header, sizes, setup_type_max. */
	.org	KERNEL_INFO_OFFSET
	.globl kernel_info
kernel_info:
	.ascii	"LToP"
	.long	16			/* size of the fixed part */
	.long	16			/* size_total */
	.long	0			/* setup_type_max: we read no setup_data */

	/* Read by build.py to fill init_size and check the payload length. */
	.org	IMAGE_INFO_OFFSET
image_info:
	.long	IMAGE_INFO_MAGIC
	.long	_end - startup_32	/* memory the image needs from its load address */
	.long	_edata - startup_32	/* bytes of the image file */
	.long	KERNEL_BASE

	.org	STARTUP_64_OFFSET
	.code64
	.globl startup_64
startup_64:				/* image + 0x200: Linux 64-bit boot protocol */
	cli
	cld
	movl	%eax, boot_entry_eax(%rip)
	movl	$PROTO_LINUX64, boot_proto(%rip)
	movq	%rsi, boot_info(%rip)
	lgdt	gdt_ptr(%rip)
	movq	%cr0, %rax
	andl	$~(CR0_CD | CR0_NW), %eax
	movq	%rax, %cr0
	leaq	pml4(%rip), %rax
	movq	%rax, %cr3
	pushq	$KERNEL_CS		/* reload CS from our GDT */
	leaq	common64(%rip), %rax
	pushq	%rax
	lretq

/* ------------------------------------------------------------------------ */
/* 32-bit protected mode (paging off) -> long mode.                         */
/* In: EAX = PROTO_*, EBX = boot information pointer. No stack needed.      */
/* ------------------------------------------------------------------------ */
	.text
	.code32
linux32_entry:
	cli
	cld
	movl	%eax, boot_entry_eax
	movl	$PROTO_LINUX32, %eax
	cmpl	$SETUP16_MAGIC, %edi	/* came through our own real-mode setup? */
	jne	1f
	movl	$PROTO_LINUX16, %eax
1:	movl	%esi, %ebx		/* boot_params */
	/* fall through */

	.globl enter_long_mode
enter_long_mode:
	movl	%eax, boot_proto
	movl	%ebx, boot_info
	lgdt	gdt_ptr			/* 32-bit lgdt reads the low half of the base */
	movl	%cr4, %eax
	orl	$CR4_PAE, %eax
	movl	%eax, %cr4
	movl	$pml4, %eax
	movl	%eax, %cr3
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	wrmsr
	movl	%cr0, %eax
	andl	$~(CR0_CD | CR0_NW), %eax
	orl	$(CR0_PG | CR0_PE), %eax
	movl	%eax, %cr0
	ljmp	$KERNEL_CS, $common64

/* ------------------------------------------------------------------------ */
/* Long mode, our GDT and page tables: IDT, TSS, then ring 3.               */
/* ------------------------------------------------------------------------ */
	.code64
common64:
	movl	$KERNEL_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	xorl	%eax, %eax
	movl	%eax, %fs
	movl	%eax, %gs
	leaq	kstacks + KSTACK_SIZE(%rip), %rsp

	/*
	 * IDT: the stubs are 16 bytes apart inside one 512-byte aligned block,
	 * so only the low 16 offset bits differ between gates: build gate 0,
	 * then add 16 per vector.
	 */
	leaq	isr_stubs(%rip), %rax
	movq	%rax, %rdx
	andl	$0xffff, %eax			/* offset 15:0 */
	shrq	$16, %rdx
	shlq	$48, %rdx			/* offset 31:16 (the image is below 4 GiB) */
	orq	%rdx, %rax
	movabsq	$((0x8e00 << 32) | (KERNEL_CS << 16)), %rdx	/* present 64-bit interrupt gate */
	orq	%rdx, %rax
	leaq	idt(%rip), %rdi
	movl	$IDT_VECTORS, %ecx
1:	movq	%rax, (%rdi)
	addq	$16, %rax
	addq	$16, %rdi
	decl	%ecx
	jnz	1b
	movb	$1, idt + 8 * 16 + 4(%rip)	/* #DF runs on IST1 */
	lidt	idt_ptr(%rip)

	/* TSS descriptor for CPU 0 (base split across the descriptor). */
	leaq	tss_array(%rip), %rax
	movq	%rax, %rdx
	shlq	$16, %rdx
	movabsq	$0x000000ffffff0000, %rcx
	andq	%rcx, %rdx			/* base 23:0 */
	movq	%rax, %rcx
	shrq	$24, %rcx
	shlq	$56, %rcx			/* base 31:24 */
	orq	%rcx, %rdx
	movabsq	$((0x89 << 40) | TSS0_LIMIT), %rcx	/* present, available 64-bit TSS */
	orq	%rcx, %rdx
	movq	%rdx, gdt_tss(%rip)
	movl	$TSS_SEL_BASE, %eax
	ltr	%ax

	/* Ring 3 with IOPL 3 and interrupts off. */
	pushq	$(USER_DS | 3)
	leaq	ustacks + USTACK_SIZE(%rip), %rax
	pushq	%rax
	pushq	$USER_RFLAGS
	pushq	$(USER_CS | 3)
	leaq	user_entry(%rip), %rax
	pushq	%rax
	iretq

/*
 * Application processors arrive here from the real-mode trampoline: long
 * mode, our GDT and CR3, a flat 64-bit CS.  Take the next CPU number, load
 * this CPU's TSS (prepared by the BSP from ring 3) and the shared IDT.
 */
	.globl ap_entry64
ap_entry64:
	movl	$KERNEL_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	xorl	%eax, %eax
	movl	%eax, %fs
	movl	%eax, %gs
	movl	$1, %ebx
	lock xaddl %ebx, ap_next_cpu(%rip)	/* EBX = this CPU's number (1..) */
	cmpl	$MAX_CPUS, %ebx
	jae	ap_park
	movl	%ebx, %eax
	incl	%eax
	shll	$14, %eax			/* (cpu + 1) * KSTACK_SIZE */
	leaq	kstacks(%rip), %rsp
	addq	%rax, %rsp
	leaq	ustacks(%rip), %rcx		/* ring-3 stack top: (cpu + 1) * USTACK_SIZE */
	addq	%rax, %rcx
	lidt	idt_ptr(%rip)
	movl	%ebx, %eax
	shll	$4, %eax
	addl	$TSS_SEL_BASE, %eax
	ltr	%ax
	pushq	$(USER_DS | 3)
	pushq	%rcx
	pushq	$USER_RFLAGS
	pushq	$(USER_CS | 3)
	leaq	ap_user_entry(%rip), %rax
	pushq	%rax
	movl	%ebx, %edi
	iretq
ap_park:
	cli
	hlt
	jmp	ap_park

/* ------------------------------------------------------------------------ */
/* Exceptions: one 16-byte stub per vector, then a common frame builder.    */
/* ------------------------------------------------------------------------ */
	.balign 512
isr_stubs:
	vector = 0
	.rept IDT_VECTORS
	.balign 16
	/* Vectors that push an error code (SDM Vol. 3A Table 6-1). */
	.if (vector == 8) | (vector == 10) | (vector == 11) | (vector == 12) | (vector == 13) | (vector == 14) | (vector == 17) | (vector == 21) | (vector == 29) | (vector == 30)
	pushq	$vector
	.else
	pushq	$0
	pushq	$vector
	.endif
	jmp	trap_common
	vector = vector + 1
	.endr

/* Frame layout: struct trap_frame in include/tiny.h. */
trap_common:
	pushq	%rax
	pushq	%rbx
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	pushq	%rbp
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	cld
	movq	%rsp, %rdi		/* 22 quadwords pushed: still 16-byte aligned */
	call	trap_dispatch
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rbp
	popq	%rdi
	popq	%rsi
	popq	%rdx
	popq	%rcx
	popq	%rbx
	popq	%rax
	addq	$16, %rsp		/* vector, error code */
	iretq

/* Ring 0 on request (SYS_TRIPLE_FAULT): no IDT, then a fault. */
	.globl triple_fault_now
triple_fault_now:
	lidt	null_idt_ptr(%rip)
	ud2
	jmp	triple_fault_now

/* ------------------------------------------------------------------------ */
/* Ring-3 entry points.                                                     */
/* ------------------------------------------------------------------------ */
user_entry:
	/* The Linux protocol does not clear .bss for us: do it natively here. */
	leaq	__bss_start(%rip), %rdi
	leaq	__bss_end(%rip), %rcx
	subq	%rdi, %rcx
	xorl	%eax, %eax
	rep stosb
	call	tiny_start		/* does not return */
	ud2

ap_user_entry:				/* EDI = CPU number */
	call	ap_start		/* does not return */
	ud2

/* ------------------------------------------------------------------------ */
/* Static descriptor tables and identity page tables.                       */
/* ------------------------------------------------------------------------ */
	.data
	.balign 16
	.globl boot_proto, boot_info, boot_entry_eax, ap_next_cpu
boot_info:	.quad 0
boot_proto:	.long 0
boot_entry_eax:	.long 0
ap_next_cpu:	.long 1

	.balign 16
	.globl gdt, gdt_tss
gdt:
	.quad	0
	.quad	0x00af9b000000ffff	/* 0x08 kernel code, 64-bit */
	.quad	0x00cf93000000ffff	/* 0x10 kernel data */
	.quad	0x00cff3000000ffff	/* 0x18 user data (DPL 3) */
	.quad	0x00affb000000ffff	/* 0x20 user code, 64-bit (DPL 3) */
	.quad	0x00cf9b000000ffff	/* 0x28 kernel code, 32-bit (AP trampoline) */
gdt_tss:
	.fill	MAX_CPUS * 2, 8, 0	/* 0x30 + 16 * n: CPU n's TSS */
gdt_end:
	.globl gdt_limit
	gdt_limit = gdt_end - gdt - 1	/* for the AP trampoline's lgdt */

	.balign 16
	.word	0			/* align the base of the pseudo-descriptors */
	.word	0
	.word	0
	.globl gdt_ptr
gdt_ptr:
	.word	gdt_end - gdt - 1
	.quad	gdt
	.word	0
	.word	0
	.word	0
idt_ptr:
	.word	IDT_VECTORS * 16 - 1
	.quad	idt
	.word	0
	.word	0
	.word	0
null_idt_ptr:
	.word	0
	.quad	0

	.balign 16
	.globl idt
idt:
	.fill	IDT_VECTORS * 2, 8, 0

/*
 * One 104-byte TSS per CPU, 128 bytes apart, followed by one I/O permission
 * bitmap that every TSS points at (iomap_base is relative to each TSS), so
 * ring 3 may use every port on every CPU.  CPU 0's stacks are static; the
 * BSP fills the others before it starts the APs.
 */
	.balign 128
	.globl tss_array, io_bitmap
tss_array:
	cpu = 0
	.rept MAX_CPUS
	.long	0
	.if cpu == 0
	.quad	kstacks + KSTACK_SIZE	/* RSP0 */
	.else
	.quad	0
	.endif
	.quad	0, 0, 0			/* RSP1, RSP2, reserved */
	.if cpu == 0
	.quad	kstacks + DFSTACK_SIZE	/* IST1: double faults */
	.else
	.quad	0
	.endif
	.quad	0, 0, 0, 0, 0, 0	/* IST2..IST7 */
	.quad	0
	.word	0
	.word	(MAX_CPUS - cpu) * TSS_STRIDE	/* iomap_base: the shared bitmap */
	.fill	TSS_STRIDE - 104, 1, 0
	cpu = cpu + 1
	.endr
io_bitmap:
	.fill	IO_BITMAP_SIZE, 1, 0	/* every port allowed */
	.byte	0xff			/* the byte after the bitmap must be all ones */

/*
 * Identity map of the low 4 GiB in 2 MiB pages, user-accessible (U/S) so
 * ring 3 reaches RAM, the MMIO hole and the local APIC.  The MMIO hole
 * (3 GiB and up) is mapped uncacheable.  1 GiB pages are avoided on purpose.
 */
	.section .data.pagetables, "aw"
	.balign 4096
	.globl pml4
pml4:
	.quad	pdpt + 0x7		/* present, writable, user */
	.fill	511, 8, 0
pdpt:
	.quad	pd + 0x0000 + 0x7
	.quad	pd + 0x1000 + 0x7
	.quad	pd + 0x2000 + 0x7
	.quad	pd + 0x3000 + 0x7
	.fill	508, 8, 0
pd:
	page = 0
	.rept 2048
	.if page >= 1536
	.quad	(page << 21) | 0x9f	/* P, RW, US, PWT, PCD, PS */
	.else
	.quad	(page << 21) | 0x87	/* P, RW, US, PS */
	.endif
	page = page + 1
	.endr

/* ------------------------------------------------------------------------ */
/* Per-CPU stacks: not part of the file and never cleared.                  */
/* ------------------------------------------------------------------------ */
	.section .stack, "aw", @nobits
	.balign 4096
	.globl kstacks, ustacks
kstacks:
	.skip	MAX_CPUS * KSTACK_SIZE
ustacks:
	.skip	MAX_CPUS * USTACK_SIZE
