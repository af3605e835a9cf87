/*
 * Test helper for the userfaultfd tests: touch memory and survive SIGBUS.
 *
 * Python cannot catch a SIGBUS raised by a memory access (its handler only sets a flag and the
 * access is retried forever), so the tests call these functions through ctypes. The handler
 * jumps out of the faulting access, and the functions report per page what happened.
 *
 *   long probe_pages(char *addr, long npages, long page_size, int *out)
 *       Reads every byte of every page. out[i] = the page's byte value when the page is uniform,
 *       -1 when reading it raised SIGBUS, -2 when its bytes differ. Returns the SIGBUS count.
 *
 *   long write_pages(char *addr, long npages, long page_size, int value)
 *       Writes one byte at the start of each page; returns the SIGBUS count.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <string.h>

static sigjmp_buf probe_jump;

static void on_sigbus(int sig)
{
	(void)sig;
	siglongjmp(probe_jump, 1);
}

static void catch_sigbus(struct sigaction *old)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_sigbus;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGBUS, &sa, old);
}

long probe_pages(char *addr, long npages, long page_size, int *out)
{
	struct sigaction old;
	volatile long i, count = 0;

	catch_sigbus(&old);
	for (i = 0; i < npages; i++) {
		volatile unsigned char *page = (volatile unsigned char *)addr + i * page_size;
		unsigned char first;
		long j;

		if (sigsetjmp(probe_jump, 1)) {
			out[i] = -1;
			count++;
			continue;
		}
		first = page[0];
		out[i] = first;
		for (j = 1; j < page_size; j++) {
			if (page[j] != first) {
				out[i] = -2;
				break;
			}
		}
	}
	sigaction(SIGBUS, &old, NULL);
	return count;
}

long write_pages(char *addr, long npages, long page_size, int value)
{
	struct sigaction old;
	volatile long i, count = 0;

	catch_sigbus(&old);
	for (i = 0; i < npages; i++) {
		if (sigsetjmp(probe_jump, 1)) {
			count++;
			continue;
		}
		((volatile char *)addr)[i * page_size] = (char)value;
	}
	sigaction(SIGBUS, &old, NULL);
	return count;
}
