/*
 * The built-in guest: a freestanding 64-bit program that fills memory with a deterministic
 * pattern and, on command, re-reads, rewrites, verifies or checksums any range, timing the first
 * touch of every page with the TSC.
 *
 * It talks to the VMM only through port I/O (one block of ports per vCPU), never through
 * memory the VMM would have to read: while vmm-swap is enabled the VMM's Python code must not
 * touch guest memory. The VMM enters at _start in 64-bit mode with paging on (identity map),
 * in ring 0, with rdi = vCPU index, rsi = the ring-3 stack top and rsp = the ring-0 stack;
 * interrupts stay off.
 *
 * Ring 0 only installs the IDT and drops to ring 3 (IOPL 3, so port I/O stays allowed), where
 * the workload runs. Hardware virtualisation runs both rings natively, but software KVM
 * implementations such as PVM emulate guest-supervisor code instruction by instruction (about a
 * thousand times slower on the development machine), while guest user code runs natively. The
 * ring-0 part is therefore kept to setup and exception reports.
 *
 * Port numbers, opcodes and the stack layout arrive as -D flags from vmmswap/vm/guest_build.py,
 * the single source of truth shared with the host side (vmmswap/vm/workload.py).
 */
typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define STR_(x) #x
#define STR(x) STR_(x)

#ifndef PORT_BASE
#error "build through vmmswap.vm.guest_build: the port map comes from there"
#endif

/* ---- port I/O and the TSC ------------------------------------------------------------ */
static inline void outl(u16 port, u32 value) { __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port)); }
static inline void outb(u16 port, u8 value) { __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port)); }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* lfence on both sides: the timed access neither starts before the first read of the TSC
   nor is still in flight at the second (an EPT fault is taken before the access retires). */
static inline u64 tsc(void) {
    u32 lo, hi;
    __asm__ volatile("lfence\n\trdtsc\n\tlfence" : "=a"(lo), "=d"(hi) : : "memory");
    return ((u64)hi << 32) | lo;
}
static inline void mfence(void) { __asm__ volatile("mfence" : : : "memory"); }
static inline u64 read_cr2(void) { u64 v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); return v; }

/* gcc may emit calls to these even in freestanding code. */
void *memset(void *dst, int c, u64 n) { u8 *d = dst; while (n--) *d++ = (u8)c; return dst; }
void *memcpy(void *dst, const void *src, u64 n) { u8 *d = dst; const u8 *s = src; while (n--) *d++ = *s++; return dst; }

/* ---- the pattern and the checksum ----------------------------------------------------- */
/* splitmix64's finaliser: every qword differs, and a page of pattern is never all zero. */
static inline u64 mix(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
    return z ^ (z >> 31);
}
/* The value of the qword at guest-physical address a for pattern seed s (0 = zero page). */
static inline u64 pattern(u64 a, u64 seed) { return mix((a >> 3) + seed * PATTERN_SEED_MULT + PATTERN_GOLDEN); }
/* Position-dependent, order-independent: the host can recompute it with numpy. */
static inline u64 checksum_term(u64 v, u64 a) { return mix(v ^ a); }

/* ---- per-command report: latency histogram ------------------------------------------- */
#define NBUCKETS HIST_BUCKETS
/* Log-linear buckets: exact below 8 cycles, then 8 sub-buckets per power of two (12.5 %). */
static inline u32 bucket(u64 x) {
    if (x < 8) return (u32)x;
    u32 e = 63 - (u32)__builtin_clzl(x);
    u32 idx = (e - 2) * 8 + (u32)((x >> (e - 3)) & 7);
    return idx < NBUCKETS ? idx : NBUCKETS - 1;
}

struct cmd {
    u16 port;
    u32 hist[NBUCKETS];
    u64 pages;
    u64 t_start;
};

static inline void result32(struct cmd *c, u32 v) { outl(c->port + PORT_RESULT, v); }
static inline void result64(struct cmd *c, u64 v) { result32(c, (u32)v); result32(c, (u32)(v >> 32)); }
static inline u64 arg64(u16 port) { u64 lo = inl(port + PORT_ARG); u64 hi = inl(port + PORT_ARG); return lo | (hi << 32); }

static void begin(struct cmd *c) {
    memset(c->hist, 0, sizeof c->hist);
    c->pages = 0;
    c->t_start = tsc();
}

static inline void record(struct cmd *c, u64 t0, u64 t1) { c->hist[bucket(t1 - t0)]++; c->pages++; }

