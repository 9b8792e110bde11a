/* I/O helper for the lab's device scenarios, built static into both images
 * (L2 host and L3 guest). busybox nc cannot time a transfer or report exact
 * byte counts, and busybox has no random-read tool; this does both with one
 * line of `key=value` output that the scenarios parse.
 *
 *   labio send HOST PORT SRC [SECS]   connect (retrying for SECS, default 60),
 *       send SRC, shut down the write side and wait for the peer to close.
 *       SRC is a file, or `zero:BYTES` for a generated stream (benchmarks),
 *       or `seq:DURATION` for the checkable stream (below) for DURATION seconds.
 *   labio recv PORT DST [SECS]        listen on PORT, accept one connection
 *       within SECS (default 60), write what arrives to DST (`-` discards) until
 *       EOF, then close. DST `seq` checks that the stream is the one `seq:`
 *       sends and adds `bad=N` (bytes that differ) to the report.
 *       Both print `bytes=N us=T mbps=R`; T runs from the
 *       connection being established to the last byte (send: the peer's close,
 *       which it sends only after reading everything). Both give up, with
 *       `stalled` on stderr and status 1, when the connection makes no progress
 *       for SECS: a scenario must not hang on a stuck NIC.
 *   labio seqwrite DEV MIB [KIB]      O_DIRECT sequential write of MIB MiB in
 *       KIB-KiB blocks (default 1024) from offset 0, fdatasync included.
 *   labio seqread DEV MIB [KIB]       O_DIRECT sequential read, the same way.
 *       Both print `bytes=N us=T mbps=R`.
 *   labio randread DEV SECS [KIB]     O_DIRECT reads of KIB-KiB blocks
 *       (default 4) at random aligned offsets for SECS seconds; prints
 *       `ops=N us=T iops=R`.
 * Exit status 0 on success, 1 on failure (with a message on stderr). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define BUF (1 << 20)

/* The checkable stream: 64-bit little-endian words, word i = i * SEQ_K. Every
 * word differs from every other, so a lost, repeated, reordered or changed
 * byte anywhere shows; checking costs one compare per word. */
#define SEQ_K 0x9e3779b97f4a7c15ULL

/* Fills BUF (BUF bytes, a multiple of 8) with the words from index *I on. */
static void seq_fill(char *buf, unsigned long long *i) {
    unsigned long long w = *i * SEQ_K;
    for (size_t off = 0; off < BUF; off += 8, w += SEQ_K) memcpy(buf + off, &w, 8);
    *i += BUF / 8;
}

/* Checks N received bytes that continue the stream at byte offset *AT;
 * returns how many differ. */
static long long seq_check(const unsigned char *p, size_t n, unsigned long long *at) {
    long long bad = 0;
    unsigned long long off = *at;
    size_t k = 0;
    /* Byte by byte up to a word boundary of the stream, then whole words. */
    for (; k < n && (off & 7); k++, off++)
        bad += p[k] != (unsigned char)(((off >> 3) * SEQ_K) >> (8 * (off & 7)));
    for (unsigned long long w = (off >> 3) * SEQ_K; k + 8 <= n; k += 8, off += 8, w += SEQ_K) {
        unsigned long long got;
        memcpy(&got, p + k, 8);
        if (got != w)
            for (int b = 0; b < 8; b++) bad += (unsigned char)(got >> (8 * b)) != (unsigned char)(w >> (8 * b));
    }
    for (; k < n; k++, off++)
        bad += p[k] != (unsigned char)(((off >> 3) * SEQ_K) >> (8 * (off & 7)));
    *at = off;
    return bad;
}

static long long now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

static int die(const char *what) {
    fprintf(stderr, "labio: %s: %s\n", what, strerror(errno));
    return 1;
}

/* Reads and writes on S fail with EAGAIN after SECS without progress. */
static void stall_timeout(int s, int secs) {
    struct timeval tv = { .tv_sec = secs };
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static int io_fail(const char *what, long long done) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
        fprintf(stderr, "labio: %s: stalled after %lld bytes\n", what, done);
        return 1;
    }
    return die(what);
}

