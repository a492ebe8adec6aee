/*
 * The virtio-mmio driver (see include/virtio.h): discovery, the status
 * handshake and feature negotiation (§3.1.1), virtqueue set-up (§4.2.3.2),
 * chains in and used entries out (§2.7.13, §2.7.14), reset (§2.4).
 */
#include "bootparam.h"
#include "tiny.h"
#include "virtio.h"

/* Timeouts assume a TSC of at most 3 GHz, like spin_ms(): they last at least as long as asked. */
#define VIRTIO_TSC_PER_MS 3000000ull
/* Reset must complete; a device that never reads back 0 is broken (§2.4.2). */
#define VIRTIO_RESET_TIMEOUT_MS 1000

static char err[192];

static void set_error(const char *fmt, ...) PRINTF_LIKE(1, 2);
static void set_error(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(err, sizeof(err), fmt, ap);
	va_end(ap);
}

const char *virtio_error(void)
{
	return err[0] ? err : "no error";
}

/* ---- memory ---------------------------------------------------------------------- */
static uint64_t pool_next, pool_end;
static bool pool_ready;

static uint64_t align_up(uint64_t v, uint64_t a)
{
	return (v + a - 1) & ~(a - 1);
}

/*
 * The pool is the RAM from the end of the image up to the end of its memory-
 * map range (at most the MMIO hole), less what a loader placed there: QEMU
 * puts the multiboot information right after .bss, and an initrd or the
 * command line may sit anywhere.  Such a range at the start moves the start
 * past it; one further up ends the pool.
 */
static void pool_init(void)
{
	const struct { uint64_t addr, len; } taken[] = {
		{ boot.info_addr, 0x10000 },
		{ boot.initrd_addr, boot.initrd_size },
		{ boot.cmdline_addr, CMDLINE_MAX },
	};
	uint64_t start = align_up((uint64_t)_end, 4096), end = start;
	for (int i = 0; i < boot.n_mem; i++) {
		const struct mem_range *m = &boot.mem[i];
		if (m->type == E820_RAM && m->addr <= start && start < m->addr + m->size)
			end = m->addr + m->size < MMIO_GAP_START ? m->addr + m->size : MMIO_GAP_START;
	}
	for (size_t pass = 0; pass <= ARRAY_SIZE(taken); pass++)
		for (size_t i = 0; i < ARRAY_SIZE(taken); i++) {
			uint64_t a = taken[i].addr, b = taken[i].addr + taken[i].len;
			if (!a || b <= start || a >= end)
				continue;
			if (a <= start)
				start = align_up(b, 4096);
			else
				end = a;
		}
	pool_next = start;
	pool_end = end > start ? end : start;
	pool_ready = true;
}

void *virtio_alloc(size_t size, size_t align)
{
	if (!pool_ready)
		pool_init();
	if (!align || (align & (align - 1))) {
		set_error("virtio_alloc: alignment %zu is not a power of two", align);
		return NULL;
	}
	uint64_t p = align_up(pool_next, align);
	if (p < pool_next || p + size < p || p + size > pool_end) {
		set_error("virtio_alloc: no room for %zu bytes (pool %#lx..%#lx)", size, pool_next, pool_end);
		return NULL;
	}
	pool_next = p + size;
	memset((void *)(uintptr_t)p, 0, size);
	return (void *)(uintptr_t)p;
}

/* ---- discovery ------------------------------------------------------------------- */
/* memparse(): a number (0x hex or decimal) with an optional K/M/G suffix; *end after it. */
static bool parse_num(const char *s, const char **end, uint64_t *out, bool suffix)
{
	uint64_t v = 0;
	unsigned base = 10;
	const char *p = s;
	if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X'))
		base = 16, p += 2;
	const char *digits = p;
	for (;; p++) {
		unsigned d;
		char c = *p;
		if (c >= '0' && c <= '9') d = (unsigned)(c - '0');
		else if (base == 16 && c >= 'a' && c <= 'f') d = (unsigned)(c - 'a' + 10);
		else if (base == 16 && c >= 'A' && c <= 'F') d = (unsigned)(c - 'A' + 10);
		else break;
		if (v > (UINT64_MAX - d) / base)
			return false;
		v = v * base + d;
	}
	if (p == digits)
		return false;
	if (suffix) {
		unsigned shift = 0;
		switch (*p) {
		case 'k': case 'K': shift = 10; break;
		case 'm': case 'M': shift = 20; break;
		case 'g': case 'G': shift = 30; break;
		}
		if (shift) {
			if (v > (UINT64_MAX >> shift))
				return false;
			v <<= shift, p++;
		}
	}
	*out = v;
	*end = p;
	return true;
}

