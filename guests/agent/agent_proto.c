/*
 * The exec agent protocol core (see agent_proto.h and pytest_microvm/agent.py).
 *
 * Freestanding: the only things used are <stdint.h>, <stddef.h> and
 * <stdbool.h>.  Parsing never reads outside the span it was given and never
 * writes outside the caller's buffer; every rejection has a reason code.
 */
#include "agent_proto.h"

/* ---- small helpers ------------------------------------------------------------- */
size_t agent_strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

static bool bytes_equal(const char *a, const char *b, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (a[i] != b[i])
			return false;
	return true;
}

size_t agent_fmt_u64(char *buf, uint64_t v)
{
	char tmp[20];
	size_t n = 0;
	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	for (size_t i = 0; i < n; i++)
		buf[i] = tmp[n - 1 - i];
	buf[n] = 0;
	return n;
}

static bool is_digit(char c) { return c >= '0' && c <= '9'; }

static int hex_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* ---- CRC-32 (ISO 3309 / ITU-T V.42, polynomial 0xEDB88320 reflected) ----------------- */
static uint32_t crc_table[256];
static bool crc_ready;

static void crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
	crc_ready = true;
}

uint32_t agent_crc32(uint32_t crc, const void *data, size_t n)
{
	const uint8_t *p = data;
	if (!crc_ready)
		crc_init();
	crc = ~crc;
	for (size_t i = 0; i < n; i++)
		crc = crc_table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
	return ~crc;
}

