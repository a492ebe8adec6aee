/*
 * agent: the exec agent protocol (pytest_microvm/agent.py) on COM1, with
 * built-in commands instead of processes, so MicroVM.run() works on any VMM
 * that can boot a tiny guest.
 *
 * Requests run as the Linux agent runs them, with a built-in in place of a
 * program: "argv" names the built-in and its arguments; "sh" is split into
 * words first (blanks separate words; '...' and "..." quote, backslash
 * escapes).  Built-ins:
 *
 *   echo [-n] ARGS    ARGS joined by spaces (and a newline unless -n)
 *   stderr ARGS       the same on stderr
 *   true / false      return code 0 / 1
 *   exit [N]          answers with return code N, then ends the VM with exit code N
 *   cmdline           the kernel command line
 *   cat               stdin to stdout
 *   sum               "<crc32> <length>" of stdin (zlib's CRC-32, 8 hex digits)
 *   yes N [WORD]      WORD (default "y") and a newline, N times
 *   sleep MS          busy-waits MS milliseconds (past the request's timeout:
 *                     an error answer "TimeoutExpired: ...")
 *   stats             the agent's counters
 *   help              this list
 *
 * Anything else returns 127 with "NAME: command not found" on stderr.  Output
 * beyond OUTPUT_CAP per stream is dropped and reported as
 * "stdout_truncated"/"stderr_truncated".  Lines without a frame are ignored;
 * damaged frames, other kinds and oversized lines are ignored, counted and
 * noted on the console.
 */
#include "tiny.h"
#include "agent_proto.h"

const char tiny_guest_name[] = "agent";

#define AGENT_NAME "microvm-agent-tiny"
#define LINE_CAP (192u << 10)
#define ARENA_CAP (LINE_CAP / 4 * 3)
#define OUTPUT_CAP (16u << 10)
#define MAX_ARGS 64
#define MAX_WORDS_BYTES 4096

static char line_buf[LINE_CAP];
static char arena[ARENA_CAP];
static char *arg_slots[MAX_ARGS];
static struct agent_lines lines;
static struct agent_stats stats;

/*
 * ---- time ----
 * KVM's pvclock (Documentation/virt/kvm/x86/msr.rst, MSR_KVM_SYSTEM_TIME_NEW)
 * when the hypervisor offers it: the host keeps the TSC-to-nanoseconds scale
 * in a structure this guest names.  Otherwise the TSC at the frequency CPUID
 * reports, or at the 3 GHz the kit assumes elsewhere.
 */
#define KVM_CPUID_SIGNATURE	0x40000000
#define KVM_CPUID_FEATURES	0x40000001
#define KVM_FEATURE_CLOCKSOURCE2	(1u << 3)
#define MSR_KVM_SYSTEM_TIME_NEW	0x4b564d01
#define CPUID_TIMING_LEAF	0x40000010	/* VMware-style: EAX = TSC kHz */

struct pvclock_vcpu_time_info {
	volatile uint32_t version;
	uint32_t pad0;
	volatile uint64_t tsc_timestamp;
	volatile uint64_t system_time;
	volatile uint32_t tsc_to_system_mul;
	volatile int8_t tsc_shift;
	volatile uint8_t flags;
	uint8_t pad[2];
} __attribute__((aligned(64)));

static struct pvclock_vcpu_time_info pvclock;
static bool use_pvclock;
static uint64_t tsc_khz;
static const char *clock_source;

static bool kvm_signature(uint32_t *max)
{
	uint32_t b, c, d;
	cpuid(KVM_CPUID_SIGNATURE, 0, max, &b, &c, &d);
	return b == 0x4b4d564b && c == 0x564b4d56 && d == 0x4d;	/* "KVMKVMKVM\0\0\0" */
}

