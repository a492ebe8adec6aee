/*
 * virtio_rng: drives the first virtio-rng device (virtio 1.2 §5.4) from
 * ring 3 and checks what comes back, as TAP; exits with the number of
 * failures.
 *
 * Command line words (all optional):
 *   rng_bytes=N   bytes asked for per request (default 64, at most 4096)
 *
 * §5.4.6.1 lets the device return fewer bytes than asked; the checks use
 * the used length the device reports.
 */
#include "tap.h"
#include "tiny.h"
#include "virtio.h"

const char tiny_guest_name[] = "virtio_rng";

#define PLAN 8
#define MAX_BYTES 4096
#define TIMEOUT_MS 5000

static struct virtio_dev dev;
static struct virtq vq;

static bool all_equal(const uint8_t *p, uint32_t n)
{
	for (uint32_t i = 1; i < n; i++)
		if (p[i] != p[0])
			return false;
	return true;
}

static bool all_zero(const uint8_t *p, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		if (p[i])
			return false;
	return true;
}

/* One request for n bytes into dst, in `parts` equal descriptors; returns the used length or -1. */
static int64_t request(uint8_t *dst, uint32_t n, int parts)
{
	struct virtq_buf in[2];
	uint32_t first = parts == 2 ? n / 2 : n;
	in[0] = (struct virtq_buf){ virt_to_phys(dst), first };
	in[1] = (struct virtq_buf){ virt_to_phys(dst + first), n - first };
	uint32_t len = 0;
	if (virtq_call(&vq, NULL, 0, in, parts, &len, TIMEOUT_MS) < 0)
		return -1;
	return len;
}

int main(void)
{
	tap_plan(PLAN);
	uint32_t n = (uint32_t)cmdline_u64("rng_bytes", 64);
	if (n < 16 || n > MAX_BYTES)
		n = 64;

	if (!virtio_find(VIRTIO_ID_RNG, 0, &dev)) {
		tap_result(false, "virtio-rng device found", "%s", virtio_error());
		printf("# cmdline: %s\n", cmdline());
		return tap_done();
	}
	tap_result(true, "virtio-rng device found", NULL);
	printf("# virtio_rng: device at %#lx (found by %s, irq %u)\n", dev.base, dev.found_by, dev.irq);

	static const char setup_name[] = "modern device set up, queue ready, DRIVER_OK";
	if (virtio_setup(&dev, 0) < 0 || virtq_init(&dev, &vq, 0, 8) < 0) {
		tap_result(false, setup_name, "%s", virtio_error());
		return tap_done();
	}
	virtio_driver_ok(&dev);
	uint32_t st = virtio_status(&dev);
	if (!tap_result((st & VIRTIO_STATUS_DRIVER_OK) && !(st & VIRTIO_STATUS_NEEDS_RESET), setup_name,
			"negotiated %#lx, queue size %u, status %#x", dev.features, vq.size, st))
		return tap_done();

	uint8_t *a = virtio_alloc(MAX_BYTES, 64), *b = virtio_alloc(MAX_BYTES, 64), *c = virtio_alloc(MAX_BYTES, 64);
	if (!a || !b || !c) {
		tap_result(false, "buffers allocated", "%s", virtio_error());
		return tap_done();
	}
	int64_t la = request(a, n, 1);
	if (!tap_result(la > 0 && la <= n, "a request returns between 1 and the asked bytes", "asked %u, got %ld%s%s", n,
			la, la < 0 ? ": " : "", la < 0 ? virtio_error() : ""))
		return tap_done();
	uint32_t got = (uint32_t)la;
	tap_result(!all_zero(a, got), "the bytes are not all zero", NULL);
	tap_result(got < 2 || !all_equal(a, got), "the bytes are not all equal", "first byte %#x", a[0]);

	int64_t lb = request(b, n, 1);
	uint32_t common = lb > 0 && (uint32_t)lb < got ? (uint32_t)lb : got;
	tap_result(lb > 0 && memcmp(a, b, common) != 0, "a second request returns different bytes", "got %ld", lb);

	memset(c, 0, n);
	int64_t lc = request(c, n, 2);
	tap_result(lc > 0 && lc <= n && !all_zero(c, (uint32_t)(lc > 0 ? lc : 0)),
		   "a request split over two descriptors is filled", "asked %u, got %ld", n, lc);

	st = virtio_status(&dev);
	tap_result((st & VIRTIO_STATUS_DRIVER_OK) && !(st & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)),
		   "device status is DRIVER_OK without NEEDS_RESET", "status %#x, %lu notifications", st, vq.kicks);
	virtio_reset(&dev);
	return tap_done();
}