/* ---- base64 (RFC 4648 section 4) ------------------------------------------------------- */
static const char b64_alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int b64_value(unsigned char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

bool agent_b64_decode(const char *in, size_t n, uint8_t *out, size_t cap, size_t *out_len)
{
	if (n % 4)
		return false;
	size_t pad = 0;
	if (n && in[n - 1] == '=') {
		pad = 1;
		if (in[n - 2] == '=')
			pad = 2;
	}
	size_t total = n / 4 * 3 - pad;
	if (total > cap)
		return false;
	for (size_t i = 0; i < n - pad; i++)
		if (b64_value((unsigned char)in[i]) < 0)
			return false;
	/* Canonical form: the bits the padding leaves over are zero (RFC 4648 section 3.5). */
	if (pad == 2 && (b64_value((unsigned char)in[n - 3]) & 0x0f))
		return false;
	if (pad == 1 && (b64_value((unsigned char)in[n - 2]) & 0x03))
		return false;
	size_t o = 0;
	for (size_t i = 0; i < n; i += 4) {
		/* Read the whole group before writing: out may alias in (o <= i always). */
		uint32_t v = 0;
		unsigned data = 0;
		for (unsigned k = 0; k < 4; k++) {
			char c = in[i + k];
			if (c != '=') {
				v = (v << 6) | (uint32_t)b64_value((unsigned char)c);
				data++;
			} else {
				v <<= 6;
			}
		}
		out[o++] = (uint8_t)(v >> 16);
		if (data > 2)
			out[o++] = (uint8_t)(v >> 8);
		if (data > 3)
			out[o++] = (uint8_t)v;
	}
	*out_len = o;
	return true;
}

void agent_b64_init(struct agent_b64 *e, agent_emit_fn emit, void *ctx)
{
	e->emit = emit;
	e->ctx = ctx;
	e->npend = 0;
	e->len = 0;
}

static void b64_flush(struct agent_b64 *e)
{
	if (e->len)
		e->emit(e->ctx, e->buf, e->len);
	e->len = 0;
}

static void b64_group(struct agent_b64 *e, const uint8_t *g, unsigned n)
{
	uint32_t v = (uint32_t)g[0] << 16 | (n > 1 ? (uint32_t)g[1] << 8 : 0) | (n > 2 ? g[2] : 0);
	if (e->len + 4 > sizeof(e->buf))
		b64_flush(e);
	char *o = e->buf + e->len;
	o[0] = b64_alphabet[(v >> 18) & 63];
	o[1] = b64_alphabet[(v >> 12) & 63];
	o[2] = n > 1 ? b64_alphabet[(v >> 6) & 63] : '=';
	o[3] = n > 2 ? b64_alphabet[v & 63] : '=';
	e->len += 4;
}

void agent_b64_feed(struct agent_b64 *e, const void *data, size_t n)
{
	const uint8_t *p = data;
	while (n && e->npend) {
		e->pend[e->npend++] = *p++;
		n--;
		if (e->npend == 3) {
			b64_group(e, e->pend, 3);
			e->npend = 0;
		}
	}
	while (n >= 3) {
		b64_group(e, p, 3);
		p += 3;
		n -= 3;
	}
	while (n--)
		e->pend[e->npend++] = *p++;
}

void agent_b64_finish(struct agent_b64 *e)
{
	if (e->npend)
		b64_group(e, e->pend, e->npend);
	e->npend = 0;
	b64_flush(e);
}

/* ---- JSON reader -------------------------------------------------------------------------- */
struct jp {
	const char *p, *end;
};

static void skip_ws(struct jp *s)
{
	while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
		s->p++;
}

static bool at(const struct jp *s, char c) { return s->p < s->end && *s->p == c; }

/* Length of the valid UTF-8 sequence at p (RFC 3629 section 4), or 0. */
static size_t utf8_seq(const unsigned char *p, const unsigned char *end)
{
	unsigned char c = p[0];
	size_t need;
	unsigned char lo = 0x80, hi = 0xBF;
	if (c < 0x80)
		return 1;
	if (c >= 0xC2 && c <= 0xDF)
		need = 1;
	else if (c >= 0xE0 && c <= 0xEF) {
		need = 2;
		if (c == 0xE0)
			lo = 0xA0;
		if (c == 0xED)
			hi = 0x9F;	/* no encoded surrogates */
	} else if (c >= 0xF0 && c <= 0xF4) {
		need = 3;
		if (c == 0xF0)
			lo = 0x90;
		if (c == 0xF4)
			hi = 0x8F;
	} else {
		return 0;
	}
	if ((size_t)(end - p) < need + 1)
		return 0;
	if (p[1] < lo || p[1] > hi)
		return 0;
	for (size_t i = 2; i <= need; i++)
		if (p[i] < 0x80 || p[i] > 0xBF)
			return 0;
	return need + 1;
}

static bool parse_string(struct jp *s)
{
	if (!at(s, '"'))
		return false;
	s->p++;
	while (s->p < s->end) {
		unsigned char c = (unsigned char)*s->p;
		if (c == '"') {
			s->p++;
			return true;
		}
		if (c < 0x20)
			return false;
		if (c == '\\') {
			if (s->end - s->p < 2)
				return false;
			char e = s->p[1];
			if (e == 'u') {
				if (s->end - s->p < 6)
					return false;
				for (int k = 2; k < 6; k++)
					if (hex_value(s->p[k]) < 0)
						return false;
				s->p += 6;
			} else if (e == '"' || e == '\\' || e == '/' || e == 'b' || e == 'f' || e == 'n' || e == 'r' ||
				   e == 't') {
				s->p += 2;
			} else {
				return false;
			}
			continue;
		}
		size_t k = utf8_seq((const unsigned char *)s->p, (const unsigned char *)s->end);
		if (!k)
			return false;
		s->p += k;
	}
	return false;
}

static bool parse_digits(struct jp *s)
{
	if (!(s->p < s->end && is_digit(*s->p)))
		return false;
	while (s->p < s->end && is_digit(*s->p))
		s->p++;
	return true;
}

static bool parse_number(struct jp *s)
{
	if (at(s, '-'))
		s->p++;
	if (at(s, '0'))
		s->p++;
	else if (!parse_digits(s))
		return false;
	if (at(s, '.')) {
		s->p++;
		if (!parse_digits(s))
			return false;
	}
	if (at(s, 'e') || at(s, 'E')) {
		s->p++;
		if (at(s, '+') || at(s, '-'))
			s->p++;
		if (!parse_digits(s))
			return false;
	}
	return true;
}

static bool parse_literal(struct jp *s, const char *word)
{
	size_t n = agent_strlen(word);
	if ((size_t)(s->end - s->p) < n || !bytes_equal(s->p, word, n))
		return false;
	s->p += n;
	return true;
}

static bool parse_value(struct jp *s, int depth, struct agent_json *out);

static bool parse_container(struct jp *s, int depth, bool object)
{
	char close = object ? '}' : ']';
	s->p++;
	skip_ws(s);
	if (at(s, close)) {
		s->p++;
		return true;
	}
	for (;;) {
		struct agent_json v;
		if (object) {
			if (!parse_string(s))
				return false;
			skip_ws(s);
			if (!at(s, ':'))
				return false;
			s->p++;
			skip_ws(s);
		}
		if (!parse_value(s, depth + 1, &v))
			return false;
		skip_ws(s);
		if (at(s, ',')) {
			s->p++;
			skip_ws(s);
			continue;
		}
		if (at(s, close)) {
			s->p++;
			return true;
		}
		return false;
	}
}

static bool parse_value(struct jp *s, int depth, struct agent_json *out)
{
	const char *start = s->p;
	bool ok;
	enum agent_json_type t;
	if (s->p >= s->end)
		return false;
	switch (*s->p) {
	case '{':
	case '[':
		if (depth >= AGENT_JSON_MAX_DEPTH)
			return false;
		t = *s->p == '{' ? AGENT_JSON_OBJECT : AGENT_JSON_ARRAY;
		ok = parse_container(s, depth, t == AGENT_JSON_OBJECT);
		break;
	case '"':
		t = AGENT_JSON_STRING;
		ok = parse_string(s);
		break;
	case 't':
		t = AGENT_JSON_TRUE;
		ok = parse_literal(s, "true");
		break;
	case 'f':
		t = AGENT_JSON_FALSE;
		ok = parse_literal(s, "false");
		break;
	case 'n':
		t = AGENT_JSON_NULL;
		ok = parse_literal(s, "null");
		break;
	default:
		t = AGENT_JSON_NUMBER;
		ok = parse_number(s);
		break;
	}
	if (!ok)
		return false;
	out->type = t;
	out->p = start;
	out->n = (size_t)(s->p - start);
	return true;
}

bool agent_json_parse(const char *text, size_t n, struct agent_json *root)
{
	struct jp s = {text, text + n};
	struct agent_json v;
	skip_ws(&s);
	if (!at(&s, '{') || !parse_value(&s, 0, &v))
		return false;
	skip_ws(&s);
	if (s.p != s.end)
		return false;
	*root = v;
	return true;
}

void agent_json_iter(struct agent_json_iter *it, const struct agent_json *c)
{
	it->first = true;
	if (c->type != AGENT_JSON_OBJECT && c->type != AGENT_JSON_ARRAY) {
		it->p = it->end = c->p;
		return;
	}
	it->p = c->p + 1;
	it->end = c->p + c->n - 1;	/* the closing bracket */
}

static bool iter_step(struct agent_json_iter *it, struct jp *s)
{
	s->p = it->p;
	s->end = it->end;
	skip_ws(s);
	if (s->p >= s->end)
		return false;
	if (!it->first) {
		if (!at(s, ','))
			return false;
		s->p++;
		skip_ws(s);
	}
	it->first = false;
	return true;
}

bool agent_json_next(struct agent_json_iter *it, struct agent_json *value)
{
	struct jp s;
	if (!iter_step(it, &s) || !parse_value(&s, 1, value))
		return false;
	it->p = s.p;
	return true;
}

bool agent_json_next_member(struct agent_json_iter *it, struct agent_json *key, struct agent_json *value)
{
	struct jp s;
	if (!iter_step(it, &s))
		return false;
	const char *k = s.p;
	if (!parse_string(&s))
		return false;
	key->type = AGENT_JSON_STRING;
	key->p = k;
	key->n = (size_t)(s.p - k);
	skip_ws(&s);
	if (!at(&s, ':'))
		return false;
	s.p++;
	skip_ws(&s);
	if (!parse_value(&s, 1, value))
		return false;
	it->p = s.p;
	return true;
}

bool agent_json_get(const struct agent_json *obj, const char *key, struct agent_json *value)
{
	struct agent_json_iter it;
	struct agent_json k, v;
	bool found = false;
	if (obj->type != AGENT_JSON_OBJECT)
		return false;
	agent_json_iter(&it, obj);
	while (agent_json_next_member(&it, &k, &v)) {
		if (agent_json_string_is(&k, key)) {
			*value = v;
			found = true;
		}
	}
	return found;
}

static int hex4(const char *p)
{
	return hex_value(p[0]) << 12 | hex_value(p[1]) << 8 | hex_value(p[2]) << 4 | hex_value(p[3]);
}

static size_t utf8_put(char *o, uint32_t cp)
{
	if (cp < 0x80) {
		o[0] = (char)cp;
		return 1;
	}
	if (cp < 0x800) {
		o[0] = (char)(0xC0 | cp >> 6);
		o[1] = (char)(0x80 | (cp & 0x3F));
		return 2;
	}
	if (cp < 0x10000) {
		o[0] = (char)(0xE0 | cp >> 12);
		o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
		o[2] = (char)(0x80 | (cp & 0x3F));
		return 3;
	}
	o[0] = (char)(0xF0 | cp >> 18);
	o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
	o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
	o[3] = (char)(0x80 | (cp & 0x3F));
	return 4;
}

long agent_json_string(const struct agent_json *s, char *out, size_t cap)
{
	if (s->type != AGENT_JSON_STRING || s->n < 2 || cap == 0)
		return -1;
	const char *p = s->p + 1, *end = s->p + s->n - 1;
	size_t o = 0;
	while (p < end) {
		char tmp[4];
		size_t k;
		if (*p != '\\') {
			/* A run of plain bytes (already checked to be UTF-8). */
			if (o + 1 >= cap)
				return -1;
			out[o++] = *p++;
			continue;
		}
		char e = p[1];
		if (e == 'u') {
			uint32_t cp = (uint32_t)hex4(p + 2);
			p += 6;
			if (cp >= 0xDC00 && cp <= 0xDFFF)
				return -1;	/* a low surrogate first */
			if (cp >= 0xD800 && cp <= 0xDBFF) {
				if (end - p < 6 || p[0] != '\\' || p[1] != 'u')
					return -1;
				uint32_t lo = (uint32_t)hex4(p + 2);
				if (lo < 0xDC00 || lo > 0xDFFF)
					return -1;
				cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
				p += 6;
			}
			k = utf8_put(tmp, cp);
		} else {
			switch (e) {
			case 'b': tmp[0] = '\b'; break;
			case 'f': tmp[0] = '\f'; break;
			case 'n': tmp[0] = '\n'; break;
			case 'r': tmp[0] = '\r'; break;
			case 't': tmp[0] = '\t'; break;
			default: tmp[0] = e; break;	/* " \ / */
			}
			k = 1;
			p += 2;
		}
		if (o + k >= cap)
			return -1;
		for (size_t i = 0; i < k; i++)
			out[o++] = tmp[i];
	}
	out[o] = 0;
	return (long)o;
}

bool agent_json_string_is(const struct agent_json *s, const char *key)
{
	char buf[64];
	size_t n = agent_strlen(key);
	long len = agent_json_string(s, buf, sizeof(buf));
	return len >= 0 && (size_t)len == n && bytes_equal(buf, key, n);
}

bool agent_json_int(const struct agent_json *v, int64_t *out)
{
	if (v->type != AGENT_JSON_NUMBER)
		return false;
	const char *p = v->p, *end = v->p + v->n;
	bool neg = p < end && *p == '-';
	if (neg)
		p++;
	uint64_t limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
	uint64_t acc = 0;
	if (p == end)
		return false;
	for (; p < end; p++) {
		if (!is_digit(*p))
			return false;	/* a fraction or an exponent */
		unsigned d = (unsigned)(*p - '0');
		if (acc > (limit - d) / 10)
			return false;
		acc = acc * 10 + d;
	}
	*out = neg ? (int64_t)(0 - acc) : (int64_t)acc;
	return true;
}

bool agent_json_scaled(const struct agent_json *v, unsigned scale, uint64_t limit, uint64_t *magnitude,
		       bool *negative)
{
	if (v->type != AGENT_JSON_NUMBER)
		return false;
	const char *p = v->p, *end = v->p + v->n;
	*negative = p < end && *p == '-';
	if (*negative)
		p++;
	/* Digits: the integer part, then the fraction; value = digits * 10**exp10. */
	const char *int_start = p;
	while (p < end && is_digit(*p))
		p++;
	const char *int_end = p, *frac_start = p, *frac_end = p;
	if (p < end && *p == '.') {
		frac_start = ++p;
		while (p < end && is_digit(*p))
			p++;
		frac_end = p;
	}
	int64_t exp10 = 0;
	if (p < end && (*p == 'e' || *p == 'E')) {
		p++;
		bool eneg = p < end && *p == '-';
		if (p < end && (*p == '-' || *p == '+'))
			p++;
		for (; p < end && is_digit(*p); p++)
			if (exp10 < 1000000)
				exp10 = exp10 * 10 + (*p - '0');
		if (eneg)
			exp10 = -exp10;
	}
	size_t n_int = (size_t)(int_end - int_start), n_frac = (size_t)(frac_end - frac_start);
	int64_t n_digits = (int64_t)(n_int + n_frac);
	int64_t shift = exp10 - (int64_t)n_frac + (int64_t)scale;	/* result = digits * 10**shift */
	int64_t keep = shift >= 0 ? n_digits : n_digits + shift;	/* digits left of the point */
	uint64_t acc = 0;
	bool saturated = false, round_up = false;
	for (int64_t i = 0; i < n_digits; i++) {
		char c = (size_t)i < n_int ? int_start[i] : frac_start[i - (int64_t)n_int];
		unsigned d = (unsigned)(c - '0');
		if (i < keep) {
			if (acc > (limit - d) / 10)
				saturated = true;
			else
				acc = acc * 10 + d;
		} else if (d) {
			round_up = true;
		}
	}
	for (int64_t i = 0; i < shift && acc && !saturated; i++) {
		if (acc > limit / 10)
			saturated = true;
		else
			acc *= 10;
	}
	if (round_up && !saturated) {
		if (acc >= limit)
			saturated = true;
		else
			acc++;
	}
	*magnitude = saturated ? limit : acc;
	return true;
}

/* ---- JSON writer ---------------------------------------------------------------------------- */
void agent_jw_init(struct agent_jw *w, agent_emit_fn emit, void *ctx)
{
	w->emit = emit;
	w->ctx = ctx;
	w->depth = 0;
	w->overflow = false;
	w->after_key = false;
}

static void jw_put(struct agent_jw *w, const char *s, size_t n)
{
	if (n)
		w->emit(w->ctx, s, n);
}

static void jw_value_prefix(struct agent_jw *w)
{
	if (w->after_key) {
		w->after_key = false;
		return;
	}
	if (w->depth > 0 && w->count[w->depth - 1]++ > 0)
		jw_put(w, ",", 1);
}

static void jw_open(struct agent_jw *w, char c)
{
	jw_value_prefix(w);
	jw_put(w, &c, 1);
	if (w->depth < AGENT_JSON_MAX_DEPTH)
		w->count[w->depth++] = 0;
	else
		w->overflow = true;
}

static void jw_close(struct agent_jw *w, char c)
{
	if (w->depth > 0)
		w->depth--;
	jw_put(w, &c, 1);
}

void agent_jw_begin_object(struct agent_jw *w) { jw_open(w, '{'); }
void agent_jw_end_object(struct agent_jw *w) { jw_close(w, '}'); }
void agent_jw_begin_array(struct agent_jw *w) { jw_open(w, '['); }
void agent_jw_end_array(struct agent_jw *w) { jw_close(w, ']'); }

static void jw_string_body(struct agent_jw *w, const char *s, size_t n)
{
	static const char hex[] = "0123456789abcdef";
	const unsigned char *p = (const unsigned char *)s, *end = p + n, *run = p;
	jw_put(w, "\"", 1);
	while (p < end) {
		unsigned char c = *p;
		size_t k = 1;
		const char *esc = NULL;
		char u[6];
		if (c >= 0x80) {
			k = utf8_seq(p, end);
			if (k) {
				p += k;
				continue;
			}
			esc = "\\ufffd";
			k = 1;
		} else if (c == '"') {
			esc = "\\\"";
		} else if (c == '\\') {
			esc = "\\\\";
		} else if (c == '\n') {
			esc = "\\n";
		} else if (c == '\r') {
			esc = "\\r";
		} else if (c == '\t') {
			esc = "\\t";
		} else if (c < 0x20) {
			u[0] = '\\', u[1] = 'u', u[2] = '0', u[3] = '0', u[4] = hex[c >> 4], u[5] = hex[c & 15];
		} else {
			p++;
			continue;
		}
		jw_put(w, (const char *)run, (size_t)(p - run));
		if (esc)
			jw_put(w, esc, agent_strlen(esc));
		else
			jw_put(w, u, 6);
		p += k;
		run = p;
	}
	jw_put(w, (const char *)run, (size_t)(p - run));
	jw_put(w, "\"", 1);
}

void agent_jw_key_n(struct agent_jw *w, const char *key, size_t n)
{
	if (w->depth > 0 && w->count[w->depth - 1]++ > 0)
		jw_put(w, ",", 1);
	jw_string_body(w, key, n);
	jw_put(w, ":", 1);
	w->after_key = true;
}

void agent_jw_key(struct agent_jw *w, const char *key) { agent_jw_key_n(w, key, agent_strlen(key)); }

void agent_jw_string(struct agent_jw *w, const char *s, size_t n)
{
	jw_value_prefix(w);
	jw_string_body(w, s, n);
}

void agent_jw_int(struct agent_jw *w, int64_t v)
{
	char buf[24];
	size_t n = 0;
	uint64_t mag = (uint64_t)v;
	jw_value_prefix(w);
	if (v < 0) {
		buf[n++] = '-';
		mag = 0 - mag;
	}
	n += agent_fmt_u64(buf + n, mag);
	jw_put(w, buf, n);
}

void agent_jw_raw_value(struct agent_jw *w, const char *text, size_t n)
{
	jw_value_prefix(w);
	jw_put(w, text, n);
}

void agent_jw_base64(struct agent_jw *w, const void *data, size_t n)
{
	struct agent_b64 enc;
	jw_value_prefix(w);
	jw_put(w, "\"", 1);
	agent_b64_init(&enc, w->emit, w->ctx);
	agent_b64_feed(&enc, data, n);
	agent_b64_finish(&enc);
	jw_put(w, "\"", 1);
}

/* ---- lines ---------------------------------------------------------------------------------- */
void agent_lines_init(struct agent_lines *l, char *buf, size_t cap)
{
	l->buf = buf;
	l->cap = cap;
	l->len = 0;
	l->discarding = false;
	l->oversized = 0;
}

size_t agent_lines_feed(struct agent_lines *l, const char *data, size_t n, bool *ready)
{
	*ready = false;
	for (size_t i = 0; i < n; i++) {
		char c = data[i];
		if (c == '\n') {
			if (l->discarding) {
				l->discarding = false;
				l->len = 0;
				continue;
			}
			*ready = true;
			return i + 1;
		}
		if (l->discarding)
			continue;
		if (l->len < l->cap) {
			l->buf[l->len++] = c;
		} else {
			l->discarding = true;
			l->oversized++;
			l->len = 0;
		}
	}
	return n;
}

/* ---- frames ------------------------------------------------------------------------------------ */
static const char *const known_kinds[] = {"hello", "exec", "result", "error"};

const char *agent_frame_status_name(int status)
{
	switch (status) {
	case AGENT_FRAME_OK: return "ok";
	case AGENT_FRAME_NONE: return "no frame";
	case AGENT_FRAME_MALFORMED: return "malformed frame";
	case AGENT_FRAME_VERSION: return "unknown protocol version";
	case AGENT_FRAME_KIND: return "unknown kind";
	case AGENT_FRAME_SEQ: return "sequence number out of range";
	case AGENT_FRAME_CRC: return "CRC mismatch";
	case AGENT_FRAME_BASE64: return "payload is not base64 (or too big)";
	case AGENT_FRAME_JSON: return "payload is not a JSON object";
	}
	return "?";
}

static bool is_b64_char(char c) { return b64_value((unsigned char)c) >= 0 || c == '='; }

/* The frame grammar after the prefix: (\d+):([a-z]+):(\d+):([0-9a-f]{8}):([A-Za-z0-9+/=]*)@@ */
static int match_at(const char *p, const char *end, struct agent_frame *f)
{
	uint64_t version = 0, seq = 0;
	bool seq_overflow = false;
	size_t kind_len = 0;
	if (p >= end || !is_digit(*p))
		return AGENT_FRAME_MALFORMED;
	for (; p < end && is_digit(*p); p++)
		version = version < 1000000 ? version * 10 + (uint64_t)(*p - '0') : version;
	if (p >= end || *p++ != ':')
		return AGENT_FRAME_MALFORMED;
	if (p >= end || !(*p >= 'a' && *p <= 'z'))
		return AGENT_FRAME_MALFORMED;
	for (; p < end && *p >= 'a' && *p <= 'z'; p++) {
		if (kind_len < AGENT_KIND_MAX)
			f->kind[kind_len] = *p;
		kind_len++;
	}
	f->kind[kind_len < AGENT_KIND_MAX ? kind_len : AGENT_KIND_MAX] = 0;
	if (p >= end || *p++ != ':')
		return AGENT_FRAME_MALFORMED;
	if (p >= end || !is_digit(*p))
		return AGENT_FRAME_MALFORMED;
	for (; p < end && is_digit(*p); p++) {
		unsigned d = (unsigned)(*p - '0');
		if (seq > (UINT64_MAX - d) / 10)
			seq_overflow = true;
		else
			seq = seq * 10 + d;
	}
	if (p >= end || *p++ != ':')
		return AGENT_FRAME_MALFORMED;
	uint32_t crc = 0;
	for (int i = 0; i < 8; i++, p++) {
		if (p >= end || !((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f')))
			return AGENT_FRAME_MALFORMED;
		crc = crc << 4 | (uint32_t)hex_value(*p);
	}
	if (p >= end || *p++ != ':')
		return AGENT_FRAME_MALFORMED;
	const char *body = p;
	while (p < end && is_b64_char(*p))
		p++;
	if (end - p < 2 || p[0] != '@' || p[1] != '@')
		return AGENT_FRAME_MALFORMED;
	f->seq = seq;
	f->crc = crc;
	f->body = body;
	f->body_len = (size_t)(p - body);
	f->payload.type = AGENT_JSON_INVALID;
	if (version != AGENT_PROTOCOL_VERSION)
		return AGENT_FRAME_VERSION;
	bool known = false;
	for (size_t i = 0; i < sizeof(known_kinds) / sizeof(known_kinds[0]); i++)
		if (kind_len == agent_strlen(known_kinds[i]) && bytes_equal(f->kind, known_kinds[i], kind_len))
			known = true;
	if (!known)
		return AGENT_FRAME_KIND;
	if (seq_overflow)
		return AGENT_FRAME_SEQ;
	return AGENT_FRAME_OK;
}

int agent_frame_match(const char *line, size_t n, struct agent_frame *f)
{
	const char *prefix = AGENT_FRAME_PREFIX;
	size_t plen = agent_strlen(prefix);
	bool seen = false;
	for (size_t i = 0; i + plen <= n; i++) {
		if (line[i] != '@' || !bytes_equal(line + i, prefix, plen))
			continue;
		seen = true;
		int st = match_at(line + i + plen, line + n, f);
		if (st != AGENT_FRAME_MALFORMED)
			return st;	/* the first complete frame decides, as a regex search would */
	}
	return seen ? AGENT_FRAME_MALFORMED : AGENT_FRAME_NONE;
}

int agent_frame_decode(struct agent_frame *f, char *buf, size_t cap)
{
	size_t len;
	if (agent_crc32(0, f->body, f->body_len) != f->crc)
		return AGENT_FRAME_CRC;
	if (!agent_b64_decode(f->body, f->body_len, (uint8_t *)buf, cap, &len))
		return AGENT_FRAME_BASE64;
	if (!agent_json_parse(buf, len, &f->payload))
		return AGENT_FRAME_JSON;
	return AGENT_FRAME_OK;
}

/* Frame writing: the payload is generated twice, once for its CRC, once for output. */
struct crc_sink {
	uint32_t crc;
};

static void crc_emit(void *ctx, const char *p, size_t n)
{
	struct crc_sink *c = ctx;
	c->crc = agent_crc32(c->crc, p, n);
}

static void to_b64(void *ctx, const char *p, size_t n) { agent_b64_feed(ctx, p, n); }

static void payload_pass(struct agent_b64 *enc, agent_payload_fn fn, void *arg)
{
	struct agent_jw w;
	agent_jw_init(&w, to_b64, enc);
	agent_jw_begin_object(&w);
	if (fn)
		fn(&w, arg);
	agent_jw_end_object(&w);
	agent_b64_finish(enc);
}

void agent_write_frame(const char *kind, uint64_t seq, agent_payload_fn fn, void *arg, agent_emit_fn emit,
		       void *ctx)
{
	static const char hex[] = "0123456789abcdef";
	struct agent_b64 enc;
	struct crc_sink cs = {0};
	agent_b64_init(&enc, crc_emit, &cs);
	payload_pass(&enc, fn, arg);

	char head[80];
	size_t n = 0;
	const char *prefix = AGENT_FRAME_PREFIX "1:";
	size_t kl = agent_strlen(kind);
	if (kl > AGENT_KIND_MAX)
		kl = AGENT_KIND_MAX;
	for (const char *s = prefix; *s; s++)
		head[n++] = *s;
	for (size_t i = 0; i < kl; i++)
		head[n++] = kind[i];
	head[n++] = ':';
	n += agent_fmt_u64(head + n, seq);
	head[n++] = ':';
	for (int i = 7; i >= 0; i--)
		head[n++] = hex[(cs.crc >> (4 * i)) & 15];
	head[n++] = ':';
	emit(ctx, head, n);

	agent_b64_init(&enc, emit, ctx);
	payload_pass(&enc, fn, arg);
	emit(ctx, AGENT_FRAME_SUFFIX "\n", 3);
}

static void hello_payload(struct agent_jw *w, void *arg)
{
	const char *name = arg;
	agent_jw_key(w, "agent");
	agent_jw_string(w, name, agent_strlen(name));
	agent_jw_key(w, "version");
	agent_jw_int(w, AGENT_PROTOCOL_VERSION);
}

void agent_write_hello(const char *agent_name, agent_emit_fn emit, void *ctx)
{
	agent_write_frame("hello", 0, hello_payload, (void *)agent_name, emit, ctx);
}

static void error_payload(struct agent_jw *w, void *arg)
{
	const char *message = arg;
	agent_jw_key(w, "message");
	agent_jw_string(w, message, agent_strlen(message));
}

void agent_write_error(uint64_t seq, const char *message, agent_emit_fn emit, void *ctx)
{
	agent_write_frame("error", seq, error_payload, (void *)message, emit, ctx);
}

/* ---- exec requests ------------------------------------------------------------------------------ */
/* Timeouts beyond this (about 31 years, in ms) are saturated: effectively none. */
#define AGENT_TIMEOUT_LIMIT_MS 1000000000000ull

static bool has_nul(const char *s, long n)
{
	for (long i = 0; i < n; i++)
		if (!s[i])
			return true;
	return false;
}

const char *agent_parse_exec(const struct agent_json *payload, char *arena, size_t arena_cap, char **slots,
			     int max_slots, struct agent_request *req)
{
	struct agent_json v;
	size_t used = 0;
	req->shell = false;
	req->argc = 0;
	req->argv = slots;
	req->stdin_data = (uint8_t *)arena;
	req->stdin_len = 0;
	req->has_timeout = false;
	req->timeout_ms = 0;
	if (max_slots < 2)
		return "the agent has no room for arguments";

	if (agent_json_get(payload, "argv", &v)) {
		static const char bad_argv[] = "argv must be a non-empty list of strings";
		struct agent_json_iter it;
		struct agent_json item;
		if (v.type != AGENT_JSON_ARRAY)
			return bad_argv;
		agent_json_iter(&it, &v);
		while (agent_json_next(&it, &item)) {
			if (item.type != AGENT_JSON_STRING)
				return bad_argv;
			if (req->argc >= max_slots - 1)
				return "argv has more arguments than the agent takes";
			long len = agent_json_string(&item, arena + used, arena_cap - used);
			if (len < 0)
				return "argv holds a string that is not valid Unicode (a lone surrogate)";
			if (has_nul(arena + used, len))
				return "argv holds a string with an embedded NUL";
			slots[req->argc++] = arena + used;
			used += (size_t)len + 1;
		}
		if (req->argc == 0)
			return bad_argv;
	} else if (agent_json_get(payload, "sh", &v) && v.type == AGENT_JSON_STRING) {
		long len = agent_json_string(&v, arena + used, arena_cap - used);
		if (len < 0)
			return "sh is not valid Unicode (a lone surrogate)";
		if (has_nul(arena + used, len))
			return "sh holds an embedded NUL";
		slots[req->argc++] = arena + used;
		used += (size_t)len + 1;
		req->shell = true;
	} else {
		return "a request needs argv or sh";
	}
	slots[req->argc] = NULL;

	if (agent_json_get(payload, "stdin", &v)) {
		long len = v.type == AGENT_JSON_STRING ? agent_json_string(&v, arena + used, arena_cap - used) : -1;
		size_t n;
		if (len < 0 || !agent_b64_decode(arena + used, (size_t)len, (uint8_t *)arena + used, arena_cap - used, &n))
			return "stdin is not valid base64";
		req->stdin_data = (uint8_t *)arena + used;
		req->stdin_len = n;
		used += n;
	}

	if (agent_json_get(payload, "timeout", &v) && v.type != AGENT_JSON_NULL) {
		uint64_t ms;
		bool neg;
		if (!agent_json_scaled(&v, 3, AGENT_TIMEOUT_LIMIT_MS, &ms, &neg))
			return "timeout must be a number of seconds";
		if (neg && ms)
			return "timeout must not be negative";
		if (ms) {
			req->has_timeout = true;
			req->timeout_ms = ms;
		}
	}
	return NULL;
}
