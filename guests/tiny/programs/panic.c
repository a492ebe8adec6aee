/*
 * panic: prints a Linux-style panic line and spins in ring 3, so only a host
 * that watches the console notices (`msg=` replaces the reason; no spaces).
 */
#include "tiny.h"

const char tiny_guest_name[] = "panic";

int main(void)
{
	char msg[128] = "tiny guest panic on request";
	cmdline_get("msg", msg, sizeof(msg));
	printf("Kernel panic - not syncing: %s\n", msg);
	printf("---[ end Kernel panic - not syncing: %s ]---\n", msg);
	for (;;)
		cpu_relax();
}
