/*
 * Multiboot v1 entry (Multiboot Specification 0.6.96, section 3.1): the header
 * must sit 32-bit aligned in the first 8 KiB of the file; the loader enters
 * the ELF entry point in 32-bit protected mode, paging off, with
 * EAX = 0x2BADB002 and EBX = the multiboot information structure.
 */
#include "tiny_abi.h"

#define MULTIBOOT_HEADER_MAGIC   0x1BADB002
#define MULTIBOOT_PAGE_ALIGN     (1 << 0)	/* modules on 4 KiB boundaries */
#define MULTIBOOT_MEMORY_INFO    (1 << 1)	/* mem_* and mmap_* fields */
#define MULTIBOOT_FLAGS          (MULTIBOOT_PAGE_ALIGN | MULTIBOOT_MEMORY_INFO)

	.section .multiboot, "a"
	.balign 4
	.globl multiboot_header
multiboot_header:
	.long	MULTIBOOT_HEADER_MAGIC
	.long	MULTIBOOT_FLAGS
	.long	-(MULTIBOOT_HEADER_MAGIC + MULTIBOOT_FLAGS)

	.text
	.code32
	.globl multiboot_start
multiboot_start:
	cli
	cld
	movl	%eax, boot_entry_eax	/* the loader's magic, checked by bootcheck */
	movl	$PROTO_MULTIBOOT, %eax	/* EBX = multiboot_info */
	jmp	enter_long_mode