/* `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` (drivers/virtio/virtio_mmio.c, vm_cmdline_set). */
static int cmdline_windows(struct virtio_dev *out, int max)
{
	static const char key[] = "virtio_mmio.device=";
	const size_t klen = sizeof(key) - 1;
	int n = 0;
	const char *p = cmdline();
	while (*p) {
		while (*p == ' ' || *p == '\t')
			p++;
		const char *w = p;
		while (*p && *p != ' ' && *p != '\t')
			p++;
		if ((size_t)(p - w) <= klen || memcmp(w, key, klen))
			continue;
		const char *s = w + klen, *e;
		uint64_t size, base, irq;
		if (!parse_num(s, &e, &size, true) || *e != '@' || !parse_num(e + 1, &e, &base, true) || *e != ':' ||
		    !parse_num(e + 1, &e, &irq, false) || (e != p && *e != ':')) {
			printf("# virtio: ignoring malformed %.*s\n", (int)(p - w), w);
			continue;
		}
		if (n < max) {
			memset(&out[n], 0, sizeof(out[n]));
			out[n].base = base;
			out[n].size = size;
			out[n].irq = (uint32_t)irq;
			out[n].found_by = "cmdline";
		}
		n++;
	}
	return n < max ? n : max;
}

/* §4.2.3.1.1: MagicValue and Version first; DeviceID 0 means "no device here". */
static bool window_has_device(struct virtio_dev *d)
{
	if (d->size < VIRTIO_MMIO_CONFIG || !addr_ok(d->base, VIRTIO_MMIO_CONFIG))
		return false;
	if (virtio_read32(d, VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC)
		return false;
	uint32_t version = virtio_read32(d, VIRTIO_MMIO_VERSION);
	if (version != 1 && version != VIRTIO_MMIO_VERSION_MODERN)
		return false;
	d->device_id = virtio_read32(d, VIRTIO_MMIO_DEVICE_ID);
	if (!d->device_id)
		return false;
	d->vendor_id = virtio_read32(d, VIRTIO_MMIO_VENDOR_ID);
	return true;
}

/* Devices in `n` windows of `size` bytes from `base` into out[found..max); returns the new count. */
static int scan(uint64_t base, uint64_t stride, int n, struct virtio_dev *out, int found, int max)
{
	for (int i = 0; i < n && found < max; i++) {
		struct virtio_dev d;
		memset(&d, 0, sizeof(d));
		d.base = base + (uint64_t)i * stride;
		d.size = stride;
		d.found_by = "scan";
		if (window_has_device(&d))
			out[found++] = d;
	}
	return found;
}

int virtio_probe(struct virtio_dev *out, int max)
{
	struct virtio_dev cand[VIRTIO_MMIO_SCAN_SLOTS];
	int n = cmdline_windows(cand, (int)ARRAY_SIZE(cand));
	int found = 0;
	if (n) {
		for (int i = 0; i < n && found < max; i++)
			if (window_has_device(&cand[i]))
				out[found++] = cand[i];
		return found;
	}
	found = scan(VIRTIO_MMIO_BASE, VIRTIO_MMIO_WINDOW, VIRTIO_MMIO_SCAN_SLOTS, out, 0, max);
	if (!found)
		found = scan(QEMU_MICROVM_VIRTIO_BASE, QEMU_MICROVM_VIRTIO_STRIDE, QEMU_MICROVM_VIRTIO_SLOTS, out, 0, max);
	return found;
}

bool virtio_find(uint32_t device_id, int nth, struct virtio_dev *out)
{
	struct virtio_dev all[VIRTIO_MMIO_SCAN_SLOTS];
	int n = virtio_probe(all, (int)ARRAY_SIZE(all));
	for (int i = 0; i < n; i++)
		if (all[i].device_id == device_id && nth-- == 0) {
			*out = all[i];
			return true;
		}
	set_error("no virtio device with ID %u (%d devices found)", device_id, n);
	return false;
}

/* ---- status and features ------------------------------------------------------------ */
bool virtio_reset(struct virtio_dev *d)
{
	virtio_write32(d, VIRTIO_MMIO_STATUS, 0);
	uint64_t end = rdtsc() + VIRTIO_RESET_TIMEOUT_MS * VIRTIO_TSC_PER_MS;
	while (virtio_read32(d, VIRTIO_MMIO_STATUS) != 0) {
		if (rdtsc() > end) {
			set_error("%#lx: Status still %#x after writing 0 (reset)", d->base,
				  virtio_read32(d, VIRTIO_MMIO_STATUS));
			return false;
		}
		cpu_relax();
	}
	return true;
}

static void add_status(struct virtio_dev *d, uint32_t bits)
{
	virtio_write32(d, VIRTIO_MMIO_STATUS, virtio_read32(d, VIRTIO_MMIO_STATUS) | bits);
}

void virtio_fail(struct virtio_dev *d)
{
	add_status(d, VIRTIO_STATUS_FAILED);
}

void virtio_driver_ok(struct virtio_dev *d)
{
	add_status(d, VIRTIO_STATUS_DRIVER_OK);
}

int virtio_setup(struct virtio_dev *d, uint64_t wanted)
{
	if (virtio_read32(d, VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC) {
		set_error("%#lx: MagicValue is not \"virt\"", d->base);
		return -1;
	}
	uint32_t version = virtio_read32(d, VIRTIO_MMIO_VERSION);
	if (version != VIRTIO_MMIO_VERSION_MODERN) {
		set_error("%#lx: Version %u, not the modern layout (2)", d->base, version);
		return -1;
	}
	if (!virtio_reset(d))
		return -1;
	add_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
	add_status(d, VIRTIO_STATUS_DRIVER);

	virtio_write32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	uint64_t offered = virtio_read32(d, VIRTIO_MMIO_DEVICE_FEATURES);
	virtio_write32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	offered |= (uint64_t)virtio_read32(d, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	d->device_features = offered;
	if (!(offered & VIRTIO_BIT(VIRTIO_F_VERSION_1))) {
		set_error("%#lx: device features %#lx lack VIRTIO_F_VERSION_1", d->base, offered);
		virtio_fail(d);
		return -1;
	}
	/* Addresses are physical and there is no IOMMU: ACCESS_PLATFORM changes nothing for us (§6.1). */
	uint64_t features = offered & (wanted | VIRTIO_BIT(VIRTIO_F_VERSION_1) | VIRTIO_BIT(VIRTIO_F_ACCESS_PLATFORM));
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)features);
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(features >> 32));
	add_status(d, VIRTIO_STATUS_FEATURES_OK);
	uint32_t status = virtio_read32(d, VIRTIO_MMIO_STATUS);
	if (!(status & VIRTIO_STATUS_FEATURES_OK)) {
		set_error("%#lx: FEATURES_OK did not stick (features %#lx, Status %#x)", d->base, features, status);
		virtio_fail(d);
		return -1;
	}
	d->features = features;
	return 0;
}

