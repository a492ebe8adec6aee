/*
 * PVH entry (Xen's x86/HVM direct boot ABI, as QEMU, Firecracker and cloud
 * hypervisor implement it): the XEN_ELFNOTE_PHYS32_ENTRY note names a 32-bit
 * entry point, entered in protected mode with paging off and EBX pointing at
 * struct hvm_start_info (magic 0x336ec578).
 */
#include "tiny_abi.h"

#define XEN_ELFNOTE_PHYS32_ENTRY 18

	.section .note.Xen, "a", @note
	.balign 4
	.long	2f - 1f			/* namesz */
	.long	4f - 3f			/* descsz */
	.long	XEN_ELFNOTE_PHYS32_ENTRY
1:	.asciz	"Xen"
2:	.balign 4
3:	.long	pvh_start
4:	.balign 4

	.text
	.code32
	.globl pvh_start
pvh_start:
	cli
	cld
	movl	%eax, boot_entry_eax
	movl	$PROTO_PVH, %eax	/* EBX = hvm_start_info */
	jmp	enter_long_mode
