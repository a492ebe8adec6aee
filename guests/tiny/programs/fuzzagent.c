/*
 * fuzzagent: runs a program of device accesses from the initrd, from ring 3,
 * and prints what each read returned.
 *
 * The host (pytest_microvm/fuzz/agent.py) serialises the program; the same
 * bytes run on this VMM and on QEMU's microvm machine.  Format, little-endian:
 *
 *   header: u32 magic "FZAG", u32 version (1), u32 op count, u32 reserved
 *   op:     u8 kind, u8 size, u16 reserved, u32 reserved, u64 addr, u64 value
 *
 *   kind 1: port read   (size 1, 2, 4)      addr = port
 *   kind 2: port write  (size 1, 2, 4)
 *   kind 3: virtio read  (size 1, 2, 4, 8)  addr = offset in the virtio-mmio window
 *   kind 4: virtio write (size 1, 2, 4, 8)
 *
 * The virtio window is the first of `fz_vcount=` windows from `fz_vbase=`,
 * `fz_vstride=` apart, whose Magic is "virt" and DeviceID is `fz_vdev=`
 * (addresses differ between VMMs; the program does not).  Before the program
 * the UART is in the state serial_init() leaves it in; afterwards serial_init()
 * runs again and the results are printed as
 *
 *   fuzzagent: window 0x...
 *   fuzzagent: results N
 *   r <index> <hex value>          (one line per read, in program order)
 *   fuzzagent: end
 *
 * Exit codes: 0 done, 2 no initrd / bad magic, 3 no matching virtio window,
 * 4 a malformed op.
 */
#include "tiny.h"

const char tiny_guest_name[] = "fuzzagent";

#define FZAG_MAGIC 0x47415a46u /* "FZAG" */
#define MAX_OPS 4096

struct fz_header {
	uint32_t magic, version, count, reserved;
};
struct fz_op {
	uint8_t kind, size;
	uint16_t reserved16;
	uint32_t reserved32;
	uint64_t addr, value;
};

static uint64_t results[MAX_OPS];

static uint64_t find_window(void)
{
	uint64_t base = cmdline_hex("fz_vbase", 0);
	uint64_t stride = cmdline_hex("fz_vstride", 0x1000);
	uint64_t count = cmdline_u64("fz_vcount", 0);
	uint64_t dev = cmdline_u64("fz_vdev", 0);
	for (uint64_t i = 0; i < count; i++) {
		uint64_t w = base + i * stride;
		if (mmio_read32(w) == 0x74726976u && mmio_read32(w + 8) == (uint32_t)dev)
			return w;
	}
	return 0;
}

static uint64_t mmio_read(uint64_t a, unsigned size)
{
	switch (size) {
	case 1: return *(volatile uint8_t *)phys(a);
	case 2: return *(volatile uint16_t *)phys(a);
	case 4: return *(volatile uint32_t *)phys(a);
	default: return *(volatile uint64_t *)phys(a);
	}
}

static void mmio_write(uint64_t a, unsigned size, uint64_t v)
{
	switch (size) {
	case 1: *(volatile uint8_t *)phys(a) = (uint8_t)v; break;
	case 2: *(volatile uint16_t *)phys(a) = (uint16_t)v; break;
	case 4: *(volatile uint32_t *)phys(a) = (uint32_t)v; break;
	default: *(volatile uint64_t *)phys(a) = v; break;
	}
}

static uint64_t port_read(uint16_t port, unsigned size)
{
	return size == 1 ? inb(port) : size == 2 ? inw(port) : inl(port);
}

static void port_write(uint16_t port, unsigned size, uint64_t v)
{
	if (size == 1)
		outb(port, (uint8_t)v);
	else if (size == 2)
		outw(port, (uint16_t)v);
	else
		outl(port, (uint32_t)v);
}

int main(void)
{
	const struct fz_header *h = (const struct fz_header *)phys(boot.initrd_addr);
	if (!boot.initrd_addr || boot.initrd_size < sizeof(*h) || h->magic != FZAG_MAGIC || h->version != 1) {
		printf("fuzzagent: no program in the initrd\n");
		return 2;
	}
	uint32_t count = h->count;
	if (count > MAX_OPS || sizeof(*h) + (uint64_t)count * sizeof(struct fz_op) > boot.initrd_size) {
		printf("fuzzagent: program of %u ops does not fit\n", count);
		return 2;
	}
	uint64_t window = cmdline_has("fz_vdev") ? find_window() : 0;
	if (cmdline_has("fz_vdev") && !window) {
		printf("fuzzagent: no virtio window with device id %lu\n", cmdline_u64("fz_vdev", 0));
		return 3;
	}
	const struct fz_op *ops = (const struct fz_op *)(h + 1);
	uint32_t nres = 0;
	for (uint32_t i = 0; i < count; i++) {
		const struct fz_op *op = &ops[i];
		unsigned size = op->size;
		bool port = op->kind <= 2;
		if (op->kind < 1 || op->kind > 4 || !(size == 1 || size == 2 || size == 4 || (size == 8 && !port)))
			return 4;
		if (!port && (!window || op->addr > 0xff8))
			return 4;
		switch (op->kind) {
		case 1: results[nres++] = port_read((uint16_t)op->addr, size); break;
		case 2: port_write((uint16_t)op->addr, size, op->value); break;
		case 3: results[nres++] = mmio_read(window + op->addr, size); break;
		case 4: mmio_write(window + op->addr, size, op->value); break;
		}
	}
	serial_init();
	printf("\nfuzzagent: window %#lx\nfuzzagent: results %u\n", window, nres);
	for (uint32_t i = 0; i < nres; i++)
		printf("r %u %lx\n", i, results[i]);
	printf("fuzzagent: end\n");
	return 0;
}
