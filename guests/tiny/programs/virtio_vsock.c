/*
 * virtio_vsock: a line echo over virtio-vsock stream connections (virtio 1.2
 * §5.10: rx = 0, tx = 1, event = 2), from ring 3, one connection at a time.
 *
 *   vsock_connect=P   first connect to the host (CID 2) port P
 *   vsock_listen=Q    then accept one connection from the host on port Q
 *
 * On each connection the guest sends `vsock: connected <local port>\n` (or
 * `vsock: accepted <local port>\n`) and answers every line with
 * `echo: <line>\n`, until the host shuts the connection down; the guest then
 * answers with RST (§5.10.6.5) and goes on.  Before waiting for the host's
 * connection it prints `virtio_vsock: listening on port Q` on the serial
 * console.  Exit code 0 when both (or the one asked for) went through; 0x70..
 * for this guest's own failures, 0x75 when a connection was refused (RST).
 *
 *   vsock_timeout_ms=N   give up after N ms without a packet (default 30000)
 *
 * Flow control (§5.10.6.3): every packet carries our buf_alloc and fwd_cnt
 * (lines are consumed as they arrive, so the host never runs out of credit);
 * the guest sends only within the host's advertised credit.
 */
#include "tiny.h"
#include "virtio.h"

const char tiny_guest_name[] = "virtio_vsock";

#define RX_QUEUE 0
#define TX_QUEUE 1
#define EVENT_QUEUE 2
#define VSOCK_CFG_GUEST_CID 0
#define VIRTIO_VSOCK_F_STREAM 0
#define VIRTIO_VSOCK_TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define SHUTDOWN_SEND 2
#define VMADDR_CID_HOST 2

#define RX_BUFFERS 16
#define RX_PAYLOAD 4096
#define EVENT_BUFFERS 4
#define BUF_ALLOC (64 * 1024)
#define LINE_MAX 200
#define TIMEOUT_MS 5000
#define FIRST_LOCAL_PORT 49152

#define EXIT_NO_DEVICE 0x70
#define EXIT_SETUP 0x71
#define EXIT_TX 0x72
#define EXIT_RX 0x73
#define EXIT_TIMEOUT 0x74
#define EXIT_REFUSED 0x75
#define EXIT_PROTOCOL 0x76

struct __attribute__((packed)) vsock_hdr {
	uint64_t src_cid;
	uint64_t dst_cid;
	uint32_t src_port;
	uint32_t dst_port;
	uint32_t len;
	uint16_t type;
	uint16_t op;
	uint32_t flags;
	uint32_t buf_alloc;
	uint32_t fwd_cnt;
};
_Static_assert(sizeof(struct vsock_hdr) == 44, "§5.10.6: the header is 44 bytes");

struct conn {
	uint32_t local_port, peer_port;
	uint32_t peer_buf_alloc, peer_fwd_cnt;	/* the host's credit, from its last packet */
	uint32_t tx_cnt;			/* payload bytes we sent */
	uint32_t fwd_cnt;			/* payload bytes we consumed */
	char line[LINE_MAX + 1];
	size_t len;
	uint64_t lines;
};

static struct virtio_dev dev;
static struct virtq rxq, txq, evq;
static uint8_t *rx_buf[RX_BUFFERS];
static int buf_of_head[64];
static struct vsock_hdr *tx_hdr;
static char *tx_payload;
static uint32_t *event_buf[EVENT_BUFFERS];
static uint64_t guest_cid;
static uint32_t timeout_ms;

static const char *const OPS[] = { "invalid", "request", "response", "rst", "shutdown", "rw", "credit-update",
				   "credit-request" };
static const char *op_name(uint16_t op) { return op < ARRAY_SIZE(OPS) ? OPS[op] : "unknown"; }

static bool post_rx(int i)
{
	struct virtq_buf b = { virt_to_phys(rx_buf[i]), sizeof(struct vsock_hdr) + RX_PAYLOAD };
	int head = virtq_add(&rxq, NULL, 0, &b, 1);
	if (head < 0 || head >= (int)ARRAY_SIZE(buf_of_head))
		return false;
	buf_of_head[head] = i;
	return true;
}

/* One packet to the host, header and payload in two descriptors; waits until the device took it. */
static bool send_pkt(struct conn *c, uint32_t src_port, uint32_t dst_port, uint16_t op, uint32_t flags,
		     const void *data, uint32_t len)
{
	memset(tx_hdr, 0, sizeof(*tx_hdr));
	tx_hdr->src_cid = guest_cid;
	tx_hdr->dst_cid = VMADDR_CID_HOST;
	tx_hdr->src_port = src_port;
	tx_hdr->dst_port = dst_port;
	tx_hdr->len = len;
	tx_hdr->type = VIRTIO_VSOCK_TYPE_STREAM;
	tx_hdr->op = op;
	tx_hdr->flags = flags;
	tx_hdr->buf_alloc = BUF_ALLOC;
	tx_hdr->fwd_cnt = c ? c->fwd_cnt : 0;
	struct virtq_buf out[2] = { { virt_to_phys(tx_hdr), sizeof(*tx_hdr) }, { virt_to_phys(tx_payload), len } };
	if (len)
		memcpy(tx_payload, data, len);
	uint32_t used;
	if (virtq_call(&txq, out, len ? 2 : 1, NULL, 0, &used, TIMEOUT_MS) < 0)
		return false;
	if (c && op == OP_RW)
		c->tx_cnt += len;
	return true;
}

