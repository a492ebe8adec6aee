/*
 * virtio_console: an echo service on the first virtio-console port (virtio
 * 1.2 §5.3, port 0 without MULTIPORT: receiveq 0, transmitq 1), from ring 3.
 *
 * It writes `console: ready\n` to the port, then answers every line that
 * arrives with `echo: <line>\n`.  The line `exit N` ends the guest with exit
 * code N (after its echo).  Lines are at most 200 bytes; longer ones are cut.
 *
 * Command line words (all optional):
 *   console_timeout_ms=N   give up after N ms without a line (default 30000):
 *                          exit code EXIT_TIMEOUT
 * Progress goes to the serial console; exit codes 0x70.. are this guest's own
 * failures (no device, set-up, a transmit that never completed).
 */
#include "tiny.h"
#include "virtio.h"

const char tiny_guest_name[] = "virtio_console";

#define RX_QUEUE 0
#define TX_QUEUE 1
#define RX_BUFFERS 8
#define RX_SIZE 256
#define LINE_MAX 200
#define TIMEOUT_MS 5000

#define EXIT_NO_DEVICE 0x70
#define EXIT_SETUP 0x71
#define EXIT_TX 0x72
#define EXIT_RX 0x73
#define EXIT_TIMEOUT 0x74

static struct virtio_dev dev;
static struct virtq rxq, txq;
static uint8_t *rx_buf[RX_BUFFERS];
static char *tx_buf;
static int buf_of_head[16];	/* the receive queue has at most 16 entries */

static bool post_rx(int i)
{
	struct virtq_buf b = { virt_to_phys(rx_buf[i]), RX_SIZE };
	int head = virtq_add(&rxq, NULL, 0, &b, 1);
	if (head < 0 || head >= (int)ARRAY_SIZE(buf_of_head))
		return false;
	buf_of_head[head] = i;
	return true;
}

/* Send `len` bytes and wait until the device has taken them. */
static bool send(const char *data, size_t len)
{
	memcpy(tx_buf, data, len);
	struct virtq_buf b = { virt_to_phys(tx_buf), (uint32_t)len };
	uint32_t used;
	return virtq_call(&txq, &b, 1, NULL, 0, &used, TIMEOUT_MS) >= 0;
}

static bool sendf(const char *fmt, ...) PRINTF_LIKE(1, 2);
static bool sendf(const char *fmt, ...)
{
	char line[LINE_MAX + 32];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (n >= (int)sizeof(line))
		n = sizeof(line) - 1;
	return send(line, (size_t)n);
}

int main(void)
{
	uint32_t timeout_ms = (uint32_t)cmdline_u64("console_timeout_ms", 30000);
	if (!virtio_find(VIRTIO_ID_CONSOLE, 0, &dev)) {
		printf("virtio_console: %s\n", virtio_error());
		return EXIT_NO_DEVICE;
	}
	printf("virtio_console: device at %#lx (found by %s)\n", dev.base, dev.found_by);
	tx_buf = virtio_alloc(LINE_MAX + 32, 16);
	for (int i = 0; i < RX_BUFFERS; i++)
		rx_buf[i] = virtio_alloc(RX_SIZE, 16);
	if (!tx_buf || !rx_buf[RX_BUFFERS - 1] || virtio_setup(&dev, 0) < 0 ||
	    virtq_init(&dev, &rxq, RX_QUEUE, 16) < 0 || virtq_init(&dev, &txq, TX_QUEUE, 16) < 0) {
		printf("virtio_console: set-up failed: %s\n", virtio_error());
		return EXIT_SETUP;
	}
	/* §3.1.1: receive buffers may be given before DRIVER_OK; the device uses them after. */
	for (int i = 0; i < RX_BUFFERS; i++)
		post_rx(i);
	virtio_driver_ok(&dev);
	virtq_kick(&rxq);
	if (!sendf("console: ready\n")) {
		printf("virtio_console: greeting: %s\n", virtio_error());
		return EXIT_TX;
	}
	printf("virtio_console: ready\n");

	char line[LINE_MAX + 1];
	size_t len = 0;
	uint64_t lines = 0;
	for (;;) {
		uint32_t got;
		int head = virtq_wait(&rxq, &got, timeout_ms);
		if (head == -1) {
			printf("virtio_console: no input for %u ms after %lu lines\n", timeout_ms, lines);
			return EXIT_TIMEOUT;
		}
		if (head < 0) {
			printf("virtio_console: receive queue: %s\n", virtio_error());
			return EXIT_RX;
		}
		int i = buf_of_head[head];
		if (got > RX_SIZE) {
			printf("virtio_console: used length %u of a %u-byte buffer\n", got, RX_SIZE);
			return EXIT_RX;
		}
		for (uint32_t k = 0; k < got; k++) {
			char c = (char)rx_buf[i][k];
			if (c != '\n') {
				if (len < LINE_MAX)
					line[len++] = c;
				continue;
			}
			line[len] = 0;
			if (len && line[len - 1] == '\r')
				line[--len] = 0;
			lines++;
			if (!sendf("echo: %s\n", line)) {
				printf("virtio_console: echo: %s\n", virtio_error());
				return EXIT_TX;
			}
			if (!strncmp(line, "exit ", 5)) {
				int code = 0;
				for (const char *p = line + 5; *p >= '0' && *p <= '9'; p++)
					code = code * 10 + (*p - '0');
				printf("virtio_console: %lu lines, exiting with %d\n", lines, code);
				return code;
			}
			len = 0;
		}
		post_rx(i);
		virtq_kick(&rxq);
	}
}
