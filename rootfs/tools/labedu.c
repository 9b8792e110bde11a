/*
 * labedu: drives QEMU's edu device from the lab's L3 guest, where molt passes
 * it through with --vfio, through the labedu module's /dev/labedu (see
 * labedu/labedu.c: BAR 0 and a DMA buffer to mmap, MSI counts to read and
 * poll). Checks, each printed as `EDU-CHECK NAME PASS|FAIL detail`:
 *
 *   id         the ID register (0x00) reads 0x010000ed
 *   live       the liveness register (0x04) reads back the complement
 *   fact       factorials (0x08, busy bit 0x01 of status 0x20) are right
 *   fact_irq   a factorial with status bit 0x80 set raises an MSI
 *   dma_to     a pattern DMA'd from guest RAM into edu's buffer (0x40000)
 *              completes with an MSI (each DMA takes edu's 100 ms timer)
 *   dma_from   ... and DMA'd back into a cleared guest buffer is the pattern,
 *              with not a byte more written
 *   irqs       the driver handled exactly one MSI per interrupt asked for
 *
 * then `EDU-RESULT pass=N fail=M`. Exit status 0 if every check passed.
 * Usage: labedu [SEED]   (SEED varies the values and the DMA pattern)
 *
 * For live updates (the vfio-cpr scenario), state that must outlive them and
 * a load that runs through them:
 *
 *   labedu keep SEED    computes a factorial (left in the factorial register)
 *                       and DMAs a pattern into the second half of edu's
 *                       buffer, which nothing else touches: `keep_set`
 *   labedu kept SEED    reads both back without writing either: `kept_fact`
 *                       (the register, not recomputed) and `kept_buf` (DMA'd
 *                       out of edu into a cleared buffer)
 *   labedu loop SEED STOP RESULT
 *                       until the file STOP exists: the ID and liveness
 *                       registers, then a pattern DMA'd into the first half of
 *                       edu's buffer and back, each DMA announced on stdout
 *                       (`EDU-DMA N`, just before it starts) and completed by
 *                       an MSI; writes `EDU-CHECK loop PASS|FAIL ...` (every
 *                       iteration right, one MSI per DMA) to RESULT, then
 *                       RESULT.done
 */
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define BAR_SIZE	(1UL << 20)
#define BUF_SIZE	4096
#define REG_ID		0x00
#define REG_LIVE	0x04
#define REG_FACT	0x08
#define REG_STATUS	0x20
#define STATUS_BUSY	0x01
#define STATUS_IRQFACT	0x80
#define REG_DMA_SRC	0x80
#define REG_DMA_DST	0x88
#define REG_DMA_CNT	0x90
#define REG_DMA_CMD	0x98
#define DMA_RUN		0x1
#define DMA_TO_RAM	0x2
#define DMA_IRQ		0x4
#define EDU_BUF		0x40000
/*
 * Half of edu's 4 KiB buffer: QEMU 7.2's edu (Debian's, the lab's L1) takes a
 * DMA that ends at the buffer's last byte for out of bounds (its range check
 * is off by one) and aborts QEMU with a hardware error.
 */
#define DMA_LEN		2048
/* The kept pattern: in the buffer's second half, short of its last byte. */
#define KEEP_AT		(EDU_BUF + 2048)
#define KEEP_LEN	1024
#define IRQ_WAIT_MS	5000
/* In the loop an MSI may wait out an update's pause (or a failed one's). */
#define LOOP_WAIT_MS	20000

static int irq_wait_ms = IRQ_WAIT_MS;

static volatile uint32_t *bar;
static int dev;
static int passed, failed;

static void __attribute__((format(printf, 3, 4)))
check(const char *name, int ok, const char *fmt, ...)
{
	va_list ap;

	printf("EDU-CHECK %s %s ", name, ok ? "PASS" : "FAIL");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	if (ok)
		passed++;
	else
		failed++;
}

static uint32_t rd(unsigned off) { return bar[off / 4]; }
static void wr(unsigned off, uint32_t v) { bar[off / 4] = v; }

struct info { uint64_t irqs, dma_addr; };

static struct info info(void)
{
	struct info i = { 0, 0 };

	if (read(dev, &i, sizeof(i)) != sizeof(i))
		perror("labedu: read /dev/labedu");
	return i;
}

static double now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* Waits for an MSI after the last info(); returns the ms waited, or -1. */
static double wait_irq(void)
{
	struct pollfd p = { .fd = dev, .events = POLLIN };
	double t0 = now_ms();

	if (poll(&p, 1, irq_wait_ms) != 1)
		return -1;
	return now_ms() - t0;
}

