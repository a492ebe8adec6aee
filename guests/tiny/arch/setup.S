/*
 * The bzImage setup area (Documentation/arch/x86/boot.rst): boot sector,
 * setup header and real-mode code.
 *
 * Its first 4 KiB double as struct boot_params: apart from the setup header
 * at 0x1f1 they are zero, so a real-mode loader (QEMU's linuxboot ROM, qboot,
 * a BIOS boot loader) hands us a clean zero page in place.  The real-mode
 * entry fills its e820 table from INT 15h, switches to protected mode with the
 * boot protocol's __BOOT_CS/__BOOT_DS GDT and jumps to code32_start with
 * ESI = that zero page.  Protected-mode loaders never run this code.
 *
 * build.py patches setup_sects, syssize and init_size after linking.
 */
#include "tiny_abi.h"

/* struct boot_params offsets (Documentation/arch/x86/zero-page.rst). */
#define BP_E820_ENTRIES      0x1e8
#define BP_E820_TABLE        0x2d0
#define E820_MAX_ENTRIES     128
#define E820_ENTRY_SIZE      20
#define SMAP                 0x534d4150	/* "SMAP", INT 15h AX=E820h */

#define LOADED_HIGH          0x01
#define XLF_KERNEL_64        0x01
#define BOOT_CS              0x10	/* boot.rst: __BOOT_CS, __BOOT_DS */
#define BOOT_DS              0x18

	.section .setup, "ax"
	.code16
	.globl setup_start
setup_start:
	/* Boot sector: nothing but the header; we are never booted from disk. */
	.org	0x1f1
	.globl hdr
hdr:
setup_sects:	.byte	0		/* patched by build.py */
root_flags:	.word	0
syssize:	.long	0		/* patched by build.py */
ram_size:	.word	0
vid_mode:	.word	0xffff		/* NORMAL_VGA */
root_dev:	.word	0
boot_flag:	.word	0xaa55
	/* 0x200 */
jump:		.byte	0xeb, hdr_end - header	/* also tells loaders the header's length */
header:		.ascii	"HdrS"
version:	.word	0x020f
realmode_swtch:	.long	0
start_sys_seg:	.word	0x1000
kernel_version:	.word	version_string - setup_start - 0x200
type_of_loader:	.byte	0
loadflags:	.byte	LOADED_HIGH
setup_move_size: .word	0x8000
code32_start:	.long	KERNEL_BASE
ramdisk_image:	.long	0
ramdisk_size:	.long	0
bootsect_kludge: .long	0
heap_end_ptr:	.word	0
ext_loader_ver:	.byte	0
ext_loader_type: .byte	0
cmd_line_ptr:	.long	0
initrd_addr_max: .long	0x7fffffff
kernel_alignment: .long	0x1000
relocatable_kernel: .byte 0		/* linked for KERNEL_BASE only */
min_alignment:	.byte	12
xloadflags:	.word	XLF_KERNEL_64
cmdline_size:	.long	0xffff		/* the runtime copies up to 64 KiB - 1 */
hardware_subarch: .long	0
hardware_subarch_data: .quad 0
payload_offset:	.long	0
payload_length:	.long	0
setup_data:	.quad	0
pref_address:	.quad	KERNEL_BASE
init_size:	.long	0		/* patched by build.py */
handover_offset: .long	0
kernel_info_offset: .long KERNEL_INFO_OFFSET
	.org	0x26c			/* fails to assemble if the header grew */
hdr_end:
	jmp	real_start		/* in boot_params padding, ignored by loaders */

	/* The rest of the zero page stays zero. */
	.org	0x1000
real_start:
	cli
	cld
	pushw	%ds			/* CS = DS + 0x20 at entry: make CS = DS */
	pushw	$1f
	lretw
1:	movw	%ds, %ax
	movw	%ax, %es
	movw	%ax, %ss
	movw	$setup_stack_top, %sp

	/* BIOS memory map into boot_params.e820_table (INT 15h, AX=E820h). */
	xorl	%ebx, %ebx
	movw	$BP_E820_TABLE, %di
	xorw	%si, %si
2:	movl	$0xe820, %eax
	movl	$E820_ENTRY_SIZE, %ecx
	movl	$SMAP, %edx
	int	$0x15
	jc	3f
	cmpl	$SMAP, %eax
	jne	3f
	incw	%si
	addw	$E820_ENTRY_SIZE, %di
	testl	%ebx, %ebx
	jz	3f
	cmpw	$E820_MAX_ENTRIES, %si
	jb	2b
3:	cli
	movw	%si, %ax
	movb	%al, BP_E820_ENTRIES

	/* Fast A20 gate (port 0x92 bit 1), never touching bit 0 (reset). */
	inb	$0x92, %al
	orb	$0x02, %al
	andb	$0xfe, %al
	outb	%al, $0x92

	/* Protected mode with a flat GDT at its linear address. */
	xorl	%ebx, %ebx
	movw	%ds, %bx
	shll	$4, %ebx		/* EBX = linear address of boot_params */
	leal	setup_gdt(%ebx), %eax
	movl	%eax, setup_gdtr + 2
	lgdtl	setup_gdtr
	leal	pm32(%ebx), %eax
	movl	%cr0, %edx
	orl	$CR0_PE, %edx
	movl	%edx, %cr0
	pushl	$BOOT_CS
	pushl	%eax
	lretl

	.code32
pm32:
	movl	$BOOT_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	movl	%ebx, %esi		/* boot.rst 32-bit protocol: ESI = boot_params */
	movl	$SETUP16_MAGIC, %edi	/* tells startup_32 which path this was */
	xorl	%ebp, %ebp
	xorl	%ebx, %ebx
	jmp	*0x214(%esi)		/* code32_start (a loader may have moved it) */

	.balign 8
setup_gdt:
	.quad	0
	.quad	0
	.quad	0x00cf9b000000ffff	/* 0x10: __BOOT_CS, flat 32-bit code */
	.quad	0x00cf93000000ffff	/* 0x18: __BOOT_DS, flat data */
setup_gdt_end:
	.word	0
setup_gdtr:
	.word	setup_gdt_end - setup_gdt - 1
	.long	0			/* linear base, set at run time */

version_string:
	.asciz	"tiny-guest"

	.balign 16
	.skip	1024
setup_stack_top:
	.balign 512			/* whole sectors */
