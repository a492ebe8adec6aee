/*
 * exit_floor: the cost of one guest exit handled by a minimal C loop over KVM_RUN.
 *
 * The floor that bench/exits.py compares our Python VMM and QEMU against.  The
 * guest (the bytes in guest_code.S, shared with bench/exits.py) switches to
 * ring 3 and performs N one-byte port writes to 0x80 ("pio") or N four-byte
 * MMIO writes to an unbacked address ("mmio"), then writes to port 0xf4.  This
 * program does nothing per exit but count it and re-enter the guest.
 *
 *   exit_floor pio|mmio N GUEST.bin   ->  prints "<exits> <seconds>"
 *
 * Memory layout and register state match vmm/layout.py and the Python setup in
 * bench/exits.py: GDT at 0x500, TSS with a full I/O permission bitmap at 0x1000,
 * page tables at 0x9000 (2 MiB pages, user accessible), code at 1 MiB.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (4u << 20)
#define GDT 0x500
#define TSS 0x1000
#define TSS_LIMIT (0x68 + 8192)
#define PML4 0x9000
#define PDPT 0xa000
#define PD 0xb000
#define CODE 0x100000
#define STACK 0x8000
#define MMIO_ADDR 0xcffff000u /* vmm/layout.py TEST_MMIO_ADDR */

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void seg(struct kvm_segment *s, uint16_t sel, uint8_t type, uint8_t dpl, uint8_t l, uint8_t db)
{
    memset(s, 0, sizeof(*s));
    s->base = 0;
    s->limit = 0xffffffff;
    s->selector = sel;
    s->type = type;
    s->present = 1;
    s->dpl = dpl;
    s->db = db;
    s->s = 1;
    s->l = l;
    s->g = 1;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s pio|mmio N GUEST.bin\n", argv[0]);
        return 2;
    }
    int mmio = strcmp(argv[1], "mmio") == 0;
    unsigned long n = strtoul(argv[2], NULL, 0);

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000ul) < 0)
        die("KVM_SET_TSS_ADDR");
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
        die("KVM_CREATE_IRQCHIP");
    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap");
    struct kvm_userspace_memory_region region = {0, 0, 0, MEM_SIZE, (uint64_t)(uintptr_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");

    FILE *f = fopen(argv[3], "rb");
    if (!f)
        die(argv[3]);
    size_t code_len = fread(mem + CODE, 1, MEM_SIZE - CODE, f);
    fclose(f);
    if (code_len == 0) {
        fprintf(stderr, "%s: empty guest\n", argv[3]);
        return 2;
    }

    /* Identity map of 4 GiB in 2 MiB pages, user accessible (U/S), writable. */
    uint64_t *pml4 = (uint64_t *)(mem + PML4), *pdpt = (uint64_t *)(mem + PDPT);
    pml4[0] = PDPT | 7;
    for (int j = 0; j < 4; j++) {
        uint64_t *pd = (uint64_t *)(mem + PD + 0x1000 * j);
        pdpt[j] = (PD + 0x1000 * j) | 7;
        for (int i = 0; i < 512; i++)
            pd[i] = ((uint64_t)(j * 512 + i) << 21) | 0x87;
    }
    /* GDT: null, kernel code 0x08, kernel data 0x10, user data 0x1b, user code 0x23, TSS 0x28. */
    uint64_t *gdt = (uint64_t *)(mem + GDT);
    gdt[0] = 0;
    gdt[1] = 0x00af9b000000ffffull;
    gdt[2] = 0x00cf93000000ffffull;
    gdt[3] = 0x00cff3000000ffffull;
    gdt[4] = 0x00affb000000ffffull;
    gdt[5] = (TSS_LIMIT & 0xffff) | ((uint64_t)TSS << 16) | (0x89ull << 40) | ((uint64_t)(TSS_LIMIT >> 16) << 48);
    gdt[6] = 0;
    /* TSS: RSP0 and the I/O map base; the bitmap (all zero: every port allowed) ends with 0xff. */
    *(uint64_t *)(mem + TSS + 4) = STACK;
    *(uint16_t *)(mem + TSS + 0x66) = 0x68;
    mem[TSS + 0x68 + 8192] = 0xff;

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    seg(&sregs.cs, 0x08, 11, 0, 1, 0);
    seg(&sregs.ds, 0x10, 3, 0, 0, 1);
    sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
    memset(&sregs.tr, 0, sizeof(sregs.tr));
    sregs.tr.base = TSS;
    sregs.tr.limit = TSS_LIMIT;
    sregs.tr.selector = 0x28;
    sregs.tr.type = 11;
    sregs.tr.present = 1;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 7 * 8 - 1;
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20;
    sregs.cr0 = 0x80000031;
    sregs.efer = 0x500;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs regs = {0};
    regs.rip = CODE;
    regs.rflags = 2;
    regs.rsp = STACK;
    regs.rbx = n;
    regs.rsi = mmio;
    regs.rdi = MMIO_ADDR;
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    unsigned long exits = 0;
    double t0 = 0;
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0)
            die("KVM_RUN");
        if (exits == 0)
            t0 = now();
        if (run->exit_reason == KVM_EXIT_IO && run->io.port == 0xf4)
            break;
        if (run->exit_reason != KVM_EXIT_IO && run->exit_reason != KVM_EXIT_MMIO) {
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return 1;
        }
        exits++;
    }
    printf("%lu %.9f\n", exits, now() - t0);
    return 0;
}
