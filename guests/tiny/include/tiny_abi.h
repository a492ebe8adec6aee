/*
 * Numbers shared by the assembler entry code, the C runtime and the host-side
 * tests: selectors, entry protocols, "syscalls", exit codes, per-CPU sizes.
 * Usable from C and from assembler sources.
 */
#ifndef TINY_ABI_H
#define TINY_ABI_H

/* Where the image is linked and loaded (boot.rst: bzImage payloads live at 1 MiB). */
#define KERNEL_BASE          0x100000
/* Offsets inside the image: the boot protocol's 32-bit entry is at +0, 64-bit at +0x200. */
#define KERNEL_INFO_OFFSET   0x10
#define IMAGE_INFO_OFFSET    0x20
#define STARTUP_64_OFFSET    0x200
#define IMAGE_INFO_MAGIC     0x594e4954      /* "TINY" */

/* Our GDT (not the loader's): kernel code/data, user data/code, 32-bit code, then one TSS per CPU. */
#define KERNEL_CS            0x08
#define KERNEL_DS            0x10
#define USER_DS              0x18            /* used as 0x1b (RPL 3) */
#define USER_CS              0x20            /* used as 0x23 (RPL 3) */
#define KERNEL_CS32          0x28            /* 32-bit code, for the AP trampoline */
#define TSS_SEL_BASE         0x30            /* CPU n's TSS: TSS_SEL_BASE + 16 * n */

#define MAX_CPUS             64
#define KSTACK_SIZE          0x4000          /* per CPU: [0, 4K) double-fault IST, [4K, 16K) RSP0 */
#define DFSTACK_SIZE         0x1000
#define USTACK_SIZE          0x4000          /* per CPU ring-3 stack */
#define TSS_STRIDE           128             /* TSSes are 104 bytes, spaced 128 apart */
#define IO_BITMAP_SIZE       8192            /* 65536 ports, one bit each; 0 = allowed */
#define IDT_VECTORS          32              /* exceptions only: interrupts stay masked */

/* Initial RFLAGS in ring 3: IOPL=3, IF=0, reserved bit 1. */
#define USER_RFLAGS          0x3002

/* How the image was entered (boot_proto). */
#define PROTO_PVH            1               /* hvm_start_info in EBX, 32-bit, paging off */
#define PROTO_MULTIBOOT      2               /* multiboot v1: EAX magic, EBX info */
#define PROTO_LINUX64        3               /* boot.rst 64-bit protocol: RSI = boot_params */
#define PROTO_LINUX32        4               /* boot.rst 32-bit protocol: ESI = boot_params */
#define PROTO_LINUX16        5               /* our real-mode setup, then the 32-bit path */

/* EDI value our real-mode setup passes to startup_32 ("R16S"). */
#define SETUP16_MAGIC        0x53363152

/*
 * Ring 3 calls ring 0 by executing `hlt` (privileged: #GP) with RAX = request,
 * RDI/RSI = arguments; the result comes back in RAX.
 */
#define SYS_HALT             0               /* halt this CPU forever (cli; hlt) */
#define SYS_RDMSR            1               /* RDI = MSR index -> value */
#define SYS_WRMSR            2               /* RDI = MSR index, RSI = value */
#define SYS_READ_CR          3               /* RDI = 0, 2, 3 or 4 -> CRn */
#define SYS_TRIPLE_FAULT     4               /* load an empty IDT and fault */
#define SYS_CPUID            5               /* RDI = leaf, RSI = subleaf -> RAX, RBX, RCX, RDX */

/* Exit codes (written to the debug-exit port) that the runtime itself uses. */
#define EXIT_EXCEPTION_BASE  0x40            /* + vector: an unexpected CPU exception */
#define EXIT_SMP_FAILED      0x3d            /* APs did not all report in */
#define EXIT_BAD_CMDLINE     0x3e            /* a cmdline value could not be parsed */

/* The AP start-up trampoline is copied here (SIPI vector = address >> 12). */
#define SMP_TRAMPOLINE_ADDR  0x3000

/* Bench markers written to BOOT_TIMER_PORT around the portloop/mmioloop loops. */
#define BENCH_MARK_BEGIN     124
#define BENCH_MARK_END       125

/* Control registers and MSRs (Intel SDM Vol. 3A 2.5, 2.2.1). */
#define CR0_PE               0x00000001
#define CR0_NW               0x20000000
#define CR0_CD               0x40000000
#define CR0_PG               0x80000000
#define CR4_PAE              0x00000020
#define MSR_EFER             0xC0000080
#define EFER_LME             0x00000100
#define EFER_LMA             0x00000400

#endif
