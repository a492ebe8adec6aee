/*
 * virtio_blk: drives the first virtio-blk device (virtio 1.2 §5.2) from
 * ring 3 and checks it end to end, as TAP; exits with the number of failures.
 *
 * Command line words (all optional):
 *   blk_capacity=N        expected capacity in 512-byte sectors
 *   blk_crc=H             CRC-32 (zlib's, hex) of the first blk_crc_sectors sectors
 *   blk_crc_sectors=N     how many sectors blk_crc covers (default 8)
 *   blk_serial=S          expected GET_ID string
 *   blk_ro                the disk is read-only: expect VIRTIO_BLK_F_RO and writes to fail with IOERR
 *   blk_write_sector=N    where the write test writes (default: 8 sectors before the end)
 *   blk_write_sectors=N   how much it writes (default 8, at most 128)
 *   blk_seed=H            seed of the written pattern (hex, default 1); build.py's
 *                         blk_pattern(seed, n) is the host-side twin
 *
 * In read-write mode the pattern is written with its data split over two
 * descriptors, flushed and read back; the host then finds it in the image
 * file.  In read-only mode the same write must come back IOERR and the
 * sectors must read as before.
 */
#include "tap.h"
#include "tiny.h"
#include "virtio.h"

const char tiny_guest_name[] = "virtio_blk";

/* §5.2.3 feature bits, §5.2.4 configuration layout, §5.2.6 requests. */
#define VIRTIO_BLK_F_SEG_MAX    2
#define VIRTIO_BLK_F_RO         5
#define VIRTIO_BLK_F_BLK_SIZE   6
#define VIRTIO_BLK_F_FLUSH      9
#define VIRTIO_BLK_CFG_CAPACITY 0
#define VIRTIO_BLK_T_IN         0
#define VIRTIO_BLK_T_OUT        1
#define VIRTIO_BLK_T_FLUSH      4
#define VIRTIO_BLK_T_GET_ID     8
#define VIRTIO_BLK_T_UNDEFINED  0x40	/* no such request type */
#define VIRTIO_BLK_S_OK         0
#define VIRTIO_BLK_S_IOERR      1
#define VIRTIO_BLK_S_UNSUPP     2
#define VIRTIO_BLK_ID_BYTES     20
#define SECTOR                  512

#define PLAN 15
#define MAX_XFER_SECTORS 128	/* 64 KiB per request */
#define TIMEOUT_MS 5000
/* Written into the status byte before each request: the device must overwrite it. */
#define STATUS_UNTOUCHED 0xee
/* What blk_do returns when the request never completed. */
#define STATUS_NO_COMPLETION 0x100