/* Waits for the factorial unit; 0 when it finished within 2 s. */
static int fact_wait(void)
{
	double t0 = now_ms();

	while (rd(REG_STATUS) & STATUS_BUSY)
		if (now_ms() - t0 > 2000)
			return -1;
	return 0;
}

static uint32_t factorial(uint32_t n)
{
	uint32_t r = 1;

	while (n > 0)
		r *= n--;
	return r;
}

/* Starts a DMA of LEN bytes and waits for its MSI; 0 on success. */
static int dma_len(uint64_t src, uint64_t dst, uint32_t len, uint32_t dir, double *ms)
{
	info();
	wr(REG_DMA_SRC, (uint32_t)src);
	wr(REG_DMA_DST, (uint32_t)dst);
	wr(REG_DMA_CNT, len);
	wr(REG_DMA_CMD, DMA_RUN | dir | DMA_IRQ);
	*ms = wait_irq();
	return *ms < 0 || (rd(REG_DMA_CMD) & DMA_RUN) ? -1 : 0;
}

static int dma(uint64_t src, uint64_t dst, uint32_t dir, double *ms)
{
	return dma_len(src, dst, DMA_LEN, dir, ms);
}

static uint8_t *buf;

/* The kept factorial's argument and the kept pattern's bytes. */
static uint32_t keep_n(uint32_t seed) { return 10 + seed % 3; }
static uint8_t keep_byte(uint32_t seed, unsigned k) { return (uint8_t)(k * 13 + seed * 31 + 1); }

static int keep(uint32_t seed)
{
	struct info i = info();
	double ms;
	int ok;

	wr(REG_FACT, keep_n(seed));
	ok = fact_wait() == 0 && rd(REG_FACT) == factorial(keep_n(seed));
	for (unsigned k = 0; k < KEEP_LEN; k++)
		buf[k] = keep_byte(seed, k);
	ok &= dma_len(i.dma_addr, KEEP_AT, KEEP_LEN, 0, &ms) == 0;
	check("keep_set", ok, "fact(%u)=%u pattern=%u bytes at %#x", keep_n(seed),
	      rd(REG_FACT), KEEP_LEN, KEEP_AT);
	return ok ? 0 : 1;
}

static int kept(uint32_t seed)
{
	struct info i = info();
	uint32_t f = rd(REG_FACT);
	double ms;
	int ok;

	check("kept_fact", !(rd(REG_STATUS) & STATUS_BUSY) && f == factorial(keep_n(seed)),
	      "%u, want fact(%u)=%u", f, keep_n(seed), factorial(keep_n(seed)));
	memset(buf, 0, BUF_SIZE);
	ok = dma_len(KEEP_AT, i.dma_addr, KEEP_LEN, DMA_TO_RAM, &ms) == 0;
	for (unsigned k = 0; ok && k < BUF_SIZE; k++)
		ok = buf[k] == (k < KEEP_LEN ? keep_byte(seed, k) : 0);
	check("kept_buf", ok, "%u bytes at %#x msi_after_ms=%.1f", KEEP_LEN, KEEP_AT, ms);
	return failed ? 1 : 0;
}

static int loop(uint32_t seed, const char *stop, const char *result)
{
	struct info start = info(), i;
	unsigned long it = 0, bad = 0;
	double ms, max_ms = 0;
	char done[256];
	FILE *out;

	irq_wait_ms = LOOP_WAIT_MS;
	while (access(stop, F_OK) != 0) {
		uint32_t x = seed * 0x9e3779b9u + (uint32_t)it * 0x01000193u;
		const char *why = NULL;

		if (rd(REG_ID) != 0x010000ed)
			why = "id";
		wr(REG_LIVE, x);
		if (!why && rd(REG_LIVE) != (uint32_t)~x)
			why = "live";
		i = info();
		for (unsigned k = 0; k < DMA_LEN; k++)
			buf[k] = (uint8_t)(k * 7 + x);
		printf("EDU-DMA %lu\n", it);
		fflush(stdout);
		if (!why && dma(i.dma_addr, EDU_BUF, 0, &ms) != 0)
			why = "dma_to";
		if (ms > max_ms)
			max_ms = ms;
		memset(buf, 0, BUF_SIZE);
		if (!why && dma(EDU_BUF, i.dma_addr, DMA_TO_RAM, &ms) != 0)
			why = "dma_from";
		if (ms > max_ms)
			max_ms = ms;
		for (unsigned k = 0; !why && k < BUF_SIZE; k++)
			if (buf[k] != (k < DMA_LEN ? (uint8_t)(k * 7 + x) : 0))
				why = "pattern";
		if (why) {
			bad++;
			printf("EDU-LOOP-FAIL %lu %s\n", it, why);
			fflush(stdout);
		}
		it++;
	}
	i = info();
	out = fopen(result, "w");
	if (!out)
		return 2;
	fprintf(out, "EDU-CHECK loop %s iterations=%lu bad=%lu msis=%llu max_msi_ms=%.1f\n",
		it > 0 && bad == 0 && i.irqs - start.irqs == 2 * it ? "PASS" : "FAIL",
		it, bad, (unsigned long long)(i.irqs - start.irqs), max_ms);
	fclose(out);
	snprintf(done, sizeof(done), "%s.done", result);
	out = fopen(done, "w");
	if (out)
		fclose(out);
	return bad ? 1 : 0;
}

