/*
 * A small printf: %d %i %u %x %X %o %c %s %p %%, flags "-0+ ", width and
 * precision (also "*"), length modifiers hh h l ll z j t.
 *
 * printf() holds one lock for the whole call, so lines from several CPUs do
 * not interleave; kprintf() writes straight to the UART for ring 0.
 */
#include "tiny.h"

typedef void (*emit_fn)(void *ctx, char c);

static void emit_str(emit_fn emit, void *ctx, const char *s, size_t n, int *count)
{
	for (size_t i = 0; i < n; i++)
		emit(ctx, s[i]);
	*count += (int)n;
}

static void emit_pad(emit_fn emit, void *ctx, char c, int n, int *count)
{
	for (; n > 0; n--, (*count)++)
		emit(ctx, c);
}

static int format(emit_fn emit, void *ctx, const char *fmt, va_list ap)
{
	int count = 0;
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			emit(ctx, *fmt);
			count++;
			continue;
		}
		fmt++;
		bool left = false, zero = false, plus = false, space = false, alt = false;
		for (;; fmt++) {
			if (*fmt == '-') left = true;
			else if (*fmt == '0') zero = true;
			else if (*fmt == '+') plus = true;
			else if (*fmt == ' ') space = true;
			else if (*fmt == '#') alt = true;
			else break;
		}
		int width = 0, prec = -1;
		if (*fmt == '*') {
			width = va_arg(ap, int);
			if (width < 0) left = true, width = -width;
			fmt++;
		} else {
			while (*fmt >= '0' && *fmt <= '9')
				width = width * 10 + (*fmt++ - '0');
		}
		if (*fmt == '.') {
			fmt++;
			prec = 0;
			if (*fmt == '*') {
				prec = va_arg(ap, int);
				fmt++;
			} else {
				while (*fmt >= '0' && *fmt <= '9')
					prec = prec * 10 + (*fmt++ - '0');
			}
		}
		int lng = 0;	/* 0 int, 1 long, 2 long long; size_t etc. are 64-bit */
		for (;; fmt++) {
			if (*fmt == 'l') lng++;
			else if (*fmt == 'z' || *fmt == 'j' || *fmt == 't') lng = 2;
			else if (*fmt == 'h') ;	/* promoted to int anyway */
			else break;
		}
		char conv = *fmt;
		if (!conv)
			break;
		if (conv == '%') {
			emit(ctx, '%');
			count++;
			continue;
		}
		if (conv == 'c') {
			char c = (char)va_arg(ap, int);
			if (!left) emit_pad(emit, ctx, ' ', width - 1, &count);
			emit_str(emit, ctx, &c, 1, &count);
			if (left) emit_pad(emit, ctx, ' ', width - 1, &count);
			continue;
		}
		if (conv == 's') {
			const char *s = va_arg(ap, const char *);
			if (!s) s = "(null)";
			size_t n = prec >= 0 ? strnlen(s, (size_t)prec) : strlen(s);
			if (!left) emit_pad(emit, ctx, ' ', width - (int)n, &count);
			emit_str(emit, ctx, s, n, &count);
			if (left) emit_pad(emit, ctx, ' ', width - (int)n, &count);
			continue;
		}
		uint64_t v;
		bool neg = false;
		unsigned base = 10;
		const char *digits = "0123456789abcdef";
		switch (conv) {
		case 'd': case 'i': {
			int64_t s = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
			neg = s < 0;
			v = neg ? -(uint64_t)s : (uint64_t)s;
			break;
		}
		case 'u': case 'x': case 'X': case 'o':
			v = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned int);
			if (conv == 'x') base = 16;
			if (conv == 'X') base = 16, digits = "0123456789ABCDEF";
			if (conv == 'o') base = 8;
			break;
		case 'p':
			v = (uint64_t)va_arg(ap, void *);
			base = 16;
			alt = true;
			break;
		default:	/* unknown conversion: print it as is */
			emit(ctx, '%');
			emit(ctx, conv);
			count += 2;
			continue;
		}
		char buf[24];
		int n = 0;
		do {
			buf[n++] = digits[v % base];
			v /= base;
		} while (v);
		if (prec == 0 && n == 1 && buf[0] == '0')
			n = 0;
		const char *prefix = neg ? "-" : plus ? "+" : space ? " " : "";
		if (alt && base == 16)
			prefix = conv == 'X' ? "0X" : "0x";
		int plen = (int)strlen(prefix);
		int zeros = prec > n ? prec - n : 0;
		if (zero && !left && prec < 0 && width > plen + n)
			zeros = width - plen - n;
		int pad = width - plen - zeros - n;
		if (!left) emit_pad(emit, ctx, ' ', pad, &count);
		emit_str(emit, ctx, prefix, (size_t)plen, &count);
		emit_pad(emit, ctx, '0', zeros, &count);
		while (n)
			emit(ctx, buf[--n]), count++;
		if (left) emit_pad(emit, ctx, ' ', pad, &count);
	}
	return count;
}

/* ---- into a string ---- */
struct strbuf { char *buf; size_t size, len; };

static void emit_buf(void *ctx, char c)
{
	struct strbuf *b = ctx;
	if (b->len + 1 < b->size)
		b->buf[b->len] = c;
	b->len++;
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct strbuf b = { buf, size, 0 };
	int n = format(emit_buf, &b, fmt, ap);
	if (size)
		buf[b.len < size ? b.len : size - 1] = 0;
	return n;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}

/* ---- to the console, in chunks ---- */
struct chunk { char buf[128]; size_t len; };

static void emit_chunk(void *ctx, char c)
{
	struct chunk *k = ctx;
	k->buf[k->len++] = c;
	if (k->len == sizeof(k->buf)) {
		serial_write(k->buf, k->len);
		k->len = 0;
	}
}

static spinlock_t print_lock;

int vprintf(const char *fmt, va_list ap)
{
	struct chunk k;
	k.len = 0;
	spin_lock(&print_lock);
	int n = format(emit_chunk, &k, fmt, ap);
	serial_write(k.buf, k.len);
	spin_unlock(&print_lock);
	return n;
}

int printf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vprintf(fmt, ap);
	va_end(ap);
	return n;
}

int puts(const char *s)
{
	return printf("%s\n", s);
}

static void emit_direct(void *ctx, char c)
{
	(void)ctx;
	serial_write(&c, 1);
}

int kprintf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = format(emit_direct, NULL, fmt, ap);
	va_end(ap);
	return n;
}
