/*
 * virtio_net: a UDP echo service on the first virtio-net device (virtio 1.2
 * §5.1: receiveq1 = 0, transmitq1 = 1, the 12-byte virtio_net_hdr_v1 on
 * every packet), from ring 3.
 *
 * It sends one UDP datagram `hello from the guest` from GUEST_IP:4000 to
 * HOST_IP:PORT, then answers every UDP datagram addressed to GUEST_IP with
 * `echo: <payload>` to its sender (MAC, address and port swapped).  The
 * payload `exit` ends the guest with exit code 0 (after its echo).  Other
 * frames are counted and ignored.  No ARP: the host MAC comes from the
 * command line and the host is expected to know the guest's.
 *
 * Command line words (defaults match tests/integration/netns.py's TapNetwork):
 *   net_host_mac=02:00:00:00:00:01  net_host_ip=10.0.2.1  net_guest_ip=10.0.2.2
 *   net_port=5000                   net_timeout_ms=30000
 * The guest's MAC is the device's (VIRTIO_NET_F_MAC).  Exit codes 0x70.. are
 * this guest's own failures.
 */
#include "tiny.h"
#include "virtio.h"

const char tiny_guest_name[] = "virtio_net";

/* §5.1.3 feature bits, §5.1.4 configuration, §5.1.6 header. */
#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_STATUS 16
#define VIRTIO_NET_CFG_MAC 0
#define VIRTIO_NET_CFG_STATUS 6
#define VIRTIO_NET_S_LINK_UP 1
#define VIRTIO_NET_HDR_SIZE 12
#define RX_QUEUE 0
#define TX_QUEUE 1
#define RX_BUFFERS 16
#define RX_SIZE (VIRTIO_NET_HDR_SIZE + 1514)	/* §5.1.6.3.1: at least 1526 bytes without MRG_RXBUF */
#define TX_SIZE RX_SIZE
#define GUEST_PORT 4000
#define TIMEOUT_MS 5000

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define IP_HLEN 20
#define IPPROTO_UDP 17
#define UDP_HLEN 8
#define HEADERS (ETH_HLEN + IP_HLEN + UDP_HLEN)

#define EXIT_NO_DEVICE 0x70
#define EXIT_SETUP 0x71
#define EXIT_TX 0x72
#define EXIT_RX 0x73
#define EXIT_TIMEOUT 0x74

static struct virtio_dev dev;
static struct virtq rxq, txq;
static uint8_t *rx_buf[RX_BUFFERS];
static int buf_of_head[32];
static uint8_t *tx_buf;
static uint8_t guest_mac[6], host_mac[6];
static uint32_t guest_ip, host_ip;	/* host byte order */

/* The value of `key`, else `dflt`, into text[32]. */
static void value_of(const char *key, const char *dflt, char text[32])
{
	if (!cmdline_get(key, text, 32)) {
		size_t n = strnlen(dflt, 31);
		memcpy(text, dflt, n);
		text[n] = 0;
	}
}

static bool parse_mac(const char *key, const char *dflt, uint8_t mac[6])
{
	char text[32];
	value_of(key, dflt, text);
	const char *p = text;
	for (int i = 0; i < 6; i++) {
		unsigned v = 0, digits = 0;
		for (; digits < 2; digits++, p++) {
			char c = *p;
			unsigned d = c >= '0' && c <= '9' ? (unsigned)(c - '0')
				   : c >= 'a' && c <= 'f' ? (unsigned)(c - 'a' + 10)
				   : c >= 'A' && c <= 'F' ? (unsigned)(c - 'A' + 10) : 16;
			if (d == 16)
				return false;
			v = v * 16 + d;
		}
		mac[i] = (uint8_t)v;
		if (i < 5 && *p++ != ':')
			return false;
	}
	return *p == 0;
}

static bool parse_ip(const char *key, const char *dflt, uint32_t *ip)
{
	char text[32];
	value_of(key, dflt, text);
	uint32_t v = 0;
	const char *p = text;
	for (int i = 0; i < 4; i++) {
		unsigned part = 0, digits = 0;
		while (*p >= '0' && *p <= '9' && digits < 3)
			part = part * 10 + (unsigned)(*p++ - '0'), digits++;
		if (!digits || part > 255 || (i < 3 && *p++ != '.'))
			return false;
		v = v << 8 | part;
	}
	*ip = v;
	return *p == 0;
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8), p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)), put16(p + 2, (uint16_t)v); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)get16(p) << 16 | get16(p + 2); }

