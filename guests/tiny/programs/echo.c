/*
 * echo: reads lines from the serial port and prints each back as
 * "echo: <line>"; the line "exit N" ends the guest with code N.
 * Lines end at CR, LF or CR LF; longer lines than the buffer are cut.
 */
#include "tiny.h"

const char tiny_guest_name[] = "echo";

static int parse_code(const char *s)
{
	int code = 0;
	while (*s == ' ')
		s++;
	while (*s >= '0' && *s <= '9')
		code = code * 10 + (*s++ - '0');
	return code;
}

int main(void)
{
	char line[512];
	size_t n = 0;
	bool after_cr = false;
	printf("echo: ready\n");
	for (;;) {
		char c = (char)serial_getc();
		if (c == '\n' && after_cr) {
			after_cr = false;
			continue;
		}
		after_cr = c == '\r';
		if (c != '\r' && c != '\n') {
			if (n < sizeof(line) - 1)
				line[n++] = c;
			continue;
		}
		line[n] = 0;
		n = 0;
		printf("echo: %s\n", line);
		if (!strncmp(line, "exit", 4) && (line[4] == 0 || line[4] == ' ')) {
			int code = parse_code(line + 4);
			printf("echo: exiting with code %d\n", code);
			return code;
		}
	}
}