/* MB/s with MB = 10^6 bytes, as dd and iperf report it. */
static void report(long long bytes, long long us) {
    if (us < 1) us = 1;
    printf("bytes=%lld us=%lld mbps=%.2f\n", bytes, us, bytes / (double)us);
}

static int cmd_send(const char *host, int port, const char *src, int secs) {
    long long total = -1, sent = 0, seq_us = -1;
    unsigned long long seq_i = 0;
    int in = -1;
    if (!strncmp(src, "zero:", 5)) {
        total = atoll(src + 5);
    } else if (!strncmp(src, "seq:", 4)) {
        seq_us = atoll(src + 4) * 1000000LL;
    } else if ((in = open(src, O_RDONLY)) < 0) {
        return die(src);
    }
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) { fprintf(stderr, "labio: bad address %s\n", host); return 1; }
    /* The receiver may still be starting (another VM's shell): retry refusals. */
    long long deadline = now_us() + secs * 1000000LL;
    int s;
    for (;;) {
        s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0) return die("socket");
        if (connect(s, (struct sockaddr *)&sa, sizeof sa) == 0) break;
        int e = errno;
        close(s);
        errno = e;
        if (now_us() >= deadline || (e != ECONNREFUSED && e != EHOSTUNREACH && e != ENETUNREACH && e != ETIMEDOUT))
            return die("connect");
        usleep(100000);
    }
    stall_timeout(s, secs);
    long long t0 = now_us();
    static char buf[BUF];
    if (total >= 0) memset(buf, 0x5a, sizeof buf);
    for (;;) {
        ssize_t n;
        if (seq_us >= 0) {
            if (now_us() - t0 >= seq_us) break;
            seq_fill(buf, &seq_i);
            n = BUF;
        } else if (in >= 0) {
            n = read(in, buf, sizeof buf);
            if (n < 0) return die("read");
        } else {
            n = total - sent < BUF ? total - sent : BUF;
        }
        if (n == 0) break;
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(s, buf + off, n - off);
            if (w < 0) { if (errno == EINTR) continue; return io_fail("send", sent + off); }
            off += w;
        }
        sent += n;
    }
    if (shutdown(s, SHUT_WR)) return die("shutdown");
    /* The receiver closes after it has read everything: that is the end. */
    for (;;) {
        ssize_t n = read(s, buf, sizeof buf);
        if (n < 0) { if (errno == EINTR) continue; return io_fail("wait for close", sent); }
        if (n == 0) break;
    }
    report(sent, now_us() - t0);
    return 0;
}

static int cmd_recv(int port, const char *dst, int secs) {
    int out = -1, seq = !strcmp(dst, "seq");
    unsigned long long seq_at = 0;
    long long bad = 0;
    if (strcmp(dst, "-") && !seq && (out = open(dst, O_WRONLY | O_CREAT | O_TRUNC, 0644)) < 0) return die(dst);
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (l < 0) return die("socket");
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = INADDR_ANY };
    if (bind(l, (struct sockaddr *)&sa, sizeof sa) || listen(l, 1)) return die("bind/listen");
    struct pollfd p = { .fd = l, .events = POLLIN };
    int r = poll(&p, 1, secs * 1000);
    if (r <= 0) { fprintf(stderr, "labio: no connection within %d s\n", secs); return 1; }
    int s = accept(l, NULL, NULL);
    if (s < 0) return die("accept");
    stall_timeout(s, secs);
    long long t0 = now_us(), got = 0;
    static char buf[BUF];
    for (;;) {
        ssize_t n = read(s, buf, sizeof buf);
        if (n < 0) { if (errno == EINTR) continue; return io_fail("recv", got); }
        if (n == 0) break;
        got += n;
        if (seq) bad += seq_check((unsigned char *)buf, n, &seq_at);
        for (ssize_t off = 0; out >= 0 && off < n;) {
            ssize_t w = write(out, buf + off, n - off);
            if (w < 0) return die("write");
            off += w;
        }
    }
    long long us = now_us() - t0;
    if (out >= 0 && close(out)) return die("close");
    close(s);
    if (seq) {
        if (us < 1) us = 1;
        printf("bytes=%lld us=%lld mbps=%.2f bad=%lld\n", got, us, got / (double)us, bad);
        return bad != 0;
    }
    report(got, us);
    return 0;
}

