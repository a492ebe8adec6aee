/*
 * microvm-agent DEVICE: the exec agent of the reference Linux guest.
 *
 * Serves pytest_microvm's exec agent protocol (pytest_microvm/agent.py) on
 * DEVICE: a serial port (/dev/ttyS0), a virtio console (/dev/hvc0), or "-"
 * for standard input and output.  A tty is switched to raw mode first (no
 * echo, no line editing, no CR/LF translation), so frames pass unchanged.
 *
 * At start it writes the hello frame; then, one request at a time, it runs
 * each exec request and answers it:
 *
 *   - "sh" runs through /bin/sh -c, "argv" through execvp (PATH search);
 *   - the child gets "stdin" on a pipe and a new session (its own process
 *     group); stdout and stderr are captured up to OUTPUT_CAP bytes each, and
 *     what did not fit is reported as "stdout_truncated"/"stderr_truncated";
 *   - the return code is the exit status, or 128 + N for a child killed by
 *     signal N, as a shell reports it;
 *   - past the request's "timeout" the whole process group is killed with
 *     SIGKILL and the answer is an error frame ("TimeoutExpired: ...");
 *   - a program that cannot be executed is an error frame too.
 *
 * After the child exits, output still arriving is read until both pipes
 * close, or until DRAIN_IDLE_MS pass without any (a background process that
 * keeps the pipes open does not hold the answer back).  The agent is a child
 * subreaper, so orphaned grandchildren are reaped here.
 *
 * With "-" the agent ends at EOF on standard input.  A device that reads as
 * EOF (a virtio port while no host side is connected) is read again every
 * HOST_RETRY_MS until the host connects.
 *
 * Lines that carry no frame are ignored; damaged frames, frames of other
 * kinds and oversized lines are ignored and counted, with one line on stderr
 * each.  Everything is bounded: lines by LINE_CAP (the host's own frame
 * limit), output by OUTPUT_CAP.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "agent_proto.h"

#define AGENT_NAME "microvm-agent-linux"
/* The longest request line: pytest_microvm.agent.MAX_FRAME. */
#define LINE_CAP (16u << 20)
/* Decoded payloads are 3/4 of their base64 text. */
#define ARENA_CAP (LINE_CAP / 4 * 3)
/* Output kept per stream; two full streams still make a frame below LINE_CAP. */
#define OUTPUT_CAP (4u << 20)
#define MAX_ARGS 8192
#define DRAIN_IDLE_MS 100
#define WRITE_BUF 65536
/* How often a device that reads as EOF (a virtio port with no host side) is tried again. */
#define HOST_RETRY_MS 100
/* How long a device that is not ready yet (ENXIO, ENODEV) is tried again. */
#define OPEN_RETRY_MS 10000

static char line_buf[LINE_CAP];
static char arena[ARENA_CAP];
static char *arg_slots[MAX_ARGS];
static struct agent_lines lines;
static struct agent_stats stats;
static int in_fd = -1, out_fd = -1, sig_fd = -1;

