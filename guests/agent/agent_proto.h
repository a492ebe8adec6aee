/*
 * The exec agent protocol, guest side: one copy shared by every guest agent.
 *
 * The protocol is defined by pytest_microvm/agent.py (its docstring and its
 * reference AgentServer).  A frame is one text line
 *
 *     @@microvm-agent:1:<kind>:<seq>:<crc32>:<base64 of a JSON object>@@\n
 *
 * This file holds what every agent needs, and nothing that depends on how
 * commands run: CRC-32 (zlib's), base64 (RFC 4648 section 4), a strict JSON
 * reader for the payloads the protocol defines, a streaming JSON writer, the
 * line assembler, and frame matching, decoding and writing.
 *
 * It is freestanding C: no libc, no allocation, no floating point (the tiny
 * guests build with -mgeneral-regs-only).  Every buffer is the caller's and
 * bounded; garbled or oversized input is rejected with a reason and counted
 * by the caller, never trusted.
 */
#ifndef AGENT_PROTO_H
#define AGENT_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define AGENT_PROTOCOL_VERSION 1
#define AGENT_FRAME_PREFIX "@@microvm-agent:"
#define AGENT_FRAME_SUFFIX "@@"
/* Deepest JSON nesting accepted (the protocol needs 2: an object holding an array). */
#define AGENT_JSON_MAX_DEPTH 16
/* Longest kind accepted ("result" is the longest the protocol defines). */
#define AGENT_KIND_MAX 15

/* ---- CRC-32: IEEE 802.3, reflected, as zlib.crc32 (agent_crc32(0, d, n) == zlib.crc32(d)) ---- */
uint32_t agent_crc32(uint32_t crc, const void *data, size_t n);

/* ---- base64 (RFC 4648 section 4, with padding, no line breaks) ---- */
/* Characters needed to encode n bytes. */
static inline size_t agent_b64_len(size_t n) { return (n + 2) / 3 * 4; }
/*
 * Strict decoding of the canonical form only: length a multiple of 4, '='
 * only as the final one or two characters, unused bits zero.  `out` may be
 * `in` (decoding in place).  False when the text is not canonical base64 or
 * the result does not fit in `cap` bytes.
 */
bool agent_b64_decode(const char *in, size_t n, uint8_t *out, size_t cap, size_t *out_len);

typedef void (*agent_emit_fn)(void *ctx, const char *p, size_t n);

/* A streaming encoder: bytes in, base64 text out through `emit` in chunks. */
struct agent_b64 {
	agent_emit_fn emit;
	void *ctx;
	uint8_t pend[3];
	unsigned npend;
	size_t len;
	char buf[252];
};
void agent_b64_init(struct agent_b64 *e, agent_emit_fn emit, void *ctx);
void agent_b64_feed(struct agent_b64 *e, const void *data, size_t n);
/* Pads the last group and flushes; the encoder can be initialised again afterwards. */
void agent_b64_finish(struct agent_b64 *e);

/* ---- JSON reader (RFC 8259), strict ---- */
enum agent_json_type {
	AGENT_JSON_INVALID = 0,
	AGENT_JSON_OBJECT,
	AGENT_JSON_ARRAY,
	AGENT_JSON_STRING,
	AGENT_JSON_NUMBER,
	AGENT_JSON_TRUE,
	AGENT_JSON_FALSE,
	AGENT_JSON_NULL,
};

/* A value: its type and the span of its text in the document (quotes included for strings). */
struct agent_json {
	enum agent_json_type type;
	const char *p;
	size_t n;
};

/*
 * Checks that text[0..n) is exactly one JSON object (surrounding whitespace
 * allowed): UTF-8 in strings (no encoded surrogates), escapes as RFC 8259
 * section 7, no control characters in strings, numbers as section 6, no
 * NaN/Infinity, at most AGENT_JSON_MAX_DEPTH levels.  Every other function
 * below assumes a document that passed this check.
 */
