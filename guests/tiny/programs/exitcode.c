/* exitcode: exits with the code given as `code=N` on the command line (default 0). */
#include "tiny.h"

const char tiny_guest_name[] = "exitcode";

int main(void)
{
	uint64_t code = cmdline_u64("code", 0);
	printf("exitcode: exiting with code %lu\n", code);
	return (int)code;
}
