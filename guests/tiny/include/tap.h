/*
 * TAP output for the self-checking guests: `1..N`, `ok N - name`,
 * `not ok N - name # detail`, `ok N - name # SKIP why`, and a closing
 * `# <guest>: F of N failed` line.  The guest exits with tap_failures().
 */
#ifndef TINY_TAP_H
#define TINY_TAP_H

#include <stdbool.h>

void tap_plan(int n);
/* One result; fmt (may be NULL) becomes the `# detail` part. */
bool tap_result(bool ok, const char *name, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void tap_skip(const char *name, const char *why);
/* Prints the summary line and returns the number of failures (for main's return value). */
int tap_done(void);

#endif
