/*
 * dataplane_ref_handler: crosvm's fault service in C, as the baseline of bench_data_plane.py.
 *
 *   dataplane_ref_handler --uffd FD --src FD --src-offset BYTES --addr ADDR --len BYTES [--cpu C]
 *
 * Serves the MISSING faults of [ADDR, ADDR + LEN) on the (inherited) userfaultfd FD exactly like
 * crosvm's page handler: one 4 KiB page per fault, read from the source file (the staging memfd
 * or the swap file) at SRC_OFFSET + (page - ADDR) with pread(2) into a private buffer, then one
 * UFFDIO_COPY; EEXIST is answered with UFFDIO_WAKE. It exits once every page of the range was
 * served and prints {"faults":N,"elapsed_ns":T} (T from the first fault to the last).
 *
 * Build: gcc -O2 -Wall -o dataplane_ref_handler dataplane_ref_handler.c
 * The uAPI bits come from uffd_uapi.h beside it: the installed header may be older than the kernel.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "uffd_uapi.h"

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "dataplane_ref_handler: %s: %s\n", what, strerror(errno));
	exit(1);
}

int main(int argc, char **argv)
{
	long long uffd = -1, src = -1, cpu = -1;
	unsigned long long src_offset = 0, addr = 0, len = 0;
	for (int i = 1; i + 1 < argc; i += 2) {
		const char *a = argv[i], *v = argv[i + 1];
		if (!strcmp(a, "--uffd")) uffd = strtoll(v, NULL, 0);
		else if (!strcmp(a, "--src")) src = strtoll(v, NULL, 0);
		else if (!strcmp(a, "--src-offset")) src_offset = strtoull(v, NULL, 0);
		else if (!strcmp(a, "--addr")) addr = strtoull(v, NULL, 0);
		else if (!strcmp(a, "--len")) len = strtoull(v, NULL, 0);
		else if (!strcmp(a, "--cpu")) cpu = strtoll(v, NULL, 0);
		else { fprintf(stderr, "unknown argument %s\n", a); return 2; }
	}
	if (uffd < 0 || src < 0 || !addr || !len) {
		fprintf(stderr, "usage: dataplane_ref_handler --uffd FD --src FD --src-offset BYTES "
			"--addr ADDR --len BYTES [--cpu C]\n");
		return 2;
	}
	if (cpu >= 0) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET((int)cpu, &set);
		if (sched_setaffinity(0, sizeof(set), &set))
			die("sched_setaffinity");
	}
	long page = sysconf(_SC_PAGESIZE);
	char *buf = aligned_alloc((size_t)page, (size_t)page);
	if (!buf)
		die("aligned_alloc");
	memset(buf, 0, (size_t)page); /* populated: reads never fault here */
	uint64_t pages = len / (uint64_t)page, served = 0, faults = 0, first = 0;
	struct uffd_msg msgs[MAX_MSGS];
	struct pollfd pfd = { .fd = (int)uffd, .events = POLLIN };
	while (served < pages) {
		if (poll(&pfd, 1, 60000) <= 0)
			die("poll (no fault for 60 s)");
		ssize_t n = read((int)uffd, msgs, sizeof(msgs));
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			die("read");
		}
		if (!first)
			first = now_ns();
		for (ssize_t i = 0; i < n / (ssize_t)sizeof(msgs[0]); i++) {
			if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
				continue;
			uint64_t at = msgs[i].arg.pagefault.address & ~((uint64_t)page - 1);
			faults++;
			if (pread((int)src, buf, (size_t)page, (off_t)(src_offset + (at - addr))) != page)
				die("pread");
			struct uffdio_copy copy = { .dst = at, .src = (uint64_t)(uintptr_t)buf,
						    .len = (uint64_t)page, .mode = 0, .copy = 0 };
			if (ioctl((int)uffd, UFFDIO_COPY, &copy)) {
				if (errno != EEXIST)
					die("UFFDIO_COPY");
				struct uffdio_range range = { .start = at, .len = (uint64_t)page };
				if (ioctl((int)uffd, UFFDIO_WAKE, &range))
					die("UFFDIO_WAKE");
				continue;
			}
			served++;
		}
	}
	printf("{\"faults\":%llu,\"elapsed_ns\":%llu}\n", (unsigned long long)faults,
	       (unsigned long long)(now_ns() - first));
	return 0;
}
