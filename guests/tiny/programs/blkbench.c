/*
 * blkbench: 4 KiB virtio-blk reads and writes from ring 3, sequential and
 * random, with up to `depth` requests in flight, for timing from the host.
 *
 * Command line words (all optional):
 *   ops=N        requests per phase (default 4096)
 *   depth=N      requests in flight (default 16, at most 64)
 *   phases=LIST  comma-separated, from seqread,randread,seqwrite,randwrite (default: all four)
 *   seed=H       random-offset seed (hex, default 1)
 *   watch        start one AP (the VM needs 2 vCPUs) that reads used.idx in a loop
 *                while the phases run and counts every time it moved backwards: the
 *                device must update the index with one store (§2.7.8), so another
 *                CPU never sees a torn or intermediate value (keep the phases under
 *                32768 completions in all, so that a step back cannot be a wrap)
 *
 * Each phase is bracketed by a serial line `blkbench: begin <phase>` and
 * `blkbench: end <phase>` and by BENCH_MARK_BEGIN/END writes to the
 * boot-timer port, so the host can time it on any VMM; then comes one line
 * `blkbench: <phase> ops=N bytes=B errors=E depth=D`.  Offsets cover the
 * whole disk (4 KiB aligned; the sequential phases wrap around).  The guest
 * exits with 0 when every request returned OK, 1 otherwise (or when the
 * watcher saw a bad index), 2 when there is no usable device.
 */
#include "tiny.h"
#include "virtio.h"

const char tiny_guest_name[] = "blkbench";

#define VIRTIO_BLK_F_FLUSH      9
#define VIRTIO_BLK_CFG_CAPACITY 0
#define VIRTIO_BLK_T_IN         0
#define VIRTIO_BLK_T_OUT        1
#define VIRTIO_BLK_S_OK         0
#define SECTOR                  512
#define BLOCK                   4096
#define MAX_DEPTH               64
#define TIMEOUT_MS              10000