struct virtio_blk_req {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

static struct virtio_dev dev;
static struct virtq vq;
static volatile struct virtio_blk_req *hdr;
static volatile uint8_t *status;
static uint8_t *buf, *buf2, *pat;
static uint32_t last_used_len;

static uint64_t wanted_features(void)
{
	return VIRTIO_BIT(VIRTIO_BLK_F_SEG_MAX) | VIRTIO_BIT(VIRTIO_BLK_F_RO) | VIRTIO_BIT(VIRTIO_BLK_F_BLK_SIZE) |
	       VIRTIO_BIT(VIRTIO_BLK_F_FLUSH);
}

/* Feature negotiation and the request queue; false (with the reason in virtio_error()) on failure. */
static bool bring_up(void)
{
	if (virtio_setup(&dev, wanted_features()) < 0)
		return false;
	if (virtq_init(&dev, &vq, 0, 128) < 0) {
		virtio_fail(&dev);
		return false;
	}
	virtio_driver_ok(&dev);
	return true;
}

/*
 * One request: header, then `data` (device-readable for OUT, writable
 * otherwise), then the status byte.  Returns the status byte, or
 * STATUS_NO_COMPLETION.
 */
static unsigned blk_do(uint32_t type, uint64_t sector, const struct virtq_buf *data, int n_data, bool data_in)
{
	hdr->type = type;
	hdr->reserved = 0;
	hdr->sector = sector;
	*status = STATUS_UNTOUCHED;
	struct virtq_buf out[4], in[4];
	int n_out = 0, n_in = 0;
	out[n_out++] = (struct virtq_buf){ virt_to_phys(hdr), sizeof(*hdr) };
	for (int i = 0; i < n_data; i++) {
		if (data_in)
			in[n_in++] = data[i];
		else
			out[n_out++] = data[i];
	}
	in[n_in++] = (struct virtq_buf){ virt_to_phys(status), 1 };
	last_used_len = 0;
	if (virtq_call(&vq, out, n_out, in, n_in, &last_used_len, TIMEOUT_MS) < 0)
		return STATUS_NO_COMPLETION;
	return *status;
}

static unsigned blk_read(uint64_t sector, void *dst, uint32_t nsect)
{
	struct virtq_buf d = { virt_to_phys(dst), nsect * SECTOR };
	return blk_do(VIRTIO_BLK_T_IN, sector, &d, 1, true);
}

static const char *status_name(unsigned s)
{
	switch (s) {
	case VIRTIO_BLK_S_OK: return "OK";
	case VIRTIO_BLK_S_IOERR: return "IOERR";
	case VIRTIO_BLK_S_UNSUPP: return "UNSUPP";
	case STATUS_UNTOUCHED: return "status byte not written";
	case STATUS_NO_COMPLETION: return virtio_error();
	default: return "unknown status";
	}
}

/* The write pattern: xorshift32 words from `seed` (build.py's blk_pattern() is the twin). */
static void make_pattern(uint32_t seed, uint8_t *dst, size_t len)
{
	uint32_t x = seed ? seed : 0x9e3779b9u;
	for (size_t i = 0; i + 4 <= len; i += 4) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		memcpy(dst + i, &x, 4);
	}
}

/* CRC-32 of sectors [0, n) read in MAX_XFER_SECTORS chunks into buf; false if a read failed. */
static bool crc_of_sectors(uint64_t n, uint32_t *crc, unsigned *st)
{
	uint32_t c = 0;
	for (uint64_t s = 0; s < n; s += MAX_XFER_SECTORS) {
		uint32_t k = n - s < MAX_XFER_SECTORS ? (uint32_t)(n - s) : MAX_XFER_SECTORS;
		*st = blk_read(s, buf, k);
		if (*st != VIRTIO_BLK_S_OK)
			return false;
		c = crc32(c, buf, (size_t)k * SECTOR);
	}
	*crc = c;
	return true;
}

