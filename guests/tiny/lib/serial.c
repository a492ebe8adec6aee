/*
 * COM1 as a polled 16550 UART: no interrupts, 115200 8N1, FIFOs on.
 *
 * With the FIFO enabled one LSR.THRE poll admits 16 bytes (as Linux's 8250
 * driver does), which halves the port exits per character on a VMM.
 */
#include "tiny.h"

#define UART_RBR 0	/* receive buffer (read, DLAB=0) */
#define UART_THR 0	/* transmit holding (write, DLAB=0) */
#define UART_DLL 0	/* divisor latch low (DLAB=1) */
#define UART_IER 1
#define UART_DLM 1
#define UART_IIR 2	/* read */
#define UART_FCR 2	/* write */
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define LCR_DLAB   0x80
#define LCR_8N1    0x03
#define FCR_ENABLE_CLEAR 0x07
#define IIR_FIFO_MASK    0xc0
#define MCR_DTR_RTS      0x03
#define LSR_DR     0x01
#define LSR_THRE   0x20
#define UART_FIFO_SIZE 16

static unsigned fifo_size = 1;
static unsigned tx_room;

void serial_init(void)
{
	outb(COM1_PORT + UART_IER, 0);
	outb(COM1_PORT + UART_LCR, LCR_DLAB);
	outb(COM1_PORT + UART_DLL, 1);	/* 115200 baud */
	outb(COM1_PORT + UART_DLM, 0);
	outb(COM1_PORT + UART_LCR, LCR_8N1);
	outb(COM1_PORT + UART_MCR, MCR_DTR_RTS);
	tx_room = 0;
	/*
	 * Switching the FIFOs on empties them, so never do it while the host's
	 * input is waiting: use FIFOs firmware left on, enable them when nothing
	 * has arrived yet, and otherwise stay in byte-at-a-time mode.
	 */
	if ((inb(COM1_PORT + UART_IIR) & IIR_FIFO_MASK) == IIR_FIFO_MASK) {
		fifo_size = UART_FIFO_SIZE;
		return;
	}
	fifo_size = 1;
	if (inb(COM1_PORT + UART_LSR) & LSR_DR)
		return;
	outb(COM1_PORT + UART_FCR, FCR_ENABLE_CLEAR);
	if ((inb(COM1_PORT + UART_IIR) & IIR_FIFO_MASK) == IIR_FIFO_MASK)
		fifo_size = UART_FIFO_SIZE;
}

static void tx(char c)
{
	if (!tx_room) {
		while (!(inb(COM1_PORT + UART_LSR) & LSR_THRE))
			cpu_relax();
		tx_room = fifo_size;
	}
	outb(COM1_PORT + UART_THR, (uint8_t)c);
	tx_room--;
}

void serial_write(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (s[i] == '\n')
			tx('\r');
		tx(s[i]);
	}
}

int serial_trygetc(void)
{
	if (!(inb(COM1_PORT + UART_LSR) & LSR_DR))
		return -1;
	return inb(COM1_PORT + UART_RBR);
}

int serial_getc(void)
{
	int c;
	while ((c = serial_trygetc()) < 0)
		cpu_relax();
	return c;
}
