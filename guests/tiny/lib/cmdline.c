/*
 * The kernel command line: a bounded copy of what the loader pointed at,
 * split into space-separated words of the form `key=value` or `key`.
 */
#include "tiny.h"

static char line[CMDLINE_MAX];

void cmdline_init(void);
void cmdline_init(void)
{
	line[0] = 0;
	uint64_t limit = boot.cmdline_limit ? boot.cmdline_limit : sizeof(line);
	if (limit > sizeof(line))
		limit = sizeof(line);
	if (!boot.cmdline_addr || !addr_ok(boot.cmdline_addr, 1))
		return;
	if (!addr_ok(boot.cmdline_addr, limit))
		limit = MMIO_GAP_END - boot.cmdline_addr;
	const char *src = (const char *)boot.cmdline_addr;
	size_t n = strnlen(src, limit - 1);
	memcpy(line, src, n);
	line[n] = 0;
}

const char *cmdline(void)
{
	return line;
}

static bool is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* The last word naming `key`; *value points after '=' (or at the word's end). */
static const char *find(const char *key, const char **value, size_t *vlen)
{
	size_t klen = strlen(key);
	const char *found = NULL;
	for (const char *p = line; *p;) {
		while (is_space(*p))
			p++;
		if (!*p)
			break;
		const char *w = p;
		while (*p && !is_space(*p))
			p++;
		size_t wlen = (size_t)(p - w);
		if (wlen >= klen && !memcmp(w, key, klen) && (wlen == klen || w[klen] == '=')) {
			found = w;
			*value = wlen == klen ? w + klen : w + klen + 1;
			*vlen = wlen == klen ? 0 : wlen - klen - 1;
		}
	}
	return found;
}

bool cmdline_has(const char *key)
{
	const char *v;
	size_t n;
	return find(key, &v, &n) != NULL;
}

bool cmdline_get(const char *key, char *buf, size_t size)
{
	const char *v;
	size_t n;
	const char *w = find(key, &v, &n);
	if (!w || w[strlen(key)] != '=')
		return false;
	if (size) {
		if (n >= size)
			n = size - 1;
		memcpy(buf, v, n);
		buf[n] = 0;
	}
	return true;
}

static NORETURN void bad_value(const char *key, const char *v, size_t n)
{
	printf("tiny: cmdline: cannot parse %s=%.*s as a number\n", key, (int)n, v);
	exit(EXIT_BAD_CMDLINE);
}

static uint64_t parse(const char *key, uint64_t dflt, bool hex_only)
{
	const char *v;
	size_t n;
	const char *w = find(key, &v, &n);
	if (!w || w[strlen(key)] != '=')
		return dflt;
	size_t i = 0;
	unsigned base = hex_only ? 16 : 10;
	if (n > 2 && v[0] == '0' && (v[1] == 'x' || v[1] == 'X'))
		i = 2, base = 16;
	if (i == n)
		bad_value(key, v, n);
	uint64_t r = 0;
	for (; i < n; i++) {
		char c = v[i];
		unsigned d;
		if (c >= '0' && c <= '9') d = (unsigned)(c - '0');
		else if (c >= 'a' && c <= 'f') d = (unsigned)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F') d = (unsigned)(c - 'A' + 10);
		else d = 99;
		if (d >= base || r > (UINT64_MAX - d) / base)
			bad_value(key, v, n);
		r = r * base + d;
	}
	return r;
}

uint64_t cmdline_u64(const char *key, uint64_t dflt)
{
	return parse(key, dflt, false);
}

uint64_t cmdline_hex(const char *key, uint64_t dflt)
{
	return parse(key, dflt, true);
}
