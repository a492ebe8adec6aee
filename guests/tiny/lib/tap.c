/* TAP output (include/tap.h). */
#include "tap.h"
#include "tiny.h"

static int n_planned, n_test, n_fail;

void tap_plan(int n)
{
	n_planned = n;
	printf("1..%d\n", n);
}

bool tap_result(bool ok, const char *name, const char *fmt, ...)
{
	char detail[256] = "";
	if (fmt) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(detail, sizeof(detail), fmt, ap);
		va_end(ap);
	}
	n_test++;
	if (!ok)
		n_fail++;
	if (detail[0])
		printf("%sok %d - %s # %s\n", ok ? "" : "not ", n_test, name, detail);
	else
		printf("%sok %d - %s\n", ok ? "" : "not ", n_test, name);
	return ok;
}

void tap_skip(const char *name, const char *why)
{
	n_test++;
	printf("ok %d - %s # SKIP %s\n", n_test, name, why);
}

int tap_done(void)
{
	/* Tests the plan promised but the guest never reached count as failures. */
	while (n_test < n_planned) {
		n_test++;
		n_fail++;
		printf("not ok %d - not run\n", n_test);
	}
	printf("# %s: %d of %d failed\n", tiny_guest_name, n_fail, n_test);
	return n_fail;
}
