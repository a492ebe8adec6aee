"""cffi builder for the KVM bindings.

Compiled against the system's <linux/kvm.h> at install time (API mode): every
struct layout and ioctl number below is checked by the C compiler against the
real header, so no offset in this project is computed by hand.  The ``...``
in a declaration asks cffi to take the rest of the layout from the header.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cffi import FFI

#: Hash of this file, compiled into the extension so that stale bindings are detected.
BUILD_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]

CDEF = r"""
/* ---- ioctl numbers (values come from the header) ---- */
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_GET_MSR_INDEX_LIST ...
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_IRQ_LINE ...
#define KVM_IRQ_LINE_STATUS ...
#define KVM_GET_IRQCHIP ...
#define KVM_SET_IRQCHIP ...
#define KVM_CREATE_PIT2 ...
#define KVM_GET_PIT2 ...
#define KVM_SET_PIT2 ...
#define KVM_IRQFD ...
#define KVM_IOEVENTFD ...
#define KVM_GET_CLOCK ...
#define KVM_SET_CLOCK ...
#define KVM_ENABLE_CAP ...
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_GET_FPU ...
#define KVM_SET_FPU ...
#define KVM_GET_MSRS ...
#define KVM_SET_MSRS ...
#define KVM_SET_CPUID2 ...
#define KVM_GET_CPUID2 ...
#define KVM_GET_LAPIC ...
#define KVM_SET_LAPIC ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...
#define KVM_GET_VCPU_EVENTS ...
#define KVM_SET_VCPU_EVENTS ...
#define KVM_GET_XSAVE ...
#define KVM_SET_XSAVE ...
#define KVM_GET_XCRS ...
#define KVM_SET_XCRS ...
#define KVM_GET_DEBUGREGS ...
#define KVM_SET_DEBUGREGS ...
#define KVM_TRANSLATE ...
#define KVM_SET_GUEST_DEBUG ...
#define KVM_KVMCLOCK_CTRL ...
#define KVM_GET_TSC_KHZ ...

/* ---- capabilities ---- */
#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_SET_TSS_ADDR ...
#define KVM_CAP_EXT_CPUID ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_NR_MEMSLOTS ...
#define KVM_CAP_IRQFD ...
#define KVM_CAP_IOEVENTFD ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_X2APIC_API ...
#define KVM_CAP_INTERNAL_ERROR_DATA ...
#define KVM_CAP_XSAVE ...
#define KVM_CAP_XCRS ...
#define KVM_CAP_DEBUGREGS ...
#define KVM_CAP_VCPU_EVENTS ...
#define KVM_CAP_ADJUST_CLOCK ...
#define KVM_CAP_TSC_DEADLINE_TIMER ...
#define KVM_CAP_SET_IDENTITY_MAP_ADDR ...
#define KVM_CAP_MP_STATE ...
#define KVM_CAP_GET_TSC_KHZ ...

/* ---- exit reasons ---- */
#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_SET_TPR ...
#define KVM_EXIT_TPR_ACCESS ...
#define KVM_EXIT_NMI ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_IOAPIC_EOI ...
#define KVM_EXIT_X86_RDMSR ...
#define KVM_EXIT_X86_WRMSR ...
#define KVM_EXIT_NOTIFY ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...
#define KVM_INTERNAL_ERROR_EMULATION ...
#define KVM_INTERNAL_ERROR_SIMUL_EX ...
#define KVM_INTERNAL_ERROR_DELIVERY_EV ...
#define KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON ...
#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...
#define KVM_MP_STATE_RUNNABLE ...
#define KVM_MP_STATE_UNINITIALIZED ...
#define KVM_MP_STATE_HALTED ...
#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...
#define KVM_IRQFD_FLAG_DEASSIGN ...
#define KVM_IRQFD_FLAG_RESAMPLE ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...
#define KVM_GUESTDBG_ENABLE ...
#define KVM_GUESTDBG_SINGLESTEP ...
#define KVM_MEM_READONLY ...

struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx;
    uint64_t rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11;
    uint64_t r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl;
    uint8_t unusable;
    ...;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    ...;
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t interrupt_bitmap[...];
};

struct kvm_fpu {
    uint8_t fpr[8][16];
    uint16_t fcw;
    uint16_t fsw;
    uint8_t ftwx;
    uint16_t last_opcode;
    uint64_t last_ip;
    uint64_t last_dp;
    uint8_t xmm[16][16];
    uint32_t mxcsr;
    ...;
};

