/*
 * microvm-exit CODE: end the microVM with CODE through the debug-exit port.
 *
 * Installed in the reference initramfs so that a Linux guest's command can
 * hand its exit status to the host (as virtme-ng does).  Freestanding: raw
 * syscalls, no libc.  iopl(3) needs CAP_SYS_RAWIO (init runs as root).
 */
#define SYS_write 1
#define SYS_exit 60
#define SYS_iopl 172
#define DEBUG_EXIT_PORT 0xf4 /* vmm/layout.py DEBUG_EXIT_PORT */

static long sys1(long n, long a)
{
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a) : "rcx", "r11", "memory");
    return r;
}

static long sys3(long n, long a, long b, long c)
{
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}

static int parse(const char *s)
{
    int v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (*s++ - '0');
    return v;
}

void start_c(long *sp)
{
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    unsigned int code = argc > 1 ? (unsigned int)parse(argv[1]) : 0;
    if (sys1(SYS_iopl, 3) < 0) {
        static const char msg[] = "microvm-exit: iopl(3) failed\n";
        sys3(SYS_write, 2, (long)msg, sizeof(msg) - 1);
        sys1(SYS_exit, 1);
    }
    __asm__ volatile("outl %0, %w1" : : "a"(code), "Nd"(DEBUG_EXIT_PORT));
    sys1(SYS_exit, 0);
}

__asm__(".globl _start\n_start:\n mov %rsp, %rdi\n and $-16, %rsp\n call start_c\n hlt\n");
