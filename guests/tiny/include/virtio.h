/*
 * A small virtio 1.x driver for the virtio-mmio transport (virtio 1.2 §2,
 * §3.1, §4.2), usable from ring 3: modern devices only (Version 2 and
 * VIRTIO_F_VERSION_1), split virtqueues in guest memory, requests submitted
 * as descriptor chains and completions found by polling the used ring.
 *
 * Typical use:
 *
 *	struct virtio_dev d;
 *	struct virtq q;
 *	if (!virtio_find(VIRTIO_ID_BLOCK, 0, &d)) ...;
 *	if (virtio_setup(&d, wanted_features) < 0 || virtq_init(&d, &q, 0, 128) < 0) ...;
 *	virtio_driver_ok(&d);
 *	struct virtq_buf out[] = {{hdr, 16}}, in[] = {{data, 512}, {status, 1}};
 *	int head = virtq_call(&q, out, 1, in, 2, &len, 5000);
 *
 * Every function that can fail returns a negative value and leaves a one-line
 * reason naming the register or guest address in virtio_error().
 *
 * Devices are found through `virtio_mmio.device=<size>@<base>:<irq>` words on
 * the command line when there are any (what Linux parses, and what QEMU
 * microvm and our VMM add when ACPI is off), else by scanning the windows at
 * VIRTIO_MMIO_BASE (one per 4 KiB) for MagicValue "virt" with a non-zero
 * DeviceID, and when those hold nothing, QEMU microvm's windows (which its
 * DSDT lists, and a multiboot command line never does).  Interrupts stay masked: queues are set up with
 * VIRTQ_AVAIL_F_NO_INTERRUPT and completions are polled.
 *
 * Queue memory comes from virtio_alloc(), a bump allocator over the RAM above
 * the image (and anything the loader put after it), checked against the
 * loader's memory map.  Addresses are physical: the low 4 GiB are identity-
 * mapped.
 */
#ifndef TINY_VIRTIO_H
#define TINY_VIRTIO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- §4.2.2 MMIO device register layout ---- */
#define VIRTIO_MMIO_MAGIC_VALUE         0x000
#define VIRTIO_MMIO_VERSION             0x004
#define VIRTIO_MMIO_DEVICE_ID           0x008
#define VIRTIO_MMIO_VENDOR_ID           0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES     0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES     0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL           0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX       0x034
#define VIRTIO_MMIO_QUEUE_NUM           0x038
#define VIRTIO_MMIO_QUEUE_READY         0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY        0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS    0x060
#define VIRTIO_MMIO_INTERRUPT_ACK       0x064
#define VIRTIO_MMIO_STATUS              0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW      0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH     0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW    0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH   0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW    0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH   0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION   0x0fc
#define VIRTIO_MMIO_CONFIG              0x100

#define VIRTIO_MMIO_MAGIC               0x74726976	/* "virt" */
#define VIRTIO_MMIO_VERSION_MODERN      2		/* §4.2.2: 1 is the legacy layout */
#define VIRTIO_MMIO_WINDOW              0x1000		/* our VMM's stride between devices */
#define VIRTIO_MMIO_SCAN_SLOTS          16		/* windows scanned without a cmdline list */
/* QEMU microvm's virtio-mmio windows (hw/i386/microvm.h), scanned when ours hold nothing. */
#define QEMU_MICROVM_VIRTIO_BASE        0xfeb00000
#define QEMU_MICROVM_VIRTIO_STRIDE      0x200
#define QEMU_MICROVM_VIRTIO_SLOTS       24

/* InterruptStatus / InterruptACK bits (§4.2.2). */
#define VIRTIO_MMIO_INT_VRING           0x1
#define VIRTIO_MMIO_INT_CONFIG          0x2

/* ---- §2.1 device status field ---- */
#define VIRTIO_STATUS_ACKNOWLEDGE       1
#define VIRTIO_STATUS_DRIVER            2
#define VIRTIO_STATUS_DRIVER_OK         4
#define VIRTIO_STATUS_FEATURES_OK       8
#define VIRTIO_STATUS_NEEDS_RESET       64
#define VIRTIO_STATUS_FAILED            128