struct kvm_msr_entry {
    uint32_t index;
    uint32_t reserved;
    uint64_t data;
};

struct kvm_msrs {
    uint32_t nmsrs;
    uint32_t pad;
    struct kvm_msr_entry entries[];
};

struct kvm_msr_list {
    uint32_t nmsrs;
    uint32_t indices[];
};

struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax;
    uint32_t ebx;
    uint32_t ecx;
    uint32_t edx;
    ...;
};

struct kvm_cpuid2 {
    uint32_t nent;
    uint32_t padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct { uint64_t hardware_exit_reason; } hw;
        struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
        struct { uint32_t exception; uint32_t error_code; } ex;
        struct {
            uint8_t direction;
            uint8_t size;
            uint16_t port;
            uint32_t count;
            uint64_t data_offset;
        } io;
        struct {
            uint64_t phys_addr;
            uint8_t data[8];
            uint32_t len;
            uint8_t is_write;
        } mmio;
        struct {
            uint64_t nr;
            uint64_t args[6];
            uint64_t ret;
            uint32_t longmode;
            uint32_t pad;
        } hypercall;
        struct {
            uint32_t suberror;
            uint32_t ndata;
            uint64_t data[16];
        } internal;
        struct {
            uint32_t suberror;
            uint32_t ndata;
            uint64_t flags;
            uint8_t insn_size;
            uint8_t insn_bytes[15];
        } emulation_failure;
        struct {
            uint32_t type;
            uint32_t ndata;
            uint64_t data[16];
        } system_event;
        struct {
            uint8_t error;
            uint8_t pad[7];
            uint32_t reason;
            uint32_t index;
            uint64_t data;
        } msr;
        ...;
    };
    ...;
};

struct kvm_irq_level {
    uint32_t irq;
    uint32_t level;
    ...;
};

struct kvm_pit_config {
    uint32_t flags;
    ...;
};

struct kvm_irqfd {
    uint32_t fd;
    uint32_t gsi;
    uint32_t flags;
    uint32_t resamplefd;
    ...;
};

struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t fd;
    uint32_t flags;
    ...;
};

struct kvm_clock_data {
    uint64_t clock;
    uint32_t flags;
    ...;
};

struct kvm_enable_cap {
    uint32_t cap;
    uint32_t flags;
    uint64_t args[4];
    ...;
};

struct kvm_translation {
    uint64_t linear_address;
    uint64_t physical_address;
    uint8_t valid;
    uint8_t writeable;
    uint8_t usermode;
    ...;
};

struct kvm_mp_state {
    uint32_t mp_state;
};

struct kvm_guest_debug {
    uint32_t control;
    ...;
};

/* Saved and restored as opaque blobs by snapshots. */
struct kvm_irqchip { uint32_t chip_id; ...; };
struct kvm_pit_state2 { ...; };
struct kvm_lapic_state { char regs[...]; };
struct kvm_vcpu_events { ...; };
struct kvm_xsave { ...; };
struct kvm_xcrs { ...; };
struct kvm_debugregs { ...; };

/* ---- helpers defined in the C source below ---- */
int mvm_ioctl(int fd, unsigned long request, void *arg);
int mvm_ioctl_int(int fd, unsigned long request, unsigned long arg);
int mvm_kvm_run(int fd);
int mvm_install_kick_handler(int signo);
int mvm_run_offset_io_data(void);
const char *mvm_build_hash(void);
"""

SOURCE = r"""
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

static int mvm_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

static int mvm_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

/* KVM_RUN, called with the GIL released (cffi's default), so every vCPU
   thread runs its guest in parallel with the others and with pytest. */
static int mvm_kvm_run(int fd)
{
    int r = ioctl(fd, KVM_RUN, 0);
    return r < 0 ? -errno : r;
}

static void mvm_kick_noop(int signo) { (void)signo; }

/* A vCPU thread is kicked out of KVM_RUN by setting kvm_run.immediate_exit
   and sending it this signal; the handler only needs to exist so that the
   ioctl returns EINTR instead of the process dying. */
static int mvm_install_kick_handler(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = mvm_kick_noop;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    return sigaction(signo, &sa, NULL) < 0 ? -errno : 0;
}

static int mvm_run_offset_io_data(void) { return sizeof(struct kvm_run); }
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vmm.kvm._kvm",
    SOURCE + f'\nstatic const char *mvm_build_hash(void) {{ return "{BUILD_HASH}"; }}\n', extra_compile_args=["-Wno-incompatible-pointer-types"]
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
