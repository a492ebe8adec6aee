/*
 * protocheck: drives the protocol core from a host program, for differential
 * tests against the Python implementation (pytest_microvm/agent.py).
 *
 *   protocheck frames   each input line -> "none", "bad <reason>", or the
 *                       payload written back by the core as a frame of the
 *                       same kind and sequence number (reader + writer round trip)
 *   protocheck exec     each exec frame -> one JSON line describing the
 *                       request as agent_parse_exec() reads it, or its error
 *
 * Not part of any guest: tests build it with the host compiler.
 */
#include <stdio.h>
#include <string.h>

#include "agent_proto.h"

#define LINE_MAX_BYTES (8u << 20)

static void emit_stdout(void *ctx, const char *p, size_t n)
{
	(void)ctx;
	fwrite(p, 1, n, stdout);
}

/* Writes a parsed value back through the writer, recursively. */
static void copy_value(struct agent_jw *w, const struct agent_json *v, char *scratch, size_t cap)
{
	struct agent_json_iter it;
	struct agent_json k, item;
	switch (v->type) {
	case AGENT_JSON_OBJECT:
		agent_jw_begin_object(w);
		agent_json_iter(&it, v);
		while (agent_json_next_member(&it, &k, &item)) {
			long n = agent_json_string(&k, scratch, cap);
			if (n < 0)
				agent_jw_key(w, "\x01undecodable");	/* a lone surrogate: marked */
			else
				agent_jw_key_n(w, scratch, (size_t)n);
			copy_value(w, &item, scratch, cap);
		}
		agent_jw_end_object(w);
		break;
	case AGENT_JSON_ARRAY:
		agent_jw_begin_array(w);
		agent_json_iter(&it, v);
		while (agent_json_next(&it, &item))
			copy_value(w, &item, scratch, cap);
		agent_jw_end_array(w);
		break;
	case AGENT_JSON_STRING: {
		long n = agent_json_string(v, scratch, cap);
		if (n < 0)
			agent_jw_string(w, "\x01undecodable", 12);
		else
			agent_jw_string(w, scratch, (size_t)n);
		break;
	}
	default:
		agent_jw_raw_value(w, v->p, v->n);
		break;
	}
}

struct copy_arg {
	const struct agent_json *root;
	char *scratch;
	size_t cap;
};

static void copy_members(struct agent_jw *w, void *arg)
{
	struct copy_arg *a = arg;
	struct agent_json_iter it;
	struct agent_json k, v;
	agent_json_iter(&it, a->root);
	while (agent_json_next_member(&it, &k, &v)) {
		long n = agent_json_string(&k, a->scratch, a->cap);
		if (n < 0)
			agent_jw_key(w, "\x01undecodable");
		else
			agent_jw_key_n(w, a->scratch, (size_t)n);
		copy_value(w, &v, a->scratch, a->cap);
	}
}

static void describe_exec(const struct agent_json *payload, char *arena, size_t cap)
{
	static char *slots[4096];
	struct agent_request req;
	struct agent_jw w;
	const char *err = agent_parse_exec(payload, arena, cap, slots, 4096, &req);
	agent_jw_init(&w, emit_stdout, NULL);
	agent_jw_begin_object(&w);
	if (err) {
		agent_jw_key(&w, "error");
		agent_jw_string(&w, err, strlen(err));
	} else {
		agent_jw_key(&w, "shell");
		agent_jw_int(&w, req.shell);
		agent_jw_key(&w, "argv");
		agent_jw_begin_array(&w);
		for (int i = 0; i < req.argc; i++)
			agent_jw_base64(&w, req.argv[i], strlen(req.argv[i]));
		agent_jw_end_array(&w);
		agent_jw_key(&w, "stdin");
		agent_jw_base64(&w, req.stdin_data, req.stdin_len);
		agent_jw_key(&w, "timeout_ms");
		agent_jw_int(&w, req.has_timeout ? (int64_t)req.timeout_ms : -1);
	}
	agent_jw_end_object(&w);
	fputc('\n', stdout);
}

int main(int argc, char **argv)
{
	if (argc != 2 || (strcmp(argv[1], "frames") && strcmp(argv[1], "exec"))) {
		fprintf(stderr, "usage: protocheck frames|exec < lines\n");
		return 2;
	}
	int exec_mode = !strcmp(argv[1], "exec");
	static char line[LINE_MAX_BYTES], payload[LINE_MAX_BYTES], scratch[LINE_MAX_BYTES];
	struct agent_lines lines;
	agent_lines_init(&lines, line, LINE_MAX_BYTES);
	char chunk[65536];
	size_t got;
	while ((got = fread(chunk, 1, sizeof(chunk), stdin)) > 0) {
		size_t off = 0;
		while (off < got) {
			bool ready;
			off += agent_lines_feed(&lines, chunk + off, got - off, &ready);
			if (!ready)
				continue;
			struct agent_frame f;
			int st = agent_frame_match(line, lines.len, &f);
			if (st == AGENT_FRAME_OK)
				st = agent_frame_decode(&f, payload, LINE_MAX_BYTES);
			if (st == AGENT_FRAME_NONE) {
				puts("none");
			} else if (st != AGENT_FRAME_OK) {
				printf("bad %s\n", agent_frame_status_name(st));
			} else if (exec_mode) {
				describe_exec(&f.payload, scratch, LINE_MAX_BYTES);
			} else {
				struct copy_arg a = {&f.payload, scratch, LINE_MAX_BYTES};
				agent_write_frame(f.kind, f.seq, copy_members, &a, emit_stdout, NULL);
			}
			agent_lines_clear(&lines);
		}
	}
	if (lines.oversized)
		printf("oversized %llu\n", (unsigned long long)lines.oversized);
	return 0;
}
