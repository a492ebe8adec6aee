/* triple: triple-faults on purpose (an empty IDT, then a fault in ring 0). */
#include "tiny.h"

const char tiny_guest_name[] = "triple";

int main(void)
{
	printf("triple: triple-faulting now\n");
	triple_fault();
}