/* ---- §6 reserved feature bits (bit numbers) ---- */
#define VIRTIO_F_INDIRECT_DESC          28
#define VIRTIO_F_EVENT_IDX              29
#define VIRTIO_F_VERSION_1              32
#define VIRTIO_F_ACCESS_PLATFORM        33
#define VIRTIO_BIT(n)                   (1ull << (n))

/* ---- §5 device IDs ---- */
#define VIRTIO_ID_NET                   1
#define VIRTIO_ID_BLOCK                 2
#define VIRTIO_ID_CONSOLE               3
#define VIRTIO_ID_RNG                   4
#define VIRTIO_ID_VSOCK                 19

/* ---- §2.7 split virtqueue layout ---- */
#define VIRTQ_DESC_F_NEXT               1
#define VIRTQ_DESC_F_WRITE              2
#define VIRTQ_DESC_F_INDIRECT           4
#define VIRTQ_AVAIL_F_NO_INTERRUPT      1
#define VIRTQ_USED_F_NO_NOTIFY          1
#define VIRTQ_DESC_ALIGN                16
#define VIRTQ_AVAIL_ALIGN               2
#define VIRTQ_USED_ALIGN                4
/* "The maximum Queue Size value is 32768" (§2.7). */
#define VIRTQ_MAX_SIZE                  32768

struct virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};
struct virtq_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[];	/* then le16 used_event (VIRTIO_F_EVENT_IDX) */
};
struct virtq_used_elem {
	uint32_t id;
	uint32_t len;
};
struct virtq_used {
	uint16_t flags;
	uint16_t idx;
	struct virtq_used_elem ring[];	/* then le16 avail_event */
};

/* One device window. */
struct virtio_dev {
	uint64_t base;		/* MMIO window (guest-physical) */
	uint64_t size;		/* window size (from the cmdline, else VIRTIO_MMIO_WINDOW) */
	uint32_t irq;		/* from the cmdline; 0 when found by scanning */
	uint32_t device_id;
	uint32_t vendor_id;
	uint64_t device_features;	/* what the device offers (read by virtio_setup) */
	uint64_t features;		/* what was negotiated */
	const char *found_by;	/* "cmdline" or "scan" */
};

/* One split virtqueue and the driver's private state. */
struct virtq {
	struct virtio_dev *dev;
	uint16_t index;
	uint16_t size;
	volatile struct virtq_desc *desc;
	volatile struct virtq_avail *avail;
	volatile struct virtq_used *used;
	uint16_t free_head;	/* first free descriptor (a list through next_free) */
	uint16_t num_free;
	uint16_t avail_idx;	/* avail.idx as the driver will publish it */
	uint16_t last_used;	/* the next used.idx entry to consume */
	uint16_t in_flight;	/* chains added and not yet returned */
	uint16_t *next_free;	/* private: free-list links (the device may not rewrite ours) */
	uint16_t *chain_len;	/* private: descriptors in the chain at head i; 0 = not in flight */
	uint64_t kicks;		/* notifications written */
	uint64_t kicks_suppressed;	/* skipped because the device set VIRTQ_USED_F_NO_NOTIFY */
};

/* A buffer in guest-physical memory. */
struct virtq_buf {
	uint64_t addr;
	uint32_t len;
};

/* ---- barriers: x86 keeps loads with loads and stores with stores (SDM Vol. 3A 9.2.2) ---- */
static inline void virtio_wmb(void) { __asm__ volatile("" ::: "memory"); }
static inline void virtio_rmb(void) { __asm__ volatile("" ::: "memory"); }
/* A store followed by a load of another location needs a full fence. */
static inline void virtio_mb(void) { __asm__ volatile("mfence" ::: "memory"); }

/* ---- registers ---- */
static inline uint32_t virtio_read32(const struct virtio_dev *d, uint32_t reg)
{
	return *(volatile uint32_t *)(d->base + reg);
}
static inline void virtio_write32(const struct virtio_dev *d, uint32_t reg, uint32_t v)
{
	*(volatile uint32_t *)(d->base + reg) = v;
}