bool agent_json_parse(const char *text, size_t n, struct agent_json *root);

/* Iterating an array's values or an object's members. */
struct agent_json_iter {
	const char *p, *end;
	bool first;
};
void agent_json_iter(struct agent_json_iter *it, const struct agent_json *container);
bool agent_json_next(struct agent_json_iter *it, struct agent_json *value);
bool agent_json_next_member(struct agent_json_iter *it, struct agent_json *key, struct agent_json *value);

/* The value of the last member named `key` (as Python's json does with duplicates). */
bool agent_json_get(const struct agent_json *obj, const char *key, struct agent_json *value);

/*
 * Decodes a string value (escapes, \uXXXX and surrogate pairs) into UTF-8 in
 * out[0..cap), NUL-terminated.  Returns its length in bytes (NULs from \u0000
 * included), or -1 when it is not a string, holds a lone surrogate, or does
 * not fit.  The decoded form is never longer than the value's text.
 */
long agent_json_string(const struct agent_json *s, char *out, size_t cap);
/* True when the string value equals `key` after decoding. */
bool agent_json_string_is(const struct agent_json *s, const char *key);

/* An integer value (no fraction, no exponent) that fits an int64_t. */
bool agent_json_int(const struct agent_json *v, int64_t *out);
/*
 * A number multiplied by 10**scale, rounded up (towards +infinity for
 * positive values; the magnitude rounded up for negative ones) and saturated
 * at `limit`: seconds to milliseconds with scale 3.  No floating point.
 */
bool agent_json_scaled(const struct agent_json *v, unsigned scale, uint64_t limit, uint64_t *magnitude,
		       bool *negative);

/* ---- JSON writer: compact text into a sink (usually a base64 stream) ---- */
struct agent_jw {
	agent_emit_fn emit;
	void *ctx;
	int depth;
	bool overflow;			/* nesting deeper than AGENT_JSON_MAX_DEPTH was attempted */
	uint32_t count[AGENT_JSON_MAX_DEPTH];	/* values (or keys) written at each level */
	bool after_key;
};
void agent_jw_init(struct agent_jw *w, agent_emit_fn emit, void *ctx);
void agent_jw_begin_object(struct agent_jw *w);
void agent_jw_end_object(struct agent_jw *w);
void agent_jw_begin_array(struct agent_jw *w);
void agent_jw_end_array(struct agent_jw *w);
void agent_jw_key(struct agent_jw *w, const char *key);
/* A key of n bytes of UTF-8 (NULs allowed). */
void agent_jw_key_n(struct agent_jw *w, const char *key, size_t n);
/* A string value from UTF-8 bytes; invalid UTF-8 is written as U+FFFD, so the output is always valid JSON. */
void agent_jw_string(struct agent_jw *w, const char *s, size_t n);
void agent_jw_int(struct agent_jw *w, int64_t v);
/* Raw JSON text for a value (a number taken from a parsed document). */
void agent_jw_raw_value(struct agent_jw *w, const char *text, size_t n);
/* A string value holding the base64 encoding of data[0..n). */
void agent_jw_base64(struct agent_jw *w, const void *data, size_t n);

/* ---- line assembly ---- */
/*
 * Collects input into lines in buf[0..cap).  A line longer than cap is
 * dropped whole (up to its newline) and counted in `oversized`.
 */
struct agent_lines {
	char *buf;
	size_t cap;
	size_t len;
	bool discarding;
	uint64_t oversized;
};
void agent_lines_init(struct agent_lines *l, char *buf, size_t cap);
/*
 * Consumes input up to and including the first newline; returns how many
 * bytes were used.  *ready is set when buf[0..len) then holds a complete line
 * (without its newline); call agent_lines_clear() once it has been handled.
 */
size_t agent_lines_feed(struct agent_lines *l, const char *data, size_t n, bool *ready);
static inline void agent_lines_clear(struct agent_lines *l) { l->len = 0; }