/* ---- configuration space ------------------------------------------------------------ */
uint8_t virtio_cfg8(const struct virtio_dev *d, uint32_t off)
{
	return *(volatile uint8_t *)(d->base + VIRTIO_MMIO_CONFIG + off);
}

uint16_t virtio_cfg16(const struct virtio_dev *d, uint32_t off)
{
	return *(volatile uint16_t *)(d->base + VIRTIO_MMIO_CONFIG + off);
}

uint32_t virtio_cfg32(const struct virtio_dev *d, uint32_t off)
{
	return *(volatile uint32_t *)(d->base + VIRTIO_MMIO_CONFIG + off);
}

uint64_t virtio_cfg64(const struct virtio_dev *d, uint32_t off)
{
	uint32_t before, after, lo, hi;
	do {
		before = virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION);
		lo = virtio_cfg32(d, off);
		hi = virtio_cfg32(d, off + 4);
		after = virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION);
	} while (before != after);
	return (uint64_t)hi << 32 | lo;
}

void virtio_cfg_write8(const struct virtio_dev *d, uint32_t off, uint8_t v)
{
	*(volatile uint8_t *)(d->base + VIRTIO_MMIO_CONFIG + off) = v;
}

void virtio_cfg_write16(const struct virtio_dev *d, uint32_t off, uint16_t v)
{
	*(volatile uint16_t *)(d->base + VIRTIO_MMIO_CONFIG + off) = v;
}