/* Every walking command reports: cycles, pages, the non-empty buckets, then its own values. */
static void report(struct cmd *c) {
    u64 cycles = tsc() - c->t_start;
    u32 used = 0;
    for (u32 i = 0; i < NBUCKETS; i++) used += c->hist[i] != 0;
    result64(c, cycles);
    result64(c, c->pages);
    result32(c, used);
    for (u32 i = 0; i < NBUCKETS; i++) {
        if (c->hist[i]) { result32(c, i); result32(c, c->hist[i]); }
    }
}

#define PAGE 4096UL
#define QWORDS (PAGE / 8)

/* ---- commands ------------------------------------------------------------------------ */
static void cmd_fill(struct cmd *c, u64 start, u64 len, u64 seed) {
    begin(c);
    for (u64 p = start; p < start + len; p += PAGE) {
        volatile u64 *q = (volatile u64 *)p;
        u64 first = seed ? pattern(p, seed) : 0;
        u64 t0 = tsc();
        q[0] = first;
        mfence();
        u64 t1 = tsc();
        record(c, t0, t1);
        u64 *w = (u64 *)p;
        if (seed) {
            for (u64 i = 1; i < QWORDS; i++) w[i] = pattern(p + i * 8, seed);
        } else {
            for (u64 i = 1; i < QWORDS; i++) w[i] = 0;
        }
    }
    report(c);
}

static void cmd_read(struct cmd *c, u64 start, u64 len) {
    u64 sum = 0;
    begin(c);
    for (u64 p = start; p < start + len; p += PAGE) {
        volatile u64 *q = (volatile u64 *)p;
        u64 t0 = tsc();
        sum += q[0];
        u64 t1 = tsc();
        record(c, t0, t1);
        for (u64 i = 1; i < QWORDS; i++) sum += q[i];
    }
    report(c);
    result64(c, sum);
}

static void cmd_verify(struct cmd *c, u64 start, u64 len, u64 seed) {
    u64 bad = 0, first_bad = ~0UL;
    begin(c);
    for (u64 p = start; p < start + len; p += PAGE) {
        volatile u64 *q = (volatile u64 *)p;
        u64 t0 = tsc();
        u64 v0 = q[0];
        u64 t1 = tsc();
        record(c, t0, t1);
        for (u64 i = 0; i < QWORDS; i++) {
            u64 v = i ? q[i] : v0;
            u64 want = seed ? pattern(p + i * 8, seed) : 0;
            if (v != want) {
                if (!bad) first_bad = p + i * 8;
                bad++;
            }
        }
    }
    report(c);
    result64(c, bad);
    result64(c, first_bad);
}

static void cmd_checksum(struct cmd *c, u64 start, u64 len, u64 chunk) {
    if (chunk == 0 || chunk > len) chunk = len;
    u64 chunks = (len + chunk - 1) / chunk;
    begin(c);
    /* Results go out after the histogram, so the sums wait in the stack area's tail. */
    u64 sums[CHECKSUM_MAX_CHUNKS];
    if (chunks > CHECKSUM_MAX_CHUNKS) chunks = CHECKSUM_MAX_CHUNKS;
    for (u64 k = 0; k < chunks; k++) {
        u64 lo = start + k * chunk, hi = lo + chunk > start + len ? start + len : lo + chunk;
        u64 s = 0;
        for (u64 p = lo; p < hi; p += PAGE) {
            volatile u64 *q = (volatile u64 *)p;
            u64 t0 = tsc();
            u64 v0 = q[0];
            u64 t1 = tsc();
            record(c, t0, t1);
            s += checksum_term(v0, p);
            for (u64 i = 1; i < QWORDS; i++) s += checksum_term(q[i], p + i * 8);
        }
        sums[k] = s;
    }
    report(c);
    result32(c, (u32)chunks);
    for (u64 k = 0; k < chunks; k++) result64(c, sums[k]);
}

static u32 cmd_balloon(struct cmd *c, u64 start, u64 len) {
    /* Ask the host to take the range back (it discards the pages); afterwards the range
       reads as zero. */
    outl(BALLOON_PORT + BALLOON_ADDR_LO, (u32)start);
    outl(BALLOON_PORT + BALLOON_ADDR_HI, (u32)(start >> 32));
    outl(BALLOON_PORT + BALLOON_LEN_LO, (u32)len);
    outl(BALLOON_PORT + BALLOON_LEN_HI, (u32)(len >> 32));
    u32 status = inl(BALLOON_PORT + BALLOON_GO);
    result32(c, status);
    return status;
}

/* ---- the torture workload -------------------------------------------------------------- */
/* xorshift64*: the guest decides its own random work from the seed the host passes. */
static inline u64 rng_next(u64 *s) {
    u64 x = *s;
    x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DUL;
}

struct torture {
    u64 writes, verifies, balloons, checked, bad, bad_addr, bad_want, bad_got;
};