/* RFC 1071: the one's-complement sum of 16-bit words, complemented. */
static uint16_t inet_checksum(const uint8_t *p, size_t n)
{
	uint32_t sum = 0;
	for (size_t i = 0; i + 1 < n; i += 2)
		sum += get16(p + i);
	if (n & 1)
		sum += (uint32_t)p[n - 1] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

static bool post_rx(int i)
{
	struct virtq_buf b = { virt_to_phys(rx_buf[i]), RX_SIZE };
	int head = virtq_add(&rxq, NULL, 0, &b, 1);
	if (head < 0 || head >= (int)ARRAY_SIZE(buf_of_head))
		return false;
	buf_of_head[head] = i;
	return true;
}

/* One UDP datagram from GUEST_IP:sport to dst_ip:dport (MAC dst_mac), checksum 0 (none, IPv4). */
static bool send_udp(const uint8_t dst_mac[6], uint32_t dst_ip, uint16_t sport, uint16_t dport, const char *a,
		     size_t alen, const uint8_t *b, size_t blen)
{
	static uint16_t ip_id;
	size_t payload = alen + blen;
	if (HEADERS + payload > 1514)
		payload = 1514 - HEADERS, blen = payload - alen;
	memset(tx_buf, 0, VIRTIO_NET_HDR_SIZE);	/* no offloads: flags 0, gso_type NONE */
	uint8_t *eth = tx_buf + VIRTIO_NET_HDR_SIZE, *ip = eth + ETH_HLEN, *udp = ip + IP_HLEN;
	memcpy(eth, dst_mac, 6);
	memcpy(eth + 6, guest_mac, 6);
	put16(eth + 12, ETH_P_IP);
	memset(ip, 0, IP_HLEN);
	ip[0] = 0x45;
	put16(ip + 2, (uint16_t)(IP_HLEN + UDP_HLEN + payload));
	put16(ip + 4, ++ip_id);
	ip[8] = 64;
	ip[9] = IPPROTO_UDP;
	put32(ip + 12, guest_ip);
	put32(ip + 16, dst_ip);
	put16(ip + 10, inet_checksum(ip, IP_HLEN));
	put16(udp, sport);
	put16(udp + 2, dport);
	put16(udp + 4, (uint16_t)(UDP_HLEN + payload));
	put16(udp + 6, 0);
	memcpy(udp + UDP_HLEN, a, alen);
	memcpy(udp + UDP_HLEN + alen, b, blen);
	struct virtq_buf out[2] = {
		{ virt_to_phys(tx_buf), VIRTIO_NET_HDR_SIZE },	/* header and frame in two descriptors */
		{ virt_to_phys(eth), (uint32_t)(HEADERS + payload) },
	};
	uint32_t used;
	return virtq_call(&txq, out, 2, NULL, 0, &used, TIMEOUT_MS) >= 0;
}

int main(void)
{
	uint32_t timeout_ms = (uint32_t)cmdline_u64("net_timeout_ms", 30000);
	uint16_t host_port = (uint16_t)cmdline_u64("net_port", 5000);
	if (!parse_mac("net_host_mac", "02:00:00:00:00:01", host_mac) ||
	    !parse_ip("net_host_ip", "10.0.2.1", &host_ip) || !parse_ip("net_guest_ip", "10.0.2.2", &guest_ip)) {
		printf("virtio_net: cannot parse net_host_mac, net_host_ip or net_guest_ip\n");
		return EXIT_BAD_CMDLINE;
	}
	if (!virtio_find(VIRTIO_ID_NET, 0, &dev)) {
		printf("virtio_net: %s\n", virtio_error());
		return EXIT_NO_DEVICE;
	}
	printf("virtio_net: device at %#lx (found by %s)\n", dev.base, dev.found_by);
	tx_buf = virtio_alloc(TX_SIZE, 64);
	for (int i = 0; i < RX_BUFFERS; i++)
		rx_buf[i] = virtio_alloc(RX_SIZE, 64);
	if (!tx_buf || !rx_buf[RX_BUFFERS - 1] ||
	    virtio_setup(&dev, VIRTIO_BIT(VIRTIO_NET_F_MAC) | VIRTIO_BIT(VIRTIO_NET_F_STATUS)) < 0 ||
	    virtq_init(&dev, &rxq, RX_QUEUE, 32) < 0 || virtq_init(&dev, &txq, TX_QUEUE, 32) < 0) {
		printf("virtio_net: set-up failed: %s\n", virtio_error());
		return EXIT_SETUP;
	}
	if (!virtio_has(&dev, VIRTIO_NET_F_MAC)) {
		printf("virtio_net: the device offers no MAC address\n");
		virtio_fail(&dev);
		return EXIT_SETUP;
	}
	for (int i = 0; i < 6; i++)
		guest_mac[i] = virtio_cfg8(&dev, VIRTIO_NET_CFG_MAC + (uint32_t)i);
	for (int i = 0; i < RX_BUFFERS; i++)
		post_rx(i);
	virtio_driver_ok(&dev);
	virtq_kick(&rxq);
	uint16_t link = virtio_has(&dev, VIRTIO_NET_F_STATUS) ? virtio_cfg16(&dev, VIRTIO_NET_CFG_STATUS) : 1;
	printf("virtio_net: mac %02x:%02x:%02x:%02x:%02x:%02x, link %s\n", guest_mac[0], guest_mac[1], guest_mac[2],
	       guest_mac[3], guest_mac[4], guest_mac[5], link & VIRTIO_NET_S_LINK_UP ? "up" : "down");

	static const char hello[] = "hello from the guest";
	if (!send_udp(host_mac, host_ip, GUEST_PORT, host_port, hello, sizeof(hello) - 1, NULL, 0)) {
		printf("virtio_net: transmit: %s\n", virtio_error());
		return EXIT_TX;
	}
	printf("virtio_net: sent %zu bytes to port %u\n", sizeof(hello) - 1, host_port);

	uint64_t echoed = 0, ignored = 0;
	for (;;) {
		uint32_t got;
		int head = virtq_wait(&rxq, &got, timeout_ms);
		if (head == -1) {
			printf("virtio_net: nothing received for %u ms (%lu echoed, %lu ignored)\n", timeout_ms, echoed,
			       ignored);
			return EXIT_TIMEOUT;
		}
		if (head < 0 || got > RX_SIZE) {
			printf("virtio_net: receive queue: %s (used length %u)\n", head < 0 ? virtio_error() : "bad", got);
			return EXIT_RX;
		}
		int i = buf_of_head[head];
		const uint8_t *eth = rx_buf[i] + VIRTIO_NET_HDR_SIZE, *ip = eth + ETH_HLEN, *udp = ip + IP_HLEN;
		size_t frame = got >= VIRTIO_NET_HDR_SIZE ? got - VIRTIO_NET_HDR_SIZE : 0;
		bool ours = frame >= HEADERS && get16(eth + 12) == ETH_P_IP && ip[0] == 0x45 && ip[9] == IPPROTO_UDP &&
			    get32(ip + 16) == guest_ip && get16(ip + 2) <= frame - ETH_HLEN &&
			    get16(udp + 4) >= UDP_HLEN && get16(udp + 4) <= get16(ip + 2) - IP_HLEN;
		if (!ours) {
			ignored++;
		} else {
			size_t n = get16(udp + 4) - UDP_HLEN;
			const uint8_t *data = udp + UDP_HLEN;
			uint8_t peer_mac[6];
			memcpy(peer_mac, eth + 6, 6);
			uint32_t peer_ip = get32(ip + 12);
			uint16_t peer_port = get16(udp), our_port = get16(udp + 2);
			bool last = n == 4 && !memcmp(data, "exit", 4);
			if (!send_udp(peer_mac, peer_ip, our_port, peer_port, "echo: ", 6, data, n)) {
				printf("virtio_net: echo: %s\n", virtio_error());
				return EXIT_TX;
			}
			echoed++;
			printf("virtio_net: echoed %zu bytes to port %u\n", n, peer_port);
			if (last) {
				printf("virtio_net: %lu echoed, %lu other frames ignored\n", echoed, ignored);
				return 0;
			}
		}
		post_rx(i);
		virtq_kick(&rxq);
	}
}