/* ---- frames ---- */
enum agent_frame_status {
	AGENT_FRAME_OK = 0,
	AGENT_FRAME_NONE,	/* no frame prefix on the line: not meant for the agent */
	AGENT_FRAME_MALFORMED,	/* a prefix, but no complete frame after it */
	AGENT_FRAME_VERSION,	/* another protocol version */
	AGENT_FRAME_KIND,	/* a kind the protocol does not define */
	AGENT_FRAME_SEQ,	/* a sequence number beyond 64 bits */
	AGENT_FRAME_CRC,	/* the CRC does not match the payload */
	AGENT_FRAME_BASE64,	/* the payload is not canonical base64, or too big to decode */
	AGENT_FRAME_JSON,	/* the payload is not one strict JSON object */
};
const char *agent_frame_status_name(int status);

struct agent_frame {
	char kind[AGENT_KIND_MAX + 1];
	uint64_t seq;
	uint32_t crc;
	const char *body;	/* the base64 payload text, inside the line */
	size_t body_len;
	struct agent_json payload;	/* after agent_frame_decode: the object, inside the caller's buffer */
};

/*
 * Finds the first complete frame on a line (any text around it is ignored,
 * as console output may share the line) and checks its version and kind:
 * AGENT_FRAME_OK, or why not.
 */
int agent_frame_match(const char *line, size_t n, struct agent_frame *f);
/*
 * Checks a matched frame's CRC, decodes its base64 payload into buf[0..cap)
 * and parses the JSON object there (f->payload).  `buf` may be the line
 * buffer itself when f->body lies in it (decoding works in place).
 */
int agent_frame_decode(struct agent_frame *f, char *buf, size_t cap);

/* Writes a payload's members; called twice per frame (CRC pass, then output), so it must be deterministic. */
typedef void (*agent_payload_fn)(struct agent_jw *w, void *arg);
/*
 * Writes one complete frame line, "\n" included: the payload object is
 * opened and closed here, `fn` writes its members.
 */
void agent_write_frame(const char *kind, uint64_t seq, agent_payload_fn fn, void *arg, agent_emit_fn emit,
		       void *ctx);
void agent_write_hello(const char *agent_name, agent_emit_fn emit, void *ctx);
void agent_write_error(uint64_t seq, const char *message, agent_emit_fn emit, void *ctx);

/* ---- exec requests ---- */
struct agent_request {
	bool shell;		/* "sh": argv[0] is the command line; else "argv" */
	int argc;
	char **argv;		/* NULL-terminated, strings in the caller's arena */
	uint8_t *stdin_data;
	size_t stdin_len;
	bool has_timeout;	/* "timeout" present, non-null and non-zero */
	uint64_t timeout_ms;	/* rounded up */
};

/*
 * Reads an exec payload as the reference AgentServer does: "argv" (a
 * non-empty list of strings) wins over "sh" (a string); "stdin" is base64;
 * "timeout" is seconds (absent, null or 0: none).  Strings and stdin are
 * decoded into arena[0..arena_cap) (the payload's own size always suffices),
 * argv pointers into slots[0..max_slots).  Returns NULL, or the message for
 * an error answer.
 */
const char *agent_parse_exec(const struct agent_json *payload, char *arena, size_t arena_cap, char **slots,
			     int max_slots, struct agent_request *req);

/* ---- small helpers both agents use ---- */
/* Decimal text of v into buf (at least 21 bytes); returns the length. */
size_t agent_fmt_u64(char *buf, uint64_t v);
size_t agent_strlen(const char *s);

/* Counters an agent reports in its diagnostics. */
struct agent_stats {
	uint64_t requests;	/* exec frames answered */
	uint64_t bad_frames;	/* lines with the prefix that were not valid frames */
	uint64_t ignored;	/* valid frames of a kind the agent does not serve */
};

#endif