static void clock_init(void)
{
	uint32_t a, b, c, d, max;
	if (kvm_signature(&max) && max >= KVM_CPUID_FEATURES) {
		cpuid(KVM_CPUID_FEATURES, 0, &a, &b, &c, &d);
		if (a & KVM_FEATURE_CLOCKSOURCE2) {
			wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (uint64_t)(uintptr_t)&pvclock | 1);
			if (pvclock.tsc_to_system_mul) {
				use_pvclock = true;
				clock_source = "kvmclock";
				return;
			}
		}
	}
	cpuid(KVM_CPUID_SIGNATURE, 0, &max, &b, &c, &d);
	if (max >= CPUID_TIMING_LEAF && max < KVM_CPUID_SIGNATURE + 0x10000) {
		cpuid(CPUID_TIMING_LEAF, 0, &a, &b, &c, &d);
		if (a) {
			tsc_khz = a, clock_source = "cpuid 0x40000010";
			return;
		}
	}
	cpuid(0, 0, &max, &b, &c, &d);
	if (max >= 0x15) {
		cpuid(0x15, 0, &a, &b, &c, &d);	/* SDM: TSC = crystal (ECX Hz) * EBX / EAX */
		if (a && b && c) {
			tsc_khz = (uint64_t)c * b / a / 1000, clock_source = "cpuid 0x15";
			return;
		}
	}
	if (max >= 0x16) {
		cpuid(0x16, 0, &a, &b, &c, &d);	/* base frequency, MHz */
		if (a & 0xffff) {
			tsc_khz = (uint64_t)(a & 0xffff) * 1000, clock_source = "cpuid 0x16";
			return;
		}
	}
	tsc_khz = 3000000, clock_source = "TSC, assumed 3 GHz";
}

/* pvclock time in ns: system_time + scaled TSC delta, read under the version protocol. */
static uint64_t pvclock_ns(void)
{
	uint32_t v;
	uint64_t ns;
	do {
		v = pvclock.version;
		__atomic_thread_fence(__ATOMIC_ACQUIRE);
		uint64_t delta = rdtsc() - pvclock.tsc_timestamp;
		int8_t shift = pvclock.tsc_shift;
		delta = shift >= 0 ? delta << shift : delta >> -shift;
		ns = pvclock.system_time + (uint64_t)(((unsigned __int128)delta * pvclock.tsc_to_system_mul) >> 32);
		__atomic_thread_fence(__ATOMIC_ACQUIRE);
	} while ((v & 1) || v != pvclock.version);
	return ns;
}

static uint64_t now_ms(void) { return use_pvclock ? pvclock_ns() / 1000000 : rdtsc() / tsc_khz; }

/* ---- output ---- */
static void serial_emit(void *ctx, const char *p, size_t n)
{
	(void)ctx;
	serial_write(p, n);
}

struct capture {
	char buf[OUTPUT_CAP];
	size_t len;
	uint64_t dropped;
};
static struct capture cap_out, cap_err;

static void put(struct capture *c, const char *s, size_t n)
{
	size_t room = OUTPUT_CAP - c->len;
	size_t take = n < room ? n : room;
	memcpy(c->buf + c->len, s, take);
	c->len += take;
	c->dropped += n - take;
}

static void puts_to(struct capture *c, const char *s) { put(c, s, strlen(s)); }