void virtio_cfg_write32(const struct virtio_dev *d, uint32_t off, uint32_t v)
{
	*(volatile uint32_t *)(d->base + VIRTIO_MMIO_CONFIG + off) = v;
}

/* ---- virtqueues --------------------------------------------------------------------- */
static void write_addr(struct virtio_dev *d, uint32_t low_reg, uint64_t addr)
{
	virtio_write32(d, low_reg, (uint32_t)addr);
	virtio_write32(d, low_reg + 4, (uint32_t)(addr >> 32));
}

int virtq_init(struct virtio_dev *d, struct virtq *q, uint16_t index, uint16_t max_size)
{
	memset(q, 0, sizeof(*q));
	virtio_write32(d, VIRTIO_MMIO_QUEUE_SEL, index);
	if (virtio_read32(d, VIRTIO_MMIO_QUEUE_READY)) {
		set_error("%#lx: queue %u is already in use (QueueReady 1)", d->base, index);
		return -1;
	}
	uint32_t num_max = virtio_read32(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (!num_max) {
		set_error("%#lx: queue %u is not available (QueueNumMax 0)", d->base, index);
		return -1;
	}
	uint32_t size = max_size < num_max ? max_size : num_max;
	if (size > VIRTQ_MAX_SIZE)
		size = VIRTQ_MAX_SIZE;
	while (size & (size - 1))
		size &= size - 1;	/* a power of two (§2.7: split queue sizes are) */
	if (!size) {
		set_error("%#lx: queue %u: no usable size (asked %u, QueueNumMax %u)", d->base, index, max_size, num_max);
		return -1;
	}
	q->dev = d;
	q->index = index;
	q->size = (uint16_t)size;
	q->desc = virtio_alloc(sizeof(struct virtq_desc) * size, 4096);
	q->avail = virtio_alloc(6 + 2 * size, 4096);
	q->used = virtio_alloc(6 + sizeof(struct virtq_used_elem) * size, 4096);
	q->next_free = virtio_alloc(2 * size, 8);
	q->chain_len = virtio_alloc(2 * size, 8);
	if (!q->desc || !q->avail || !q->used || !q->next_free || !q->chain_len)
		return -1;
	for (uint32_t i = 0; i < size; i++)
		q->next_free[i] = (uint16_t)(i + 1);
	q->num_free = (uint16_t)size;
	/* Completions are polled: ask for no used-buffer notifications (§2.7.7). */
	q->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;

	virtio_write32(d, VIRTIO_MMIO_QUEUE_NUM, size);
	write_addr(d, VIRTIO_MMIO_QUEUE_DESC_LOW, virt_to_phys(q->desc));
	write_addr(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, virt_to_phys(q->avail));
	write_addr(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, virt_to_phys(q->used));
	virtio_write32(d, VIRTIO_MMIO_QUEUE_READY, 1);
	if (virtio_read32(d, VIRTIO_MMIO_QUEUE_READY) != 1) {
		set_error("%#lx: queue %u: QueueReady did not stick (size %u, desc %#lx, Status %#x)", d->base, index,
			  size, virt_to_phys(q->desc), virtio_status(d));
		return -1;
	}
	return 0;
}

int virtq_add(struct virtq *q, const struct virtq_buf *out, int n_out, const struct virtq_buf *in, int n_in)
{
	int n = n_out + n_in;
	if (n_out < 0 || n_in < 0 || n == 0 || n > q->num_free) {
		set_error("queue %u: cannot add a chain of %d+%d descriptors (%u free)", q->index, n_out, n_in,
			  q->num_free);
		return -1;
	}
	uint16_t head = q->free_head, i = head;
	for (int k = 0; k < n; k++) {
		const struct virtq_buf *b = k < n_out ? &out[k] : &in[k - n_out];
		volatile struct virtq_desc *desc = &q->desc[i];
		uint16_t next = q->next_free[i];
		desc->addr = b->addr;
		desc->len = b->len;
		desc->flags = (uint16_t)((k >= n_out ? VIRTQ_DESC_F_WRITE : 0) | (k + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
		desc->next = k + 1 < n ? next : 0;
		i = next;
	}
	q->free_head = i;
	q->num_free = (uint16_t)(q->num_free - n);
	q->chain_len[head] = (uint16_t)n;
	q->in_flight++;
	q->avail->ring[q->avail_idx & (q->size - 1)] = head;
	q->avail_idx++;
	return head;
}

void virtq_kick(struct virtq *q)
{
	/* §2.7.13.3: descriptors and ring entries are visible before the index moves. */
	virtio_wmb();
	q->avail->idx = q->avail_idx;
	/* §2.7.13.4: the index store is ordered before reading the device's flags. */
	virtio_mb();
	if (q->used->flags & VIRTQ_USED_F_NO_NOTIFY) {
		q->kicks_suppressed++;
		return;
	}
	virtio_write32(q->dev, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
	q->kicks++;
}

int virtq_poll(struct virtq *q, uint32_t *len)
{
	uint16_t used_idx = q->used->idx;
	if (used_idx == q->last_used)
		return -1;
	if ((uint16_t)(used_idx - q->last_used) > q->in_flight) {
		set_error("queue %u: used.idx %u is %u ahead of the driver's %u with %u chains in flight", q->index,
			  used_idx, (uint16_t)(used_idx - q->last_used), q->last_used, q->in_flight);
		return -2;
	}
	/* §2.7.14: read the ring entry only after seeing the index that covers it. */
	virtio_rmb();
	volatile struct virtq_used_elem *e = &q->used->ring[q->last_used & (q->size - 1)];
	uint32_t id = e->id, written = e->len;
	q->last_used++;
	if (id >= q->size || !q->chain_len[id]) {
		set_error("queue %u: used entry names head %u, which is not in flight", q->index, id);
		return -2;
	}
	uint16_t last = (uint16_t)id;
	for (uint16_t k = 1; k < q->chain_len[id]; k++)
		last = q->next_free[last];
	q->next_free[last] = q->free_head;
	q->free_head = (uint16_t)id;
	q->num_free = (uint16_t)(q->num_free + q->chain_len[id]);
	q->chain_len[id] = 0;
	q->in_flight--;
	if (len)
		*len = written;
	return (int)id;
}

int virtq_wait(struct virtq *q, uint32_t *len, uint32_t timeout_ms)
{
	uint64_t end = rdtsc() + timeout_ms * VIRTIO_TSC_PER_MS;
	for (;;) {
		int head = virtq_poll(q, len);
		if (head != -1)
			return head;
		if (rdtsc() > end) {
			set_error("queue %u: no used buffer within %u ms (used.idx %u, Status %#x)", q->index,
				  timeout_ms, q->used->idx, virtio_status(q->dev));
			return -1;
		}
		cpu_relax();
	}
}

int virtq_call(struct virtq *q, const struct virtq_buf *out, int n_out, const struct virtq_buf *in, int n_in,
	       uint32_t *len, uint32_t timeout_ms)
{
	int head = virtq_add(q, out, n_out, in, n_in);
	if (head < 0)
		return head;
	virtq_kick(q);
	int got = virtq_wait(q, len, timeout_ms);
	if (got >= 0 && got != head) {
		set_error("queue %u: used entry names head %d, expected %d", q->index, got, head);
		return -2;
	}
	return got;
}
