/* hello: the smallest useful guest -- a line of output, the boot timer, exit 0. */
#include "tiny.h"

const char tiny_guest_name[] = "hello";

int main(void)
{
	printf("Hello from tiny guest\n");
	printf("entry: %s\n", boot.proto_name);
	printf("portio: %s\n", portio_mode());
	boot_timer_mark();
	return 0;
}
