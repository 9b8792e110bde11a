/* Workload and checks for the lab's live-update (CPR) scenarios. Built static
 * into both images: the guest runs the workload, L2 stamps and checks.
 *
 *   labcpr count MS                   print `GUEST-COUNT n` (n = 1, 2, ...) every
 *       MS ms from a counter in this process's memory: a reset or a lost page
 *       shows as a restart or a jump in the sequence. SIGTERM prints
 *       `GUEST-COUNT-STOP n` and exits.
 *   labcpr records FILE MS SYNC       append `rec NNNNNNNN HHHHHHHH` (sequence
 *       number and a hash of it) to FILE every MS ms, fsync every SYNC records
 *       and on SIGTERM. Each record is one write(2).
 *   labcpr check FILE                 verify FILE holds records 1..N in order:
 *       prints `records=N gaps=G dups=D bad=B last=L` (bad: a line that is not
 *       a well-formed record, e.g. NUL bytes from a lost block); exit 0 if clean.
 *   labcpr stamp LOG TSLOG            copy stdin to LOG unchanged; for each
 *       `GUEST-COUNT n` line append `TSC MONO_US n` to TSLOG (L2's TSC keeps
 *       counting across a kexec; CLOCK_MONOTONIC does not).
 *   labcpr now                        print `TSC MONO_US`.
 *   labcpr tschz                      TSC ticks per microsecond, measured
 *       against CLOCK_MONOTONIC over 300 ms.
 *   labcpr gaps TSLOG [TICKS_PER_US]  the largest gap between consecutive
 *       stamped lines: `max_gap_us=G after=n lines=N`, on the TSC when
 *       TICKS_PER_US is given, else on the monotonic column.
 *   labcpr hmp SOCK CMD...            QEMU's human monitor on a UNIX socket
 *       (busybox nc has no UNIX sockets): run each CMD, waiting for the next
 *       `(qemu) ` prompt (for `quit`: for the close); output to stdout. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static long long mono_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

static void sleep_ms(long ms) {
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&ts, NULL); /* EINTR on SIGTERM: the loop then stops */
}

static uint32_t rec_hash(uint32_t n) { return n * 2654435761u ^ 0x6d6f6c74u; }

static int cmd_count(long ms) {
    unsigned long n = 0;
    char line[64];
    while (!stop) {
        int len = snprintf(line, sizeof line, "GUEST-COUNT %lu\n", ++n);
        if (write(1, line, len) < 0 && errno != EINTR) return 1;
        sleep_ms(ms);
    }
    int len = snprintf(line, sizeof line, "GUEST-COUNT-STOP %lu\n", n);
    return write(1, line, len) == len ? 0 : 1;
}

static int cmd_records(const char *path, long ms, int sync_every) {
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) { perror(path); return 1; }
    char line[64];
    uint32_t n = 0;
    while (!stop) {
        n++;
        int len = snprintf(line, sizeof line, "rec %08u %08x\n", n, rec_hash(n));
        if (write(fd, line, len) != len) { perror("labcpr: write"); return 1; }
        if (n % sync_every == 0 && fsync(fd)) { perror("labcpr: fsync"); return 1; }
        sleep_ms(ms);
    }
    if (fsync(fd)) { perror("labcpr: fsync"); return 1; }
    printf("RECORDS-STOP last=%u\n", n);
    return 0;
}

static int cmd_check(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) { perror(path); return 1; }
    char line[256];
    unsigned long records = 0, gaps = 0, dups = 0, bad = 0, last = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned n, h;
        char end;
        size_t len = strlen(line);
        if (len != 22 || sscanf(line, "rec %8u %8x%c", &n, &h, &end) != 3 || end != '\n' ||
            h != rec_hash(n)) {
            bad++;
            continue;
        }
        records++;
        if (n <= last) dups++;
        else if (n != last + 1) gaps++;
        if (n > last) last = n;
    }
    fclose(f);
    printf("records=%lu gaps=%lu dups=%lu bad=%lu last=%lu\n", records, gaps, dups, bad, last);
    return gaps || dups || bad || records != last;
}

