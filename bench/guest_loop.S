/*
 * The exit round-trip guest shared by bench/exit_floor.c and bench/exits.py.
 *
 * Entered in 64-bit ring 0 with RBX = iterations, RSI = 0 (port writes) or
 * 1 (MMIO writes), RDI = the MMIO address; drops to ring 3 (selectors of the
 * GDT both loaders write: user data 0x1b, user code 0x23) and loops there,
 * so that on every host the loop itself runs natively and only the exits
 * are measured.  Ends with a write to the debug-exit port 0xf4.
 */
    .code64
    .globl _start
_start:
    pushq $0x1b                 /* SS: user data */
    pushq $0x7000               /* RSP */
    pushq $0x2                  /* RFLAGS: IOPL 0 (the TSS I/O bitmap grants the ports) */
    pushq $0x23                 /* CS: user code */
    lea user(%rip), %rax
    pushq %rax
    iretq
user:
    mov %ebx, %ecx
    test %esi, %esi
    jnz mmio
pio:
    out %al, $0x80
    dec %ecx
    jnz pio
    jmp done
mmio:
    movl %ecx, (%rdi)
    dec %ecx
    jnz mmio
done:
    xor %eax, %eax
    out %eax, $0xf4
1:  jmp 1b