/* Check page p (guest-physical) against version v; the first wrong qword is kept. */
static void torture_check(struct cmd *c, struct torture *t, u64 p, u32 v) {
    volatile u64 *q = (volatile u64 *)p;
    u64 t0 = tsc();
    u64 v0 = q[0];
    record(c, t0, tsc());
    for (u64 i = 0; i < QWORDS; i++) {
        u64 got = i ? q[i] : v0;
        u64 want = v ? pattern(p + i * 8, v) : 0;
        if (got != want) {
            if (!t->bad) { t->bad_addr = p + i * 8; t->bad_want = v; t->bad_got = got; }
            t->bad++;
        }
    }
    t->checked++;
}

/* Seeded random runs over this vCPU's own pages [start, start+len): write the next version of
   every page of a run, verify a run, or (with TORTURE_BALLOON) give a run back, after which it
   must read as zeros. Each page's version is a u32 in the table at `table` -- guest memory too,
   so it is swapped out and faulted back like the data. Runs are 1-16 pages, one in eight up to
   600 (across 2 MiB boundaries). The command stops at the first wrong page. */
static void cmd_torture(struct cmd *c, u64 start, u64 len, u64 table, u64 seed, u64 ops_flags) {
    u64 ops = ops_flags & 0xFFFFFFFFUL, flags = ops_flags >> 32;
    u64 pages = len / PAGE;
    volatile u32 *ver = (volatile u32 *)table;
    struct torture t = {0};
    u64 s = mix(seed) | 1;
    begin(c);
    if (flags & TORTURE_CHECK_ALL) {
        for (u64 i = 0; i < pages && !t.bad; i++) torture_check(c, &t, start + i * PAGE, ver[i]);
        ops = 0;
    }
    for (u64 k = 0; k < ops && !t.bad && pages; k++) {
        u64 r = rng_next(&s);
        u64 first = (r >> 8) % pages;
        u64 n = 1 + (((r >> 40) & 7) == 0 ? (r >> 44) % 600 : (r >> 44) % 16);
        if (first + n > pages) n = pages - first;
        u32 kind = (u32)(r & 15);
        if (kind < 6) {
            for (u64 i = first; i < first + n; i++) {
                u32 v = ver[i] + 1;
                if (v == 0) v = 1;
                ver[i] = v;
                u64 *w = (u64 *)(start + i * PAGE);
                for (u64 j = 0; j < QWORDS; j++) w[j] = pattern(start + i * PAGE + j * 8, v);
            }
            t.writes++;
        } else if (kind < 15 || !(flags & TORTURE_BALLOON)) {
            for (u64 i = first; i < first + n && !t.bad; i++)
                torture_check(c, &t, start + i * PAGE, ver[i]);
            t.verifies++;
        } else {
            u64 a = start + first * PAGE, l = n * PAGE;
            outl(BALLOON_PORT + BALLOON_ADDR_LO, (u32)a);
            outl(BALLOON_PORT + BALLOON_ADDR_HI, (u32)(a >> 32));
            outl(BALLOON_PORT + BALLOON_LEN_LO, (u32)l);
            outl(BALLOON_PORT + BALLOON_LEN_HI, (u32)(l >> 32));
            if (inl(BALLOON_PORT + BALLOON_GO) != 0) {
                /* Refused: the pages keep what they held. Reported as a mismatch at a. */
                t.bad_addr = a; t.bad_want = ~0U; t.bad_got = 0; t.bad++;
                break;
            }
            for (u64 i = first; i < first + n; i++) ver[i] = 0;
            t.balloons++;
        }
    }
    report(c);
    result64(c, t.writes); result64(c, t.verifies); result64(c, t.balloons);
    result64(c, t.checked); result64(c, t.bad); result64(c, t.bad_addr);
    result64(c, t.bad_want); result64(c, t.bad_got);
}

/* ---- exceptions: report and stop, never run on with a broken state ---------------------- */
struct idt_entry { u16 off0; u16 sel; u8 ist; u8 type; u16 off1; u32 off2; u32 zero; };
#define IDT_ENTRIES 32
static struct idt_entry idt[IDT_ENTRIES];
extern char exc_stubs[];
#define EXC_STUB_SIZE 16

void exception_report(u64 *frame) {
    /* frame: vector, error code, rip, cs, rflags, rsp, ss (pushed by the stub and the CPU) */
    u64 rsp = (u64)frame;
    u64 cpu = (rsp - STACKS_BASE) / STACK_SIZE;
    u16 port = PORT_BASE + cpu * PORT_STRIDE;
    u64 vals[6] = { frame[0], frame[1], frame[2], read_cr2(), frame[3], frame[4] };
    for (int i = 0; i < 6; i++) {
        outl(port + PORT_RESULT, (u32)vals[i]);
        outl(port + PORT_RESULT, (u32)(vals[i] >> 32));
    }
    outl(port + PORT_DONE, STATUS_EXCEPTION | (u32)frame[0]);
    for (;;) __asm__ volatile("cli; hlt");
}