struct virtio_blk_req {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

/* One in-flight slot: its header, data block and status byte. */
struct slot {
	struct virtio_blk_req *hdr;
	uint8_t *data;
	volatile uint8_t *status;
};

static struct virtio_dev dev;
static struct virtq vq;
static struct slot slots[MAX_DEPTH];
static int slot_of_head[1024];
static uint64_t nblocks, rng;

/* The used.idx watcher on CPU 1 (`watch`). */
enum { WATCH_OFF, WATCH_STARTING, WATCH_RUNNING, WATCH_STOP, WATCH_DONE };
static volatile uint32_t watch_state;
static volatile uint64_t watch_reads, watch_bad;

void ap_main(int cpu)
{
	if (cpu != 1 || watch_state != WATCH_STARTING)
		return;
	uint16_t last = vq.used->idx;
	uint64_t reads = 0, bad = 0;
	watch_state = WATCH_RUNNING;
	while (watch_state == WATCH_RUNNING) {
		uint16_t idx = vq.used->idx;
		uint16_t back = (uint16_t)(last - idx);
		if (back && back < 0x8000)
			bad++;
		last = idx;
		reads++;
	}
	watch_reads = reads;
	watch_bad = bad;
	__atomic_store_n(&watch_state, WATCH_DONE, __ATOMIC_RELEASE);
}

static uint64_t xorshift64(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static bool submit(int s, uint32_t type, uint64_t block)
{
	struct slot *sl = &slots[s];
	sl->hdr->type = type;
	sl->hdr->reserved = 0;
	sl->hdr->sector = block * (BLOCK / SECTOR);
	*sl->status = 0xff;
	struct virtq_buf hdr = { virt_to_phys(sl->hdr), sizeof(*sl->hdr) };
	struct virtq_buf data = { virt_to_phys(sl->data), BLOCK };
	struct virtq_buf st = { virt_to_phys(sl->status), 1 };
	int head;
	if (type == VIRTIO_BLK_T_OUT) {
		struct virtq_buf out[2] = { hdr, data };
		head = virtq_add(&vq, out, 2, &st, 1);
	} else {
		struct virtq_buf in[2] = { data, st };
		head = virtq_add(&vq, &hdr, 1, in, 2);
	}
	if (head < 0 || head >= (int)ARRAY_SIZE(slot_of_head))
		return false;
	slot_of_head[head] = s;
	return true;
}

/* Runs one phase; returns the number of requests that did not come back OK (or -1: the queue broke). */
static int64_t run_phase(uint32_t type, bool random, uint64_t ops, int depth)
{
	uint64_t next_block = 0, submitted = 0, completed = 0;
	int64_t errors = 0;
	int first = depth < (int64_t)ops ? depth : (int)ops;
	for (int s = 0; s < first; s++) {
		uint64_t b = random ? xorshift64() % nblocks : next_block++ % nblocks;
		if (!submit(s, type, b))
			return -1;
		submitted++;
	}
	virtq_kick(&vq);
	uint64_t deadline = rdtsc() + (uint64_t)TIMEOUT_MS * 3000000ull;
	while (completed < ops) {
		bool added = false;
		uint32_t len;
		int head;
		while ((head = virtq_poll(&vq, &len)) >= 0) {
			int s = slot_of_head[head];
			if (*slots[s].status != VIRTIO_BLK_S_OK)
				errors++;
			completed++;
			if (submitted < ops) {
				uint64_t b = random ? xorshift64() % nblocks : next_block++ % nblocks;
				if (!submit(s, type, b))
					return -1;
				submitted++;
				added = true;
			}
			deadline = rdtsc() + (uint64_t)TIMEOUT_MS * 3000000ull;
		}
		if (head == -2)
			return -1;
		if (added)
			virtq_kick(&vq);
		else if (rdtsc() > deadline)
			return -1;
		else
			cpu_relax();
	}
	return errors;
}

static const struct {
	const char *name;
	uint32_t type;
	bool random;
} PHASES[] = {
	{ "seqread", VIRTIO_BLK_T_IN, false },
	{ "randread", VIRTIO_BLK_T_IN, true },
	{ "seqwrite", VIRTIO_BLK_T_OUT, false },
	{ "randwrite", VIRTIO_BLK_T_OUT, true },
};

/* Whether `name` is one of the comma-separated words of `list`. */
static bool in_list(const char *list, const char *name)
{
	size_t n = strlen(name);
	for (const char *p = list; *p;) {
		const char *e = strchr(p, ',');
		size_t len = e ? (size_t)(e - p) : strlen(p);
		if (len == n && !memcmp(p, name, n))
			return true;
		if (!e)
			break;
		p = e + 1;
	}
	return false;
}

int main(void)
{
	uint64_t ops = cmdline_u64("ops", 4096);
	uint64_t depth = cmdline_u64("depth", 16);
	if (depth < 1)
		depth = 1;
	if (depth > MAX_DEPTH)
		depth = MAX_DEPTH;
	rng = cmdline_hex("seed", 1) | 1;
	char phases[128] = "seqread,randread,seqwrite,randwrite";
	cmdline_get("phases", phases, sizeof(phases));

	if (!virtio_find(VIRTIO_ID_BLOCK, 0, &dev) || virtio_setup(&dev, VIRTIO_BIT(VIRTIO_BLK_F_FLUSH)) < 0 ||
	    virtq_init(&dev, &vq, 0, 256) < 0) {
		printf("blkbench: no usable virtio-blk device: %s\n", virtio_error());
		return 2;
	}
	virtio_driver_ok(&dev);
	/* Each request takes 3 descriptors. */
	if (depth > vq.size / 3u)
		depth = vq.size / 3u;
	nblocks = virtio_cfg64(&dev, VIRTIO_BLK_CFG_CAPACITY) / (BLOCK / SECTOR);
	if (!nblocks || vq.size > ARRAY_SIZE(slot_of_head)) {
		printf("blkbench: disk of %lu 4 KiB blocks, queue of %u: nothing to do\n", nblocks, vq.size);
		return 2;
	}
	for (uint64_t s = 0; s < depth; s++) {
		slots[s].hdr = virtio_alloc(sizeof(struct virtio_blk_req), 16);
		slots[s].data = virtio_alloc(BLOCK, BLOCK);
		slots[s].status = virtio_alloc(1, 1);
		if (!slots[s].hdr || !slots[s].data || !slots[s].status) {
			printf("blkbench: %s\n", virtio_error());
			return 2;
		}
		memset(slots[s].data, (int)(0x11 * (s + 1)), BLOCK);
	}
	printf("blkbench: device at %#lx, %lu blocks of 4 KiB, queue %u, depth %lu, ops %lu\n", dev.base, nblocks,
	       vq.size, depth, ops);
	bool watch = cmdline_has("watch");
	if (watch) {
		watch_state = WATCH_STARTING;
		if (smp_boot(1, 2000) < 1) {
			printf("blkbench: watch: the second CPU did not start\n");
			return 2;
		}
		uint64_t end = rdtsc() + 2000 * 3000000ull;
		while (watch_state != WATCH_RUNNING && rdtsc() < end)
			cpu_relax();
		if (watch_state != WATCH_RUNNING) {
			printf("blkbench: watch: the watcher did not start\n");
			return 2;
		}
	}

	int failed = 0;
	for (size_t i = 0; i < ARRAY_SIZE(PHASES); i++) {
		if (!in_list(phases, PHASES[i].name))
			continue;
		printf("blkbench: begin %s\n", PHASES[i].name);
		outb(BOOT_TIMER_PORT, BENCH_MARK_BEGIN);
		int64_t errors = run_phase(PHASES[i].type, PHASES[i].random, ops, (int)depth);
		outb(BOOT_TIMER_PORT, BENCH_MARK_END);
		printf("blkbench: end %s\n", PHASES[i].name);
		if (errors < 0) {
			printf("blkbench: %s: queue failed: %s\n", PHASES[i].name, virtio_error());
			return 2;
		}
		printf("blkbench: %s ops=%lu bytes=%lu errors=%ld depth=%lu\n", PHASES[i].name, ops, ops * BLOCK,
		       errors, depth);
		failed |= errors != 0;
	}
	if (watch) {
		watch_state = WATCH_STOP;
		while (__atomic_load_n(&watch_state, __ATOMIC_ACQUIRE) != WATCH_DONE)
			cpu_relax();
		printf("blkbench: watch: %lu reads of used.idx, %lu steps back\n", watch_reads, watch_bad);
		failed |= watch_bad != 0;
	}
	printf("blkbench: done, %lu notifications, %lu suppressed\n", vq.kicks, vq.kicks_suppressed);
	return failed;
}