int main(void)
{
	tap_plan(PLAN);
	bool ro = cmdline_has("blk_ro");
	uint64_t crc_sectors = cmdline_u64("blk_crc_sectors", 8);
	uint64_t write_sectors = cmdline_u64("blk_write_sectors", 8);
	if (write_sectors == 0 || write_sectors > MAX_XFER_SECTORS)
		write_sectors = 8;
	uint32_t seed = (uint32_t)cmdline_hex("blk_seed", 1);

	/* 1: discovery */
	if (!virtio_find(VIRTIO_ID_BLOCK, 0, &dev)) {
		tap_result(false, "virtio-blk device found", "%s", virtio_error());
		printf("# cmdline: %s\n", cmdline());
		return tap_done();
	}
	tap_result(true, "virtio-blk device found", NULL);
	printf("# virtio_blk: device at %#lx (found by %s, irq %u, vendor %#x)\n", dev.base, dev.found_by, dev.irq,
	       dev.vendor_id);

	/* 2-3: handshake, features, queue */
	hdr = virtio_alloc(sizeof(*hdr), 16);
	status = virtio_alloc(1, 1);
	buf = virtio_alloc(MAX_XFER_SECTORS * SECTOR, 4096);
	buf2 = virtio_alloc(MAX_XFER_SECTORS * SECTOR, 4096);
	pat = virtio_alloc(MAX_XFER_SECTORS * SECTOR, 4096);
	if (!hdr || !status || !buf || !buf2 || !pat) {
		tap_result(false, "buffers allocated", "%s", virtio_error());
		return tap_done();
	}
	static const char setup_name[] = "modern device: VERSION_1 negotiated, FEATURES_OK kept";
	if (virtio_setup(&dev, wanted_features()) < 0) {
		tap_result(false, setup_name, "%s", virtio_error());
		return tap_done();
	}
	tap_result(virtio_has(&dev, VIRTIO_F_VERSION_1), setup_name, "offered %#lx, negotiated %#lx",
		   dev.device_features, dev.features);
	static const char queue_name[] = "request queue set up, DRIVER_OK";
	if (virtq_init(&dev, &vq, 0, 128) < 0) {
		tap_result(false, queue_name, "%s", virtio_error());
		return tap_done();
	}
	virtio_driver_ok(&dev);
	uint32_t st = virtio_status(&dev);
	if (!tap_result((st & VIRTIO_STATUS_DRIVER_OK) && !(st & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)),
			queue_name, "queue size %u, status %#x", vq.size, st))
		return tap_done();

	/* 4: capacity */
	uint64_t capacity = virtio_cfg64(&dev, VIRTIO_BLK_CFG_CAPACITY);
	uint64_t want_cap = cmdline_u64("blk_capacity", 0);
	if (cmdline_has("blk_capacity"))
		tap_result(capacity == want_cap, "capacity matches blk_capacity", "%lu sectors, expected %lu", capacity,
			   want_cap);
	else
		tap_skip("capacity matches blk_capacity", "no blk_capacity=");

	/* 5: read-only feature */
	bool has_ro = virtio_has(&dev, VIRTIO_BLK_F_RO);
	tap_result(has_ro == ro, "VIRTIO_BLK_F_RO matches the mode", "%s, device %s", ro ? "blk_ro" : "read-write",
		   has_ro ? "read-only" : "writable");

	/* 6: content checksum */
	if (crc_sectors > capacity)
		crc_sectors = capacity;
	uint32_t crc = 0;
	unsigned rs = 0;
	bool read_ok = crc_of_sectors(crc_sectors, &crc, &rs);
	static const char crc_name[] = "crc32 of the first sectors matches blk_crc";
	if (!read_ok)
		tap_result(false, crc_name, "read status %s", status_name(rs));
	else if (!cmdline_has("blk_crc"))
		tap_skip(crc_name, "no blk_crc=");
	else {
		uint32_t want = (uint32_t)cmdline_hex("blk_crc", 0);
		tap_result(crc == want, crc_name, "%lu sectors: crc32 %08x, expected %08x", crc_sectors, crc, want);
	}

	/* 7: the same two sectors through one descriptor and through two */
	uint32_t n2 = capacity >= 2 ? 2 : 1;
	unsigned s1 = blk_read(0, buf, n2);
	uint32_t len1 = last_used_len;
	struct virtq_buf split[2] = {
		{ virt_to_phys(buf2), SECTOR },
		{ virt_to_phys(buf2 + SECTOR), (n2 - 1) * SECTOR },
	};
	memset(buf2, 0x5a, 2 * SECTOR);
	unsigned s2 = blk_do(VIRTIO_BLK_T_IN, 0, split, n2 == 2 ? 2 : 1, true);
	uint32_t len2 = last_used_len;
	tap_result(s1 == VIRTIO_BLK_S_OK && s2 == VIRTIO_BLK_S_OK && !memcmp(buf, buf2, n2 * SECTOR) &&
			   len1 == n2 * SECTOR + 1 && len2 == len1,
		   "a read split over two descriptors matches", "status %s/%s, used len %u/%u", status_name(s1),
		   status_name(s2), len1, len2);

	/* 8: GET_ID */
	char id[VIRTIO_BLK_ID_BYTES + 1];
	memset(buf, 0, VIRTIO_BLK_ID_BYTES);
	struct virtq_buf idb = { virt_to_phys(buf), VIRTIO_BLK_ID_BYTES };
	unsigned gs = blk_do(VIRTIO_BLK_T_GET_ID, 0, &idb, 1, true);
	memcpy(id, buf, VIRTIO_BLK_ID_BYTES);
	id[VIRTIO_BLK_ID_BYTES] = 0;
	char want_id[VIRTIO_BLK_ID_BYTES + 1];
	if (cmdline_get("blk_serial", want_id, sizeof(want_id)))
		tap_result(gs == VIRTIO_BLK_S_OK && !strcmp(id, want_id), "GET_ID returns blk_serial",
			   "status %s, id \"%s\", expected \"%s\"", status_name(gs), id, want_id);
	else if (gs != VIRTIO_BLK_S_OK)
		tap_result(false, "GET_ID returns blk_serial", "status %s", status_name(gs));
	else
		tap_skip("GET_ID returns blk_serial", "no blk_serial=");

	/* 9: past the end */
	unsigned es = blk_read(capacity, buf, 1);
	tap_result(es == VIRTIO_BLK_S_IOERR, "a read past the end returns IOERR", "sector %lu: status %s", capacity,
		   status_name(es));

	/* 10: an unknown request type */
	unsigned us = blk_do(VIRTIO_BLK_T_UNDEFINED, 0, NULL, 0, true);
	tap_result(us == VIRTIO_BLK_S_UNSUPP, "an unknown request type returns UNSUPP", "type %#x: status %s",
		   VIRTIO_BLK_T_UNDEFINED, status_name(us));

	/* 11-13: write, flush, read back */
	uint64_t wsect = cmdline_u64("blk_write_sector", capacity > write_sectors ? capacity - write_sectors : 0);
	uint32_t wbytes = (uint32_t)write_sectors * SECTOR;
	unsigned bs = blk_read(wsect, buf2, (uint32_t)write_sectors);	/* what was there before */
	make_pattern(seed, pat, wbytes);
	struct virtq_buf wd[2] = { { virt_to_phys(pat), SECTOR }, { virt_to_phys(pat + SECTOR), wbytes - SECTOR } };
	unsigned ws = blk_do(VIRTIO_BLK_T_OUT, wsect, wd, wbytes > SECTOR ? 2 : 1, false);
	if (ro)
		tap_result(ws == VIRTIO_BLK_S_IOERR && last_used_len == 1, "a write to a read-only disk returns IOERR",
			   "sector %lu: status %s, used len %u", wsect, status_name(ws), last_used_len);
	else
		tap_result(ws == VIRTIO_BLK_S_OK && last_used_len == 1, "write a pattern",
			   "%u bytes at sector %lu, seed %#x: status %s, used len %u", wbytes, wsect, seed,
			   status_name(ws), last_used_len);
	if (virtio_has(&dev, VIRTIO_BLK_F_FLUSH)) {
		unsigned fs = blk_do(VIRTIO_BLK_T_FLUSH, 0, NULL, 0, true);
		tap_result(fs == VIRTIO_BLK_S_OK, "FLUSH", "status %s", status_name(fs));
	} else {
		tap_skip("FLUSH", "VIRTIO_BLK_F_FLUSH not offered");
	}
	memset(buf, 0, wbytes);
	unsigned rb = blk_read(wsect, buf, (uint32_t)write_sectors);
	if (ro)
		tap_result(bs == VIRTIO_BLK_S_OK && rb == VIRTIO_BLK_S_OK && !memcmp(buf, buf2, wbytes),
			   "the sectors read as before", "status %s/%s", status_name(bs), status_name(rb));
	else
		tap_result(rb == VIRTIO_BLK_S_OK && !memcmp(buf, pat, wbytes), "the pattern reads back", "status %s",
			   status_name(rb));

	/* 14: reset, initialise again, read again */
	static const char reset_name[] = "reset, set up again, the same sectors read the same";
	uint32_t crc2 = 0;
	unsigned rs2 = 0;
	if (!virtio_reset(&dev) || virtio_status(&dev) != 0)
		tap_result(false, reset_name, "reset: %s", virtio_error());
	else if (!bring_up())
		tap_result(false, reset_name, "set-up: %s", virtio_error());
	else if (!crc_of_sectors(crc_sectors, &crc2, &rs2))
		tap_result(false, reset_name, "read status %s", status_name(rs2));
	else
		tap_result(read_ok && crc2 == crc, reset_name, "crc32 %08x then %08x", crc, crc2);

	/* 15: nothing went wrong on the device's side */
	st = virtio_status(&dev);
	tap_result((st & VIRTIO_STATUS_DRIVER_OK) && !(st & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)),
		   "device status is DRIVER_OK without NEEDS_RESET", "status %#x, %lu notifications (%lu suppressed)",
		   st, vq.kicks, vq.kicks_suppressed);
	return tap_done();
}