static void logmsg(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("microvm-agent: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

/* ---- output: frames go out in one buffered stream ---- */
static char wbuf[WRITE_BUF];
static size_t wlen;
static bool out_broken;

static void write_all(int fd, const char *p, size_t n)
{
	while (n && !out_broken) {
		ssize_t k = write(fd, p, n);
		if (k > 0) {
			p += k;
			n -= (size_t)k;
		} else if (k < 0 && errno == EINTR) {
			continue;
		} else if (k < 0 && errno == EAGAIN) {
			struct pollfd pfd = {fd, POLLOUT, 0};
			poll(&pfd, 1, -1);
		} else {
			logmsg("writing to the device failed: %s", k < 0 ? strerror(errno) : "no progress");
			out_broken = true;
		}
	}
}

static void out_flush(void)
{
	write_all(out_fd, wbuf, wlen);
	wlen = 0;
}

static void out_emit(void *ctx, const char *p, size_t n)
{
	(void)ctx;
	if (wlen + n > sizeof(wbuf))
		out_flush();
	if (n > sizeof(wbuf)) {
		write_all(out_fd, p, n);
		return;
	}
	memcpy(wbuf + wlen, p, n);
	wlen += n;
}

/* ---- the device ---- */
static int open_device(const char *path)
{
	if (!strcmp(path, "-")) {
		in_fd = 0;
		out_fd = 1;
		return 0;
	}
	int fd;
	for (int tries = 0;; tries++) {
		fd = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
		/* A virtio port's node can exist before its driver lets it open (ENXIO). */
		if (fd >= 0 || (errno != ENXIO && errno != ENODEV) || tries * HOST_RETRY_MS >= OPEN_RETRY_MS)
			break;
		if (tries == 0)
			logmsg("%s: %s; trying again for up to %d s", path, strerror(errno), OPEN_RETRY_MS / 1000);
		struct timespec pause = {0, HOST_RETRY_MS * 1000000L};
		nanosleep(&pause, NULL);
	}
	if (fd < 0) {
		logmsg("cannot open %s: %s", path, strerror(errno));
		return -1;
	}
	if (isatty(fd)) {
		struct termios t;
		if (tcgetattr(fd, &t) == 0) {
			cfmakeraw(&t);
			t.c_cflag |= CLOCAL | CREAD;
			t.c_cc[VMIN] = 1;
			t.c_cc[VTIME] = 0;
			if (tcsetattr(fd, TCSANOW, &t) != 0)
				logmsg("%s: cannot set raw mode: %s", path, strerror(errno));
		}
	}
	in_fd = out_fd = fd;
	return 0;
}

/* ---- children ---- */
static pid_t child_pid;
static int child_status;
static bool child_done;

/* Reaps every child that ended: the command's own, and orphans given to this subreaper. */
static void reap(void)
{
	struct signalfd_siginfo si;
	while (read(sig_fd, &si, sizeof(si)) == (ssize_t)sizeof(si))
		;
	for (;;) {
		int st;
		pid_t p = waitpid(-1, &st, WNOHANG);
		if (p <= 0)
			return;
		if (p == child_pid && !child_done) {
			child_status = st;
			child_done = true;
		}
	}
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

struct capture {
	int fd;
	char *buf;
	size_t len;
	uint64_t dropped;
};

static char out_cap_buf[OUTPUT_CAP], err_cap_buf[OUTPUT_CAP];

/* Reads what is available; false at EOF or error (the pipe is closed then). */
static bool capture_read(struct capture *c)
{
	char scratch[65536];
	for (;;) {
		ssize_t k;
		if (c->len < OUTPUT_CAP)
			k = read(c->fd, c->buf + c->len, OUTPUT_CAP - c->len);
		else
			k = read(c->fd, scratch, sizeof(scratch));
		if (k > 0) {
			if (c->len < OUTPUT_CAP)
				c->len += (size_t)k;
			else
				c->dropped += (uint64_t)k;
			continue;
		}
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0 && errno == EAGAIN)
			return true;
		close(c->fd);
		c->fd = -1;
		return false;
	}
}

struct result {
	int returncode;
	struct capture *out, *err;
};

static void result_payload(struct agent_jw *w, void *arg)
{
	struct result *r = arg;
	agent_jw_key(w, "returncode");
	agent_jw_int(w, r->returncode);
	agent_jw_key(w, "stdout");
	agent_jw_base64(w, r->out->buf, r->out->len);
	agent_jw_key(w, "stderr");
	agent_jw_base64(w, r->err->buf, r->err->len);
	if (r->out->dropped) {
		agent_jw_key(w, "stdout_truncated");
		agent_jw_int(w, (int64_t)r->out->dropped);
	}
	if (r->err->dropped) {
		agent_jw_key(w, "stderr_truncated");
		agent_jw_int(w, (int64_t)r->err->dropped);
	}
}

static void child_exec(const struct agent_request *req, int in, int out, int err, int status_fd)
{
	sigset_t none;
	setsid();
	dup2(in, 0);
	dup2(out, 1);
	dup2(err, 2);
	signal(SIGPIPE, SIG_DFL);
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	if (req->shell)
		execl("/bin/sh", "sh", "-c", req->argv[0], (char *)NULL);
	else
		execvp(req->argv[0], req->argv);
	int e = errno;
	ssize_t ignored = write(status_fd, &e, sizeof(e));
	(void)ignored;
	_exit(127);
}

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/* Runs one request and writes its answer frame. */
static void run_request(uint64_t seq, const struct agent_request *req)
{
	int pin[2], pout[2], perr[2], pstat[2];
	char msg[512];
	if (pipe2(pin, O_CLOEXEC) || pipe2(pout, O_CLOEXEC) || pipe2(perr, O_CLOEXEC) || pipe2(pstat, O_CLOEXEC)) {
		snprintf(msg, sizeof(msg), "OSError: cannot create pipes: %s", strerror(errno));
		agent_write_error(seq, msg, out_emit, NULL);
		return;
	}
	child_done = false;
	child_status = 0;
	pid_t pid = fork();
	if (pid == 0)
		child_exec(req, pin[0], pout[1], perr[1], pstat[1]);
	close(pin[0]);
	close(pout[1]);
	close(perr[1]);
	close(pstat[1]);
	if (pid < 0) {
		snprintf(msg, sizeof(msg), "OSError: fork failed: %s", strerror(errno));
		close(pin[1]), close(pout[0]), close(perr[0]), close(pstat[0]);
		agent_write_error(seq, msg, out_emit, NULL);
		return;
	}
	child_pid = pid;

	/* EOF here means the exec succeeded (the pipe is close-on-exec); else the child's errno. */
	int exec_errno = 0;
	ssize_t k;
	do
		k = read(pstat[0], &exec_errno, sizeof(exec_errno));
	while (k < 0 && errno == EINTR);
	close(pstat[0]);
	if (k == (ssize_t)sizeof(exec_errno)) {
		close(pin[1]), close(pout[0]), close(perr[0]);
		while (!child_done) {
			int st;
			if (waitpid(pid, &st, 0) == pid)
				child_done = true;
			else if (errno != EINTR)
				break;
		}
		child_pid = 0;
		snprintf(msg, sizeof(msg), "%s: cannot execute %.300s: %s", exec_errno == ENOENT ? "FileNotFoundError" : "OSError",
			 req->shell ? "/bin/sh" : req->argv[0], strerror(exec_errno));
		agent_write_error(seq, msg, out_emit, NULL);
		return;
	}

	struct capture out = {pout[0], out_cap_buf, 0, 0}, err = {perr[0], err_cap_buf, 0, 0};
	int in_w = pin[1];
	size_t in_off = 0;
	set_nonblock(out.fd);
	set_nonblock(err.fd);
	if (req->stdin_len == 0)
		close_fd(&in_w);
	else
		set_nonblock(in_w);

	int64_t deadline = req->has_timeout ? now_ms() + (int64_t)req->timeout_ms : -1;
	bool timed_out = false;
	int64_t idle_since = -1;
	for (;;) {
		reap();
		if (child_done && in_w >= 0)
			close_fd(&in_w);	/* nobody will read the rest */
		if (child_done && out.fd < 0 && err.fd < 0)
			break;
		struct pollfd pfd[4];
		int n = 0;
		int i_in = -1, i_out = -1, i_err = -1;
		if (in_w >= 0)
			pfd[i_in = n++] = (struct pollfd){in_w, POLLOUT, 0};
		if (out.fd >= 0)
			pfd[i_out = n++] = (struct pollfd){out.fd, POLLIN, 0};
		if (err.fd >= 0)
			pfd[i_err = n++] = (struct pollfd){err.fd, POLLIN, 0};
		pfd[n++] = (struct pollfd){sig_fd, POLLIN, 0};
		int64_t now = now_ms();
		int wait_ms = -1;
		if (deadline >= 0) {
			if (now >= deadline) {
				timed_out = true;
				break;
			}
			wait_ms = (int)(deadline - now < 60000 ? deadline - now : 60000);
		}
		if (child_done) {
			if (idle_since < 0)
				idle_since = now;
			if (now - idle_since >= DRAIN_IDLE_MS)
				break;	/* something in the background holds the pipes open */
			int left = (int)(DRAIN_IDLE_MS - (now - idle_since));
			if (wait_ms < 0 || left < wait_ms)
				wait_ms = left;
		}
		int r = poll(pfd, (nfds_t)n, wait_ms);
		if (r < 0 && errno != EINTR) {
			logmsg("poll: %s", strerror(errno));
			break;
		}
		if (r <= 0)
			continue;
		if (i_in >= 0 && pfd[i_in].revents) {
			ssize_t w = write(in_w, req->stdin_data + in_off, req->stdin_len - in_off);
			if (w > 0)
				in_off += (size_t)w;
			else if (w < 0 && errno != EAGAIN && errno != EINTR)
				close_fd(&in_w);	/* EPIPE: the child closed its stdin */
			if (in_off == req->stdin_len)
				close_fd(&in_w);
		}
		bool progress = false;
		if (i_out >= 0 && pfd[i_out].revents) {
			capture_read(&out);
			progress = true;
		}
		if (i_err >= 0 && pfd[i_err].revents) {
			capture_read(&err);
			progress = true;
		}
		if (progress)
			idle_since = -1;
	}
	close_fd(&in_w);
	if (timed_out) {
		kill(-pid, SIGKILL);	/* the session's process group: the child and what it started */
		kill(pid, SIGKILL);
	}
	while (!child_done) {
		int st;
		pid_t p = waitpid(pid, &st, 0);
		if (p == pid) {
			child_status = st;
			child_done = true;
		} else if (p < 0 && errno != EINTR) {
			break;
		}
	}
	child_pid = 0;
	if (out.fd >= 0)
		capture_read(&out), close_fd(&out.fd);
	if (err.fd >= 0)
		capture_read(&err), close_fd(&err.fd);
	if (timed_out) {
		snprintf(msg, sizeof(msg),
			 "TimeoutExpired: the command ran longer than its timeout of %llu.%03llu s; its process group %d "
			 "was killed",
			 (unsigned long long)(req->timeout_ms / 1000), (unsigned long long)(req->timeout_ms % 1000), (int)pid);
		agent_write_error(seq, msg, out_emit, NULL);
		return;
	}
	struct result res = {0, &out, &err};
	if (WIFEXITED(child_status))
		res.returncode = WEXITSTATUS(child_status);
	else if (WIFSIGNALED(child_status))
		res.returncode = 128 + WTERMSIG(child_status);
	else
		res.returncode = 255;
	agent_write_frame("result", seq, result_payload, &res, out_emit, NULL);
}

/* ---- requests ---- */
static void handle_line(void)
{
	struct agent_frame f;
	int st = agent_frame_match(line_buf, lines.len, &f);
	if (st == AGENT_FRAME_NONE)
		return;
	if (st == AGENT_FRAME_OK)
		st = agent_frame_decode(&f, line_buf, LINE_CAP);	/* in place: the payload is shorter */
	if (st != AGENT_FRAME_OK) {
		stats.bad_frames++;
		logmsg("ignored a frame: %s (%llu bad so far)", agent_frame_status_name(st),
		       (unsigned long long)stats.bad_frames);
		return;
	}
	if (strcmp(f.kind, "exec")) {
		stats.ignored++;
		logmsg("ignored a '%s' frame: the agent serves exec requests", f.kind);
		return;
	}
	struct agent_request req;
	const char *err = agent_parse_exec(&f.payload, arena, sizeof(arena), arg_slots, MAX_ARGS, &req);
	stats.requests++;
	if (err) {
		char msg[256];
		snprintf(msg, sizeof(msg), "ValueError: %s", err);
		agent_write_error(f.seq, msg, out_emit, NULL);
	} else {
		run_request(f.seq, &req);
	}
	out_flush();
}

int main(int argc, char **argv)
{
	if (argc != 2 || argv[1][0] == 0) {
		fprintf(stderr, "usage: microvm-agent DEVICE   (e.g. /dev/ttyS0, /dev/hvc0, or - for stdin/stdout)\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	sigset_t chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	sig_fd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sig_fd < 0) {
		logmsg("signalfd: %s", strerror(errno));
		return 1;
	}
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	if (open_device(argv[1]) < 0)
		return 1;
	agent_lines_init(&lines, line_buf, LINE_CAP);
	agent_write_hello(AGENT_NAME, out_emit, NULL);
	out_flush();

	uint64_t oversized_seen = 0;
	bool stdio = !strcmp(argv[1], "-"), waiting_for_host = false;
	static char chunk[65536];
	for (;;) {
		struct pollfd pfd[2] = {{in_fd, POLLIN, 0}, {sig_fd, POLLIN, 0}};
		if (poll(pfd, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			logmsg("poll: %s", strerror(errno));
			return 1;
		}
		if (pfd[1].revents)
			reap();
		if (!pfd[0].revents)
			continue;
		ssize_t got = read(in_fd, chunk, sizeof(chunk));
		if (got < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (got == 0 && !stdio) {
			/*
			 * A virtio port reads as EOF (and polls as POLLHUP) while no
			 * host side is connected; the host may connect later.
			 */
			if (!waiting_for_host)
				logmsg("%s: no host side connected; waiting for one", argv[1]);
			waiting_for_host = true;
			struct timespec pause = {0, HOST_RETRY_MS * 1000000L};
			nanosleep(&pause, NULL);
			continue;
		}
		if (got <= 0) {
			if (got < 0)
				logmsg("reading %s: %s", argv[1], strerror(errno));
			return got < 0 ? 1 : 0;
		}
		waiting_for_host = false;
		size_t off = 0;
		while (off < (size_t)got) {
			bool ready;
			off += agent_lines_feed(&lines, chunk + off, (size_t)got - off, &ready);
			if (lines.oversized != oversized_seen) {
				oversized_seen = lines.oversized;
				logmsg("ignored a line longer than %u bytes (%llu so far)", LINE_CAP,
				       (unsigned long long)oversized_seen);
			}
			if (ready) {
				handle_line();
				agent_lines_clear(&lines);
			}
		}
		if (out_broken)
			return 1;
	}
}
