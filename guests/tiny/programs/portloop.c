/*
 * portloop: `n=` (default 1000) one-byte writes to port 0x80 from ring 3,
 * bracketed by BENCH_MARK_BEGIN/END writes to the boot-timer port, to time
 * the port-I/O exit round trip.
 */
#include "tiny.h"

const char tiny_guest_name[] = "portloop";

#define POST_PORT 0x80

int main(void)
{
	uint64_t n = cmdline_u64("n", 1000);
	boot_timer_mark();
	outb(BOOT_TIMER_PORT, BENCH_MARK_BEGIN);
	uint64_t t0 = rdtsc();
	for (uint64_t i = 0; i < n; i++)
		outb(POST_PORT, (uint8_t)i);
	uint64_t t1 = rdtsc();
	outb(BOOT_TIMER_PORT, BENCH_MARK_END);
	printf("portloop: n=%lu tsc=%lu tsc_per_exit=%lu\n", n, t1 - t0, n ? (t1 - t0) / n : 0);
	return 0;
}