static bool send_conn(struct conn *c, uint16_t op, uint32_t flags, const void *data, uint32_t len)
{
	return send_pkt(c, c->local_port, c->peer_port, op, flags, data, len);
}

/* Send a stream chunk within the host's credit (§5.10.6.3.1); false if there is not enough. */
static bool send_data(struct conn *c, const char *data, uint32_t len)
{
	uint32_t room = c->peer_buf_alloc - (c->tx_cnt - c->peer_fwd_cnt);
	if (len > room) {
		printf("virtio_vsock: only %u bytes of credit for %u\n", room, len);
		return false;
	}
	return send_conn(c, OP_RW, 0, data, len);
}

/*
 * The next packet from the device: copies its header into *h and points *data
 * at its payload (valid until *slot is posted again).  Returns 0, or an exit code.
 */
static int next_pkt(struct vsock_hdr *h, const uint8_t **data, int *slot)
{
	uint32_t got;
	int head = virtq_wait(&rxq, &got, timeout_ms);
	if (head == -1) {
		printf("virtio_vsock: no packet for %u ms\n", timeout_ms);
		return EXIT_TIMEOUT;
	}
	if (head < 0) {
		printf("virtio_vsock: receive queue: %s\n", virtio_error());
		return EXIT_RX;
	}
	int i = buf_of_head[head];
	memcpy(h, rx_buf[i], sizeof(*h));
	if (got < sizeof(*h) || h->len > got - sizeof(*h)) {
		printf("virtio_vsock: packet of %u bytes says len %u\n", got, got >= sizeof(*h) ? h->len : 0);
		return EXIT_PROTOCOL;
	}
	*data = rx_buf[i] + sizeof(*h);
	*slot = i;
	return 0;
}

static void repost(int slot)
{
	post_rx(slot);
	virtq_kick(&rxq);
}

/* Answer a packet that belongs to no connection of ours: RST, never in reply to an RST. */
static void refuse(const struct vsock_hdr *h)
{
	if (h->op != OP_RST)
		send_pkt(NULL, h->dst_port, h->src_port, OP_RST, 0, NULL, 0);
}

static bool is_ours(const struct conn *c, const struct vsock_hdr *h)
{
	return h->src_cid == VMADDR_CID_HOST && h->dst_cid == guest_cid && h->src_port == c->peer_port &&
	       h->dst_port == c->local_port;
}

/* Echo lines on an established connection until the host shuts it down; 0 or an exit code. */
static int serve(struct conn *c, const char *greeting)
{
	char hello[64];
	int n = snprintf(hello, sizeof(hello), "vsock: %s %u\n", greeting, c->local_port);
	if (!send_data(c, hello, (uint32_t)n))
		return EXIT_TX;
	for (;;) {
		struct vsock_hdr h;
		const uint8_t *data;
		int slot, rc = next_pkt(&h, &data, &slot);
		if (rc)
			return rc;
		if (!is_ours(c, &h)) {
			refuse(&h);
			repost(slot);
			continue;
		}
		c->peer_buf_alloc = h.buf_alloc;
		c->peer_fwd_cnt = h.fwd_cnt;
		int status = -1;	/* -1: go on */
		if (h.op == OP_RW) {
			for (uint32_t k = 0; k < h.len; k++) {
				char ch = (char)data[k];
				if (ch != '\n') {
					if (c->len < LINE_MAX)
						c->line[c->len++] = ch;
					continue;
				}
				c->line[c->len] = 0;
				char reply[LINE_MAX + 16];
				int m = snprintf(reply, sizeof(reply), "echo: %s\n", c->line);
				c->len = 0;
				c->lines++;
				if (!send_data(c, reply, (uint32_t)m)) {
					status = EXIT_TX;
					break;
				}
			}
			c->fwd_cnt += h.len;	/* consumed: the host may send that much more */
			if (status < 0 && !send_conn(c, OP_CREDIT_UPDATE, 0, NULL, 0))
				status = EXIT_TX;
		} else if (h.op == OP_CREDIT_REQUEST) {
			if (!send_conn(c, OP_CREDIT_UPDATE, 0, NULL, 0))
				status = EXIT_TX;
		} else if (h.op == OP_SHUTDOWN) {
			printf("virtio_vsock: port %u: host shut down (flags %#x) after %lu lines\n", c->local_port,
			       h.flags, c->lines);
			status = send_conn(c, OP_RST, 0, NULL, 0) ? 0 : EXIT_TX;
		} else if (h.op == OP_RST) {
			printf("virtio_vsock: port %u: host reset the connection after %lu lines\n", c->local_port,
			       c->lines);
			status = 0;
		} else if (h.op != OP_CREDIT_UPDATE) {
			printf("virtio_vsock: port %u: unexpected %s\n", c->local_port, op_name(h.op));
			send_conn(c, OP_RST, 0, NULL, 0);
			status = EXIT_PROTOCOL;
		}
		repost(slot);
		if (status >= 0)
			return status;
	}
}

