/*
 * The userfaultfd uAPI bits the C baselines use (include/uapi/linux/userfaultfd.h), defined here
 * rather than taken from <linux/userfaultfd.h>, which may be older than the running kernel.
 * Include after <stdint.h>, <sys/ioctl.h> and <sys/syscall.h>.
 */
#ifndef VMMSWAP_BENCH_UFFD_UAPI_H
#define VMMSWAP_BENCH_UFFD_UAPI_H

#define UFFD_API 0xAAULL
#define UFFDIO 0xAA
#define UFFD_EVENT_PAGEFAULT 0x12
#define UFFDIO_REGISTER_MODE_MISSING (1ULL << 0)
#define UFFDIO_COPY_MODE_DONTWAKE (1ULL << 0)

struct uffdio_api { uint64_t api, features, ioctls; };
struct uffdio_range { uint64_t start, len; };
struct uffdio_register { struct uffdio_range range; uint64_t mode, ioctls; };
struct uffdio_copy { uint64_t dst, src, len, mode; int64_t copy; };
struct uffd_msg {
	uint8_t event, reserved1;
	uint16_t reserved2;
	uint32_t reserved3;
	union {
		struct { uint64_t flags, address; uint32_t ptid; } __attribute__((packed)) pagefault;
		uint64_t reserved[3];
	} arg;
} __attribute__((packed));

#define UFFDIO_API_IOCTL _IOWR(UFFDIO, 0x3F, struct uffdio_api)
#define UFFDIO_REGISTER _IOWR(UFFDIO, 0x00, struct uffdio_register)
#define UFFDIO_WAKE _IOR(UFFDIO, 0x02, struct uffdio_range)
#define UFFDIO_COPY _IOWR(UFFDIO, 0x03, struct uffdio_copy)
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)

#ifndef __NR_userfaultfd
#if defined(__x86_64__)
#define __NR_userfaultfd 323
#else
#define __NR_userfaultfd 282 /* asm-generic */
#endif
#endif

/* Messages read per read(2). */
#define MAX_MSGS 64

#endif