int main(int argc, char **argv)
{
	static const uint32_t ns[] = { 0, 1, 5, 10, 12 };
	const char *mode = argc > 1 && (argv[1][0] < '0' || argv[1][0] > '9') ? argv[1] : NULL;
	uint32_t seed;
	struct info start, i;
	double ms;
	int ok;

	if (mode) {
		argv++;
		argc--;
	}
	seed = argc > 1 ? (uint32_t)strtoul(argv[1], NULL, 0) : 1;
	dev = open("/dev/labedu", O_RDWR);
	if (dev < 0) {
		perror("labedu: open /dev/labedu (is the labedu module loaded?)");
		return 2;
	}
	bar = mmap(NULL, BAR_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, dev, 0);
	buf = mmap(NULL, BUF_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, dev, BAR_SIZE);
	if (bar == MAP_FAILED || buf == MAP_FAILED) {
		perror("labedu: mmap");
		return 2;
	}
	if (mode && !strcmp(mode, "keep"))
		return keep(seed);
	if (mode && !strcmp(mode, "kept"))
		return kept(seed);
	if (mode && !strcmp(mode, "loop") && argc > 3)
		return loop(seed, argv[2], argv[3]);
	if (mode) {
		fprintf(stderr, "usage: labedu [SEED] | keep SEED | kept SEED | loop SEED STOP RESULT\n");
		return 2;
	}
	start = info();

	check("id", rd(REG_ID) == 0x010000ed, "%#010x", rd(REG_ID));

	ok = 1;
	for (uint32_t k = 0; k < 3; k++) {
		uint32_t x = seed * 0x9e3779b9u + k * 0x01000193u;

		wr(REG_LIVE, x);
		ok &= rd(REG_LIVE) == (uint32_t)~x;
	}
	check("live", ok, "last %#010x", rd(REG_LIVE));

	ok = 1;
	for (unsigned k = 0; k < sizeof(ns) / sizeof(ns[0]); k++) {
		uint32_t n = (ns[k] + seed) % 13;

		wr(REG_FACT, n);
		ok &= fact_wait() == 0 && rd(REG_FACT) == factorial(n);
	}
	check("fact", ok, "last %u", rd(REG_FACT));

	info();
	wr(REG_STATUS, STATUS_IRQFACT);
	wr(REG_FACT, 7);
	ms = wait_irq();
	ok = ms >= 0 && fact_wait() == 0 && rd(REG_FACT) == 5040;
	wr(REG_STATUS, 0);
	check("fact_irq", ok, "msi_after_ms=%.1f", ms);

	i = info();
	for (unsigned k = 0; k < DMA_LEN; k++)
		buf[k] = (uint8_t)(k * 7 + seed);
	ok = dma(i.dma_addr, EDU_BUF, 0, &ms) == 0;
	check("dma_to", ok, "ram=%#llx msi_after_ms=%.1f",
	      (unsigned long long)i.dma_addr, ms);

	memset(buf, 0, BUF_SIZE);
	ok = dma(EDU_BUF, i.dma_addr, DMA_TO_RAM, &ms) == 0;
	for (unsigned k = 0; ok && k < BUF_SIZE; k++)
		ok = buf[k] == (k < DMA_LEN ? (uint8_t)(k * 7 + seed) : 0);
	check("dma_from", ok, "msi_after_ms=%.1f", ms);

	i = info();
	check("irqs", i.irqs - start.irqs == 3, "%llu",
	      (unsigned long long)(i.irqs - start.irqs));

	printf("EDU-RESULT pass=%d fail=%d\n", passed, failed);
	return failed ? 1 : 0;
}