static void printf_to(struct capture *c, const char *fmt, ...) PRINTF_LIKE(2, 3);
static void printf_to(struct capture *c, const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	put(c, buf, n < 0 ? 0 : (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
}

struct result {
	int returncode;
};

static void result_payload(struct agent_jw *w, void *arg)
{
	struct result *r = arg;
	agent_jw_key(w, "returncode");
	agent_jw_int(w, r->returncode);
	agent_jw_key(w, "stdout");
	agent_jw_base64(w, cap_out.buf, cap_out.len);
	agent_jw_key(w, "stderr");
	agent_jw_base64(w, cap_err.buf, cap_err.len);
	if (cap_out.dropped) {
		agent_jw_key(w, "stdout_truncated");
		agent_jw_int(w, (int64_t)cap_out.dropped);
	}
	if (cap_err.dropped) {
		agent_jw_key(w, "stderr_truncated");
		agent_jw_int(w, (int64_t)cap_err.dropped);
	}
}

/* ---- sh: words ---- */
static char words_buf[MAX_WORDS_BYTES];
static char *word_slots[MAX_ARGS];

/* Splits a command line into word_slots; returns the count, or -1 with *why set. */
static int split_words(const char *s, const char **why)
{
	size_t o = 0;
	int n = 0;
	for (;;) {
		while (*s == ' ' || *s == '\t' || *s == '\n')
			s++;
		if (!*s)
			break;
		if (n >= MAX_ARGS - 1) {
			*why = "too many words";
			return -1;
		}
		word_slots[n++] = words_buf + o;
		char quote = 0;
		while (*s && (quote || (*s != ' ' && *s != '\t' && *s != '\n'))) {
			char c = *s++;
			if (quote == '\'' && c == '\'') {
				quote = 0;
				continue;
			}
			if (quote == '"' && c == '"') {
				quote = 0;
				continue;
			}
			if (!quote && (c == '\'' || c == '"')) {
				quote = c;
				continue;
			}
			if (c == '\\' && quote != '\'' && *s) {
				if (quote == '"' && *s != '"' && *s != '\\') {
					/* inside "...", a backslash only escapes " and \ */
				} else {
					c = *s++;
				}
			}
			if (o + 2 > sizeof(words_buf)) {
				*why = "command line too long";
				return -1;
			}
			words_buf[o++] = c;
		}
		if (quote) {
			*why = "unterminated quote";
			return -1;
		}
		words_buf[o++] = 0;
	}
	word_slots[n] = NULL;
	return n;
}

/* ---- built-ins ---- */
static bool parse_u64(const char *s, uint64_t *out)
{
	uint64_t v = 0;
	if (!*s)
		return false;
	for (; *s; s++) {
		if (*s < '0' || *s > '9' || v > (UINT64_MAX - 9) / 10)
			return false;
		v = v * 10 + (uint64_t)(*s - '0');
	}
	*out = v;
	return true;
}

static void join_args(struct capture *c, int argc, char **argv, int from, bool newline)
{
	for (int i = from; i < argc; i++) {
		if (i > from)
			put(c, " ", 1);
		puts_to(c, argv[i]);
	}
	if (newline)
		put(c, "\n", 1);
}

static const char help_text[] =
	"built-ins: echo [-n] ARGS, stderr ARGS, true, false, exit [N], cmdline, cat, sum, yes N [WORD], "
	"sleep MS, stats, help\n";

enum outcome { DONE, TIMED_OUT, EXIT_VM };

static enum outcome run_builtin(int argc, char **argv, const struct agent_request *req, int *rc)
{
	const char *cmd = argv[0];
	uint64_t n;
	*rc = 0;
	if (!strcmp(cmd, "echo")) {
		bool nl = !(argc > 1 && !strcmp(argv[1], "-n"));
		join_args(&cap_out, argc, argv, nl ? 1 : 2, nl);
	} else if (!strcmp(cmd, "stderr")) {
		join_args(&cap_err, argc, argv, 1, true);
	} else if (!strcmp(cmd, "true")) {
	} else if (!strcmp(cmd, "false")) {
		*rc = 1;
	} else if (!strcmp(cmd, "exit")) {
		n = 0;
		if (argc > 1 && !parse_u64(argv[1], &n)) {
			printf_to(&cap_err, "exit: %s: numeric argument required\n", argv[1]);
			*rc = 2;
			return DONE;
		}
		*rc = (int)(n & 0xff);
		return EXIT_VM;
	} else if (!strcmp(cmd, "cmdline")) {
		puts_to(&cap_out, cmdline());
		put(&cap_out, "\n", 1);
	} else if (!strcmp(cmd, "cat")) {
		put(&cap_out, (const char *)req->stdin_data, req->stdin_len);
	} else if (!strcmp(cmd, "sum")) {
		printf_to(&cap_out, "%08x %zu\n", (unsigned)agent_crc32(0, req->stdin_data, req->stdin_len),
			  req->stdin_len);
	} else if (!strcmp(cmd, "yes")) {
		const char *word = argc > 2 ? argv[2] : "y";
		size_t wl = strlen(word);
		if (argc < 2 || !parse_u64(argv[1], &n)) {
			puts_to(&cap_err, "yes: usage: yes N [WORD]\n");
			*rc = 2;
			return DONE;
		}
		for (uint64_t i = 0; i < n && !cap_out.dropped; i++) {
			put(&cap_out, word, wl);
			put(&cap_out, "\n", 1);
		}
		if (cap_out.dropped) {	/* count the rest without producing it */
			uint64_t total = n > UINT64_MAX / (wl + 1) ? UINT64_MAX : n * (wl + 1);
			cap_out.dropped = total - cap_out.len;
		}
	} else if (!strcmp(cmd, "sleep")) {
		if (argc < 2 || !parse_u64(argv[1], &n)) {
			puts_to(&cap_err, "sleep: usage: sleep MS\n");
			*rc = 2;
			return DONE;
		}
		uint64_t start = now_ms();
		bool limited = req->has_timeout && req->timeout_ms < n;
		uint64_t wait = limited ? req->timeout_ms : n;
		while (now_ms() - start < wait)
			cpu_relax();
		if (limited)
			return TIMED_OUT;
	} else if (!strcmp(cmd, "stats")) {
		printf_to(&cap_out, "requests=%llu bad_frames=%llu ignored=%llu oversized=%llu\n",
			  (unsigned long long)stats.requests, (unsigned long long)stats.bad_frames,
			  (unsigned long long)stats.ignored, (unsigned long long)lines.oversized);
	} else if (!strcmp(cmd, "help")) {
		puts_to(&cap_out, help_text);
	} else {
		printf_to(&cap_err, "%s: command not found\n", cmd);
		*rc = 127;
	}
	return DONE;
}

static void run_request(uint64_t seq, const struct agent_request *req)
{
	int argc = req->argc;
	char **argv = req->argv;
	const char *why = NULL;
	char msg[160];
	cap_out.len = cap_err.len = 0;
	cap_out.dropped = cap_err.dropped = 0;
	if (req->shell) {
		argc = split_words(req->argv[0], &why);
		argv = word_slots;
		if (argc < 0) {
			struct result r = {2};
			puts_to(&cap_err, "sh: ");
			puts_to(&cap_err, why);
			put(&cap_err, "\n", 1);
			agent_write_frame("result", seq, result_payload, &r, serial_emit, NULL);
			return;
		}
		if (argc == 0) {
			struct result r = {0};
			agent_write_frame("result", seq, result_payload, &r, serial_emit, NULL);
			return;
		}
	}
	struct result r;
	enum outcome o = run_builtin(argc, argv, req, &r.returncode);
	if (o == TIMED_OUT) {
		snprintf(msg, sizeof(msg), "TimeoutExpired: %s ran longer than its timeout of %llu.%03llu s", argv[0],
			 (unsigned long long)(req->timeout_ms / 1000), (unsigned long long)(req->timeout_ms % 1000));
		agent_write_error(seq, msg, serial_emit, NULL);
		return;
	}
	agent_write_frame("result", seq, result_payload, &r, serial_emit, NULL);
	if (o == EXIT_VM) {
		printf("agent: exit %d requested\n", r.returncode);
		exit(r.returncode);
	}
}

static void handle_line(void)
{
	struct agent_frame f;
	int st = agent_frame_match(line_buf, lines.len, &f);
	if (st == AGENT_FRAME_NONE)
		return;
	if (st == AGENT_FRAME_OK)
		st = agent_frame_decode(&f, line_buf, LINE_CAP);
	if (st != AGENT_FRAME_OK) {
		stats.bad_frames++;
		printf("agent: ignored a frame: %s (%llu bad so far)\n", agent_frame_status_name(st),
		       (unsigned long long)stats.bad_frames);
		return;
	}
	if (strcmp(f.kind, "exec")) {
		stats.ignored++;
		printf("agent: ignored a '%s' frame: the agent serves exec requests\n", f.kind);
		return;
	}
	struct agent_request req;
	const char *err = agent_parse_exec(&f.payload, arena, sizeof(arena), arg_slots, MAX_ARGS, &req);
	stats.requests++;
	if (err) {
		char msg[160];
		snprintf(msg, sizeof(msg), "ValueError: %s", err);
		agent_write_error(f.seq, msg, serial_emit, NULL);
		return;
	}
	run_request(f.seq, &req);
}

int main(void)
{
	clock_init();
	printf("agent: clock: %s\n", clock_source);
	agent_lines_init(&lines, line_buf, LINE_CAP);
	agent_write_hello(AGENT_NAME, serial_emit, NULL);
	uint64_t oversized_seen = 0;
	for (;;) {
		char c = (char)serial_getc();
		bool ready;
		agent_lines_feed(&lines, &c, 1, &ready);
		if (lines.oversized != oversized_seen) {
			oversized_seen = lines.oversized;
			printf("agent: ignored a line longer than %u bytes (%llu so far)\n", LINE_CAP,
			       (unsigned long long)oversized_seen);
		}
		if (ready) {
			handle_line();
			agent_lines_clear(&lines);
		}
	}
}
