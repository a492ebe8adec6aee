/* Ring 3's first C code on the boot CPU, and how a guest ends. */
#include "tiny.h"

void tiny_start(void);
void cmdline_init(void);

const char *portio_mode(void)
{
	return gp_io_emulated ? "gp-emulated" : "native";
}

void halt_forever(void)
{
	for (;;)
		tiny_syscall(SYS_HALT, 0, 0);
}

void triple_fault(void)
{
	for (;;)
		tiny_syscall(SYS_TRIPLE_FAULT, 0, 0);
}

void exit(int code)
{
	outl(DEBUG_EXIT_PORT, (uint32_t)code);
	halt_forever();	/* no debug-exit device: stop here */
}

void tiny_start(void)
{
	serial_init();
	bootinfo_init();
	cmdline_init();
	printf("tiny-guest %s: entry %s, portio: %s\n", tiny_guest_name, boot.proto_name, portio_mode());
	exit(main());
}