/* The reason for the last failure, one line. */
const char *virtio_error(void);

/* ---- discovery ---- */
/* Every device found (see above), in window order; returns how many (at most max). */
int virtio_probe(struct virtio_dev *out, int max);
/* The nth (0-based) device with this DeviceID. */
bool virtio_find(uint32_t device_id, int nth, struct virtio_dev *out);

/* ---- initialisation (§3.1.1) ---- */
/* Status := 0 and wait until it reads 0 (§2.4.2); false if it never does. */
bool virtio_reset(struct virtio_dev *d);
/*
 * Reset, ACKNOWLEDGE, DRIVER, negotiate (offered & wanted) | VERSION_1,
 * FEATURES_OK and check it stuck.  Fails (and sets FAILED) when the device is
 * not modern or refuses the features.
 */
int virtio_setup(struct virtio_dev *d, uint64_t wanted);
/* Set DRIVER_OK: the device is live (§3.1.1 step 8). */
void virtio_driver_ok(struct virtio_dev *d);
/* Set FAILED: the driver gave up on the device. */
void virtio_fail(struct virtio_dev *d);
static inline uint32_t virtio_status(const struct virtio_dev *d) { return virtio_read32(d, VIRTIO_MMIO_STATUS); }
static inline bool virtio_has(const struct virtio_dev *d, int bit) { return (d->features >> bit) & 1; }

/* ---- device configuration space (§2.5, §4.2.2.2: access widths follow field widths) ---- */
uint8_t virtio_cfg8(const struct virtio_dev *d, uint32_t off);
uint16_t virtio_cfg16(const struct virtio_dev *d, uint32_t off);
uint32_t virtio_cfg32(const struct virtio_dev *d, uint32_t off);
/* Two 32-bit reads, retried until ConfigGeneration is the same before and after (§2.5.1). */
uint64_t virtio_cfg64(const struct virtio_dev *d, uint32_t off);
void virtio_cfg_write8(const struct virtio_dev *d, uint32_t off, uint8_t v);
void virtio_cfg_write16(const struct virtio_dev *d, uint32_t off, uint16_t v);
void virtio_cfg_write32(const struct virtio_dev *d, uint32_t off, uint32_t v);

/* ---- virtqueues (§2.7, §4.2.3.2) ---- */
/*
 * Set up queue `index` with min(max_size, QueueNumMax) entries rounded down to
 * a power of two.  Between virtio_setup() and virtio_driver_ok().
 */
int virtq_init(struct virtio_dev *d, struct virtq *q, uint16_t index, uint16_t max_size);
/*
 * Put a chain on the available ring (not yet visible to the device): n_out
 * device-readable buffers, then n_in device-writable ones.  Returns the head
 * descriptor index, or -1 when there are not enough free descriptors.
 */
int virtq_add(struct virtq *q, const struct virtq_buf *out, int n_out, const struct virtq_buf *in, int n_in);
/* Publish what virtq_add queued and notify the device unless it asked not to be (§2.7.13). */
void virtq_kick(struct virtq *q);
/*
 * The next used chain, if the device returned one: its head (and *len, the
 * bytes the device wrote), else -1.  A used entry naming a head that is not
 * in flight is a device error: -2, with virtio_error() set.
 */
int virtq_poll(struct virtq *q, uint32_t *len);
/* Like virtq_poll, but spins up to about timeout_ms; -1 on timeout. */
int virtq_wait(struct virtq *q, uint32_t *len, uint32_t timeout_ms);
/* add + kick + wait for that chain (the only one in flight); returns its head or < 0. */
int virtq_call(struct virtq *q, const struct virtq_buf *out, int n_out, const struct virtq_buf *in, int n_in,
	       uint32_t *len, uint32_t timeout_ms);

/* ---- memory for queues and buffers ---- */
/* Zeroed, `align`-aligned (a power of two) guest RAM; NULL when none is left. */
void *virtio_alloc(size_t size, size_t align);
static inline uint64_t virt_to_phys(const volatile void *p) { return (uint64_t)(uintptr_t)p; }

#endif
