/* XSAVE as the L3 guest sees it, for the xsave lab scenario (and anyone
 * debugging FPU trouble in the lab). Built static into the guest image.
 *
 *   labxcr info        one line: `xcr0=0xN osxsave=B avx=B d0_eax=0xN d0_ebx=N
 *       d0_ecx=N d0_edx=0xN d1_eax=0xN d1_ebx=N`: XGETBV(0) (the XSAVE
 *       components enabled right now), CPUID.1 OSXSAVE and AVX, CPUID(0xD,0)
 *       (EAX/EDX: the components offered; EBX: the XSAVE size for the
 *       current XCR0; ECX: for all offered) and CPUID(0xD,1) (EAX: XSAVEOPT,
 *       XSAVEC, XGETBV1, XSAVES; EBX: the compacted size for XCR0 | IA32_XSS).
 *   labxcr xmm SECS [PROCS]  PROCS processes (default 3), all pinned to CPU 0
 *       so the kernel switches between them, each fill xmm0-xmm15 with a
 *       pattern of their own, yield (sched_yield straight from assembly, so
 *       no library code touches the registers), read them back and compare,
 *       for SECS seconds. Prints `rounds=N bad=M`: M > 0 means a context
 *       switch lost or mixed up SSE registers, which is what happens when the
 *       XSAVE/XRSTOR the kernel switches with does not cover SSE state (XCR0
 *       without bit 1). Exit 0 if bad=0.
 * Exit status 2 on usage errors. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (uint64_t)hi << 32 | lo;
}

static int cmd_info(void) {
    unsigned a, b, c, d;
    __cpuid(1, a, b, c, d);
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
    /* XGETBV is #UD without CR4.OSXSAVE: report instead of crashing. */
    unsigned long long xcr0 = osxsave ? xgetbv0() : 0;
    unsigned d0a, d0b, d0c, d0d, d1a, d1b, d1c, d1d;
    __cpuid_count(0xd, 0, d0a, d0b, d0c, d0d);
    __cpuid_count(0xd, 1, d1a, d1b, d1c, d1d);
    printf("xcr0=%#llx osxsave=%d avx=%d d0_eax=%#x d0_ebx=%u d0_ecx=%u d0_edx=%#x d1_eax=%#x d1_ebx=%u\n",
           xcr0, osxsave, avx, d0a, d0b, d0c, d0d, d1a, d1b);
    return 0;
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

/* Loads IN into xmm0-15, yields the CPU, stores them to OUT. */
static void yield_with_xmm(const unsigned char *in, unsigned char *out) {
    __asm__ volatile(
        "movdqu 0(%0), %%xmm0\n\t"   "movdqu 16(%0), %%xmm1\n\t"
        "movdqu 32(%0), %%xmm2\n\t"  "movdqu 48(%0), %%xmm3\n\t"
        "movdqu 64(%0), %%xmm4\n\t"  "movdqu 80(%0), %%xmm5\n\t"
        "movdqu 96(%0), %%xmm6\n\t"  "movdqu 112(%0), %%xmm7\n\t"
        "movdqu 128(%0), %%xmm8\n\t" "movdqu 144(%0), %%xmm9\n\t"
        "movdqu 160(%0), %%xmm10\n\t" "movdqu 176(%0), %%xmm11\n\t"
        "movdqu 192(%0), %%xmm12\n\t" "movdqu 208(%0), %%xmm13\n\t"
        "movdqu 224(%0), %%xmm14\n\t" "movdqu 240(%0), %%xmm15\n\t"
        "mov $24, %%eax\n\t" /* sched_yield */
        "syscall\n\t"
        "movdqu %%xmm0, 0(%1)\n\t"   "movdqu %%xmm1, 16(%1)\n\t"
        "movdqu %%xmm2, 32(%1)\n\t"  "movdqu %%xmm3, 48(%1)\n\t"
        "movdqu %%xmm4, 64(%1)\n\t"  "movdqu %%xmm5, 80(%1)\n\t"
        "movdqu %%xmm6, 96(%1)\n\t"  "movdqu %%xmm7, 112(%1)\n\t"
        "movdqu %%xmm8, 128(%1)\n\t" "movdqu %%xmm9, 144(%1)\n\t"
        "movdqu %%xmm10, 160(%1)\n\t" "movdqu %%xmm11, 176(%1)\n\t"
        "movdqu %%xmm12, 192(%1)\n\t" "movdqu %%xmm13, 208(%1)\n\t"
        "movdqu %%xmm14, 224(%1)\n\t" "movdqu %%xmm15, 240(%1)\n\t"
        :
        : "r"(in), "r"(out)
        : "rax", "rcx", "r11", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5",
          "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}

static int cmd_xmm(int secs, int procs) {
    /* Per process: rounds and mismatches, in memory shared with the parent. */
    long long *counts = mmap(NULL, 2 * sizeof(long long) * procs, PROT_READ | PROT_WRITE,
                             MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (counts == MAP_FAILED) { perror("labxcr: mmap"); return 1; }
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(0, &one);
    long long end = now_ms() + secs * 1000LL;
    for (int p = 0; p < procs; p++) {
        pid_t pid = fork();
        if (pid < 0) { perror("labxcr: fork"); return 1; }
        if (pid) continue;
        sched_setaffinity(0, sizeof one, &one);
        unsigned char in[256], out[256];
        unsigned x = 0x9e3779b9u * (p + 1);
        long long rounds = 0, bad = 0;
        while (now_ms() < end) {
            for (int i = 0; i < 256; i++) { x = x * 1103515245u + 12345u; in[i] = x >> 24; }
            for (int i = 0; i < 64; i++) {
                yield_with_xmm(in, out);
                rounds++;
                if (memcmp(in, out, sizeof in)) bad++;
            }
        }
        counts[2 * p] = rounds;
        counts[2 * p + 1] = bad;
        _exit(0);
    }
    long long rounds = 0, bad = 0;
    for (int p = 0; p < procs; p++) wait(NULL);
    for (int p = 0; p < procs; p++) { rounds += counts[2 * p]; bad += counts[2 * p + 1]; }
    printf("rounds=%lld bad=%lld\n", rounds, bad);
    return bad != 0;
}

int main(int argc, char **argv) {
    const char *c = argc > 1 ? argv[1] : "";
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!strcmp(c, "info") && argc == 2) return cmd_info();
    if (!strcmp(c, "xmm") && (argc == 3 || argc == 4))
        return cmd_xmm(atoi(argv[2]), argc == 4 ? atoi(argv[3]) : 3);
    fprintf(stderr, "usage: labxcr info | xmm SECS [PROCS]\n");
    return 2;
}