static int cmd_stamp(const char *log_path, const char *ts_path) {
    int log = open(log_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    FILE *ts = fopen(ts_path, "a");
    if (log < 0 || !ts) { perror("labcpr stamp"); return 1; }
    char buf[8192], line[128];
    size_t ll = 0;
    ssize_t r;
    while ((r = read(0, buf, sizeof buf)) > 0 || (r < 0 && errno == EINTR)) {
        if (r < 0) continue;
        unsigned long long tsc = __rdtsc();
        long long us = mono_us();
        if (write(log, buf, r) != r) return 1;
        for (ssize_t i = 0; i < r; i++) {
            if (buf[i] != '\n') {
                if (ll < sizeof line - 1) line[ll++] = buf[i];
                continue;
            }
            line[ll] = 0;
            unsigned long n;
            if (sscanf(line, "GUEST-COUNT %lu", &n) == 1) {
                fprintf(ts, "%llu %lld %lu\n", tsc, us, n);
                fflush(ts);
            }
            ll = 0;
        }
    }
    return 0;
}

static double tschz(void) {
    unsigned long long t0 = __rdtsc();
    long long u0 = mono_us();
    sleep_ms(300);
    return (double)(__rdtsc() - t0) / (double)(mono_us() - u0);
}

static int cmd_gaps(const char *path, double hz) {
    FILE *f = fopen(path, "r");
    if (!f) { perror(path); return 1; }
    unsigned long long tsc;
    long long us;
    unsigned long n, lines = 0, after = 0;
    double prev = 0, max = 0;
    while (fscanf(f, "%llu %lld %lu", &tsc, &us, &n) == 3) {
        double t = hz > 0 ? tsc / hz : (double)us;
        if (lines++ && t - prev > max) { max = t - prev; after = n; }
        prev = t;
    }
    fclose(f);
    printf("max_gap_us=%.0f after=%lu lines=%lu\n", max, after, lines);
    return lines < 2;
}

/* Reads from s to stdout until the monitor's prompt (or EOF): 0 if seen. */
static int hmp_wait(int s) {
    char buf[4096], tail[8] = "";
    ssize_t r;
    while ((r = read(s, buf, sizeof buf)) > 0) {
        fwrite(buf, 1, r, stdout);
        for (ssize_t i = 0; i < r; i++) { /* the last 7 bytes seen */
            memmove(tail, tail + 1, 6);
            tail[6] = buf[i];
            tail[7] = 0;
        }
        if (!strcmp(tail, "(qemu) ")) return 0;
    }
    return 1;
}

static int cmd_hmp(const char *path, int n, char **cmds) {
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof sa)) { perror(path); return 1; }
    if (hmp_wait(s)) return 1;
    for (int i = 0; i < n; i++) {
        if (dprintf(s, "%s\n", cmds[i]) < 0) { perror("labcpr hmp"); return 1; }
        int eof = hmp_wait(s);
        if (eof) return strcmp(cmds[i], "quit") ? 1 : 0;
    }
    printf("\n");
    return 0;
}

int main(int argc, char **argv) {
    /* No SA_RESTART: a blocked nanosleep/write returns so the loop sees `stop`. */
    struct sigaction sa = { .sa_handler = on_term };
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *c = argc > 1 ? argv[1] : "";
    if (!strcmp(c, "count") && argc == 3) return cmd_count(atol(argv[2]));
    if (!strcmp(c, "records") && argc == 5) return cmd_records(argv[2], atol(argv[3]), atoi(argv[4]));
    if (!strcmp(c, "check") && argc == 3) return cmd_check(argv[2]);
    if (!strcmp(c, "stamp") && argc == 4) return cmd_stamp(argv[2], argv[3]);
    if (!strcmp(c, "now") && argc == 2) { printf("%llu %lld\n", __rdtsc(), mono_us()); return 0; }
    if (!strcmp(c, "tschz") && argc == 2) { printf("%.3f\n", tschz()); return 0; }
    if (!strcmp(c, "gaps") && (argc == 3 || argc == 4)) return cmd_gaps(argv[2], argc == 4 ? atof(argv[3]) : 0);
    if (!strcmp(c, "hmp") && argc >= 4) return cmd_hmp(argv[2], argc - 3, argv + 3);
    fprintf(stderr, "usage: labcpr count|records|check|stamp|now|tschz|gaps|hmp ... (see source)\n");
    return 2;
}
