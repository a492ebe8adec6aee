/*
 * ktap: prints a KTAP v1 document described by the command line
 * (Documentation/dev-tools/ktap.rst), for testing KTAP parsers end to end.
 *
 *   ktap=pass,fail,skip:name,...   one suite of test cases; each item is
 *                                  pass, fail or skip, optionally ":name"
 *   ktap_suite=NAME                the suite's name (default "tiny")
 *   ktap_exit=fail                 exit with the number of failed cases (default 0)
 *   ktap_stop=N                    stop after N case results, as if the guest crashed ...
 *   ktap_stop_mode=exit|halt|panic|triple   ... and then exit 0 (default), halt the
 *                                  CPU, print a kernel panic and spin, or triple-fault
 */
#include "tiny.h"

const char tiny_guest_name[] = "ktap";

#define SKIP_REASON "skipped on the command line"

static void stop(void)
{
	char mode[16] = "exit";
	cmdline_get("ktap_stop_mode", mode, sizeof(mode));
	if (!strcmp(mode, "halt"))
		halt_forever();
	if (!strcmp(mode, "panic")) {
		printf("Kernel panic - not syncing: ktap stopped on request\n");
		for (;;)
			cpu_relax();
	}
	if (!strcmp(mode, "triple"))
		triple_fault();
	exit(0);
}

int main(void)
{
	static char spec[4096];
	char suite[64] = "tiny";
	if (!cmdline_get("ktap", spec, sizeof(spec)))
		memcpy(spec, "pass", 5);
	cmdline_get("ktap_suite", suite, sizeof(suite));
	bool stop_early = cmdline_has("ktap_stop");
	uint64_t stop_after = cmdline_u64("ktap_stop", 0);

	int total = spec[0] ? 1 : 0;	/* an empty list is a suite with no cases */
	for (const char *p = spec; *p; p++)
		total += *p == ',';

	printf("KTAP version 1\n1..1\n");
	printf("    KTAP version 1\n    # Subtest: %s\n    1..%d\n", suite, total);
	int failed = 0, skipped = 0, passed = 0, index = 0;
	char *item = spec[0] ? spec : NULL;
	while (item) {
		char *next = strchr(item, ',');
		if (next)
			*next++ = 0;
		if (stop_early && (uint64_t)index == stop_after)
			stop();
		index++;
		char *name = strchr(item, ':');
		char dflt[24];
		if (name) {
			*name++ = 0;
		} else {
			snprintf(dflt, sizeof(dflt), "case_%d", index);
			name = dflt;
		}
		if (!strcmp(item, "fail")) {
			printf("    # %s: expected success, got failure on request\n", name);
			printf("    not ok %d %s\n", index, name);
			failed++;
		} else if (!strcmp(item, "skip")) {
			printf("    ok %d %s # SKIP " SKIP_REASON "\n", index, name);
			skipped++;
		} else if (!strcmp(item, "pass")) {
			printf("    ok %d %s\n", index, name);
			passed++;
		} else {
			printf("    # %s: unknown result '%s', reported as a failure\n", name, item);
			printf("    not ok %d %s\n", index, name);
			failed++;
		}
		item = next;
	}
	if (stop_early && (uint64_t)index == stop_after)
		stop();
	printf("# %s: pass:%d fail:%d skip:%d total:%d\n", suite, passed, failed, skipped, total);
	if (failed)
		printf("not ok 1 %s\n", suite);
	else if (total && skipped == total)
		printf("ok 1 %s # SKIP all cases skipped\n", suite);
	else
		printf("ok 1 %s\n", suite);

	char mode[16] = "";
	cmdline_get("ktap_exit", mode, sizeof(mode));
	return !strcmp(mode, "fail") ? failed : 0;
}