static int do_connect(uint32_t port)
{
	struct conn c = { .local_port = FIRST_LOCAL_PORT, .peer_port = port };
	if (!send_conn(&c, OP_REQUEST, 0, NULL, 0))
		return EXIT_TX;
	for (;;) {
		struct vsock_hdr h;
		const uint8_t *data;
		int slot, rc = next_pkt(&h, &data, &slot);
		if (rc)
			return rc;
		bool ours = is_ours(&c, &h);
		if (ours) {
			c.peer_buf_alloc = h.buf_alloc;
			c.peer_fwd_cnt = h.fwd_cnt;
		} else {
			refuse(&h);
		}
		repost(slot);
		if (!ours || h.op == OP_CREDIT_UPDATE)
			continue;
		if (h.op == OP_RST) {
			printf("virtio_vsock: host port %u refused the connection\n", port);
			return EXIT_REFUSED;
		}
		if (h.op != OP_RESPONSE) {
			printf("virtio_vsock: %s in answer to a request\n", op_name(h.op));
			return EXIT_PROTOCOL;
		}
		printf("virtio_vsock: connected to host port %u from %u\n", port, c.local_port);
		return serve(&c, "connected");
	}
}

static int do_listen(uint32_t port)
{
	printf("virtio_vsock: listening on port %u\n", port);
	for (;;) {
		struct vsock_hdr h;
		const uint8_t *data;
		int slot, rc = next_pkt(&h, &data, &slot);
		if (rc)
			return rc;
		bool wanted = h.op == OP_REQUEST && h.src_cid == VMADDR_CID_HOST && h.dst_cid == guest_cid &&
			      h.dst_port == port;
		if (!wanted) {
			refuse(&h);
			repost(slot);
			continue;
		}
		struct conn c = { .local_port = port, .peer_port = h.src_port, .peer_buf_alloc = h.buf_alloc,
				  .peer_fwd_cnt = h.fwd_cnt };
		repost(slot);
		if (!send_conn(&c, OP_RESPONSE, 0, NULL, 0))
			return EXIT_TX;
		printf("virtio_vsock: accepted host port %u on %u\n", c.peer_port, port);
		return serve(&c, "accepted");
	}
}

int main(void)
{
	timeout_ms = (uint32_t)cmdline_u64("vsock_timeout_ms", 30000);
	if (!virtio_find(VIRTIO_ID_VSOCK, 0, &dev)) {
		printf("virtio_vsock: %s\n", virtio_error());
		return EXIT_NO_DEVICE;
	}
	printf("virtio_vsock: device at %#lx (found by %s)\n", dev.base, dev.found_by);
	tx_hdr = virtio_alloc(sizeof(*tx_hdr), 64);
	tx_payload = virtio_alloc(LINE_MAX + 16, 64);
	for (int i = 0; i < RX_BUFFERS; i++)
		rx_buf[i] = virtio_alloc(sizeof(struct vsock_hdr) + RX_PAYLOAD, 64);
	for (int i = 0; i < EVENT_BUFFERS; i++)
		event_buf[i] = virtio_alloc(sizeof(uint32_t), 8);
	if (!tx_hdr || !tx_payload || !rx_buf[RX_BUFFERS - 1] || !event_buf[EVENT_BUFFERS - 1] ||
	    virtio_setup(&dev, VIRTIO_BIT(VIRTIO_VSOCK_F_STREAM)) < 0 || virtq_init(&dev, &rxq, RX_QUEUE, 64) < 0 ||
	    virtq_init(&dev, &txq, TX_QUEUE, 64) < 0 || virtq_init(&dev, &evq, EVENT_QUEUE, 8) < 0) {
		printf("virtio_vsock: set-up failed: %s\n", virtio_error());
		return EXIT_SETUP;
	}
	guest_cid = virtio_cfg64(&dev, VSOCK_CFG_GUEST_CID);
	for (int i = 0; i < RX_BUFFERS; i++)
		post_rx(i);
	for (int i = 0; i < EVENT_BUFFERS; i++) {	/* §5.10.6.1: the event queue is filled too */
		struct virtq_buf b = { virt_to_phys(event_buf[i]), sizeof(uint32_t) };
		virtq_add(&evq, NULL, 0, &b, 1);
	}
	virtio_driver_ok(&dev);
	virtq_kick(&rxq);
	virtq_kick(&evq);
	printf("virtio_vsock: guest cid %lu\n", guest_cid);

	int rc = 0;
	if (cmdline_has("vsock_connect"))
		rc = do_connect((uint32_t)cmdline_u64("vsock_connect", 0));
	if (!rc && cmdline_has("vsock_listen"))
		rc = do_listen((uint32_t)cmdline_u64("vsock_listen", 0));
	printf("virtio_vsock: done (%d)\n", rc);
	return rc;
}