static void *aligned(size_t n) {
    void *p;
    if (posix_memalign(&p, 4096, n)) return NULL;
    memset(p, 0xa5, n);
    return p;
}

static int cmd_seq(const char *dev, int write_, long long mib, long long kib) {
    int fd = open(dev, (write_ ? O_WRONLY : O_RDONLY) | O_DIRECT);
    if (fd < 0) return die(dev);
    size_t bs = kib * 1024;
    char *buf = aligned(bs);
    if (!buf) return die("alloc");
    long long total = mib << 20, done = 0, t0 = now_us();
    while (done < total) {
        ssize_t n = write_ ? pwrite(fd, buf, bs, done) : pread(fd, buf, bs, done);
        if (n <= 0) { if (n == 0) errno = ENOSPC; return die(write_ ? "pwrite" : "pread"); }
        done += n;
    }
    if (write_ && fdatasync(fd)) return die("fdatasync");
    report(done, now_us() - t0);
    return 0;
}

static int cmd_randread(const char *dev, int secs, long long kib) {
    int fd = open(dev, O_RDONLY | O_DIRECT);
    if (fd < 0) return die(dev);
    unsigned long long size = 0;
    struct stat st;
    if (ioctl(fd, BLKGETSIZE64, &size) && (fstat(fd, &st) || !(size = st.st_size))) return die("size");
    size_t bs = kib * 1024;
    unsigned long long blocks = size / bs;
    if (!blocks) { fprintf(stderr, "labio: %s too small\n", dev); return 1; }
    char *buf = aligned(bs);
    if (!buf) return die("alloc");
    unsigned long long x = 88172645463325252ULL; /* xorshift64: fixed sequence */
    long long ops = 0, t0 = now_us(), end = t0 + secs * 1000000LL, t;
    do {
        /* Check the clock every 16 reads: clock_gettime is cheap but not free. */
        for (int i = 0; i < 16; i++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            if (pread(fd, buf, bs, (x % blocks) * bs) != (ssize_t)bs) return die("pread");
            ops++;
        }
    } while ((t = now_us()) < end);
    long long us = t - t0;
    printf("ops=%lld us=%lld iops=%.1f\n", ops, us, ops * 1e6 / us);
    return 0;
}

int main(int argc, char **argv) {
    const char *c = argc > 1 ? argv[1] : "";
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!strcmp(c, "send") && (argc == 5 || argc == 6))
        return cmd_send(argv[2], atoi(argv[3]), argv[4], argc == 6 ? atoi(argv[5]) : 60);
    if (!strcmp(c, "recv") && (argc == 4 || argc == 5))
        return cmd_recv(atoi(argv[2]), argv[3], argc == 5 ? atoi(argv[4]) : 60);
    if ((!strcmp(c, "seqwrite") || !strcmp(c, "seqread")) && (argc == 4 || argc == 5))
        return cmd_seq(argv[2], c[3] == 'w', atoll(argv[3]), argc == 5 ? atoll(argv[4]) : 1024);
    if (!strcmp(c, "randread") && (argc == 4 || argc == 5))
        return cmd_randread(argv[2], atoi(argv[3]), argc == 5 ? atoll(argv[4]) : 4);
    fprintf(stderr, "usage: labio send HOST PORT FILE|zero:BYTES|seq:SECS [SECS] | recv PORT FILE|-|seq [SECS]\n"
                    "       | seqwrite DEV MIB [KIB] | seqread DEV MIB [KIB] | randread DEV SECS [KIB]\n");
    return 2;
}