/* Ring 0, runs once per vCPU from _start. */
void kernel_init(void) {
    for (int v = 0; v < IDT_ENTRIES; v++) {
        u64 h = (u64)exc_stubs + (u64)v * EXC_STUB_SIZE;
        idt[v].off0 = (u16)h;
        idt[v].sel = CODE_SELECTOR;
        idt[v].ist = 0;
        idt[v].type = 0x8E; /* present, DPL 0, 64-bit interrupt gate */
        idt[v].off1 = (u16)(h >> 16);
        idt[v].off2 = (u32)(h >> 32);
        idt[v].zero = 0;
    }
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr = { sizeof idt - 1, (u64)idt };
    __asm__ volatile("lidt %0" : : "m"(idtr));
}

/* ---- the command loop (ring 3) ----------------------------------------------------------- */
void guest_main(u64 cpu) {
    static struct cmd cmds[MAX_VCPUS];
    struct cmd *c = &cmds[cpu];
    c->port = PORT_BASE + cpu * PORT_STRIDE;
    for (;;) {
        u32 op = inl(c->port + PORT_CMD);
        u32 status = 0;
        switch (op) {
        case OP_NOP:
            break;
        case OP_FILL: {
            u64 start = arg64(c->port), len = arg64(c->port), seed = arg64(c->port);
            cmd_fill(c, start, len, seed);
            break;
        }
        case OP_READ: {
            u64 start = arg64(c->port), len = arg64(c->port);
            cmd_read(c, start, len);
            break;
        }
        case OP_VERIFY: {
            u64 start = arg64(c->port), len = arg64(c->port), seed = arg64(c->port);
            cmd_verify(c, start, len, seed);
            break;
        }
        case OP_CHECKSUM: {
            u64 start = arg64(c->port), len = arg64(c->port), chunk = arg64(c->port);
            cmd_checksum(c, start, len, chunk);
            break;
        }
        case OP_BALLOON: {
            u64 start = arg64(c->port), len = arg64(c->port);
            status = cmd_balloon(c, start, len);
            break;
        }
        case OP_TORTURE: {
            u64 start = arg64(c->port), len = arg64(c->port), table = arg64(c->port);
            u64 seed = arg64(c->port), ops_flags = arg64(c->port);
            cmd_torture(c, start, len, table, seed, ops_flags);
            break;
        }
        case OP_EXIT:
            /* The host ends this vCPU when it sees DONE for EXIT (HLT needs ring 0, and a
               software interrupt gate is not usable from ring 3 under every KVM). */
            outl(c->port + PORT_DONE, 0);
            for (;;) __asm__ volatile("pause");
        default:
            status = STATUS_BAD_OPCODE;
        }
        outl(c->port + PORT_DONE, status);
    }
}

/* ---- entry and exception stubs ---------------------------------------------------------- */
__asm__(
    ".section .text.entry, \"ax\"\n"
    ".globl _start\n"
    "_start:\n"
    "    cld\n"
    "    mov %rdi, %rbx\n"
    "    mov %rsi, %r12\n"
    "    call kernel_init\n"
    "    mov %rbx, %rdi\n"
    /* iretq to guest_main in ring 3: ss, rsp, rflags (IOPL 3, IF 0), cs, rip */
    "    sub $8, %r12\n"
    "    pushq $" STR(USER_DATA_SELECTOR) "\n"
    "    pushq %r12\n"
    "    pushq $0x3002\n"
    "    pushq $" STR(USER_CODE_SELECTOR) "\n"
    "    lea guest_main(%rip), %rax\n"
    "    pushq %rax\n"
    "    iretq\n"
    ".text\n"
    /* Each stub is EXC_STUB_SIZE bytes: push a zero error code where the CPU does not, push
       the vector, jump to the common path. */
    ".balign 16\n"
    ".globl exc_stubs\n"
    "exc_stubs:\n"
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n"
    "    .balign 16\n"
    "    .if (\\v == 8) || (\\v >= 10 && \\v <= 14) || (\\v == 17) || (\\v == 21) || (\\v == 29) || (\\v == 30)\n"
    "    .else\n"
    "    pushq $0\n"
    "    .endif\n"
    "    pushq $\\v\n"
    "    jmp exc_common\n"
    ".endr\n"
    "exc_common:\n"
    "    mov %rsp, %rdi\n"
    "    and $-16, %rsp\n"
    "    call exception_report\n"
);
