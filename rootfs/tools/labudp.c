/* Guest-visible blackout of a live update (shared/LAB.md, "What other VMMs
 * score in this lab"): the guest sends a numbered UDP datagram every
 * INTERVAL_US to L2 over virtio-net; L2 times their arrival. The largest gap
 * between two arrivals across an update is how long the guest was gone, as
 * its network peers see it. Built static into both images.
 *
 *   labudp send HOST PORT INTERVAL_US   (guest) send 16-byte datagrams: the
 *       sequence number (1, 2, ...) and the guest's CLOCK_MONOTONIC in us;
 *       sleeps INTERVAL_US after each one (relative, so no burst follows a pause).
 *   labudp recv PORT OUT               (L2) receive; keeps one line in OUT.live
 *       (`last_us= seq= recv=`, rewritten every 100 ms) and, on each SIGUSR1,
 *       appends to OUT the window since the previous SIGUSR1:
 *       `recv=N lost=L dup=D max_gap_us=G gap_seq=S first_seq=F last_seq=S2`
 *       (lost: sequence numbers skipped; max_gap_us: the largest time between
 *       two consecutive arrivals, the second of them in this window; gap_seq:
 *       the sequence number that ended that gap). With LABUDP_TRACE set,
 *       also each arrival of the window (OUT.trace, see cmd_recv). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long mono_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

struct datagram {
    uint64_t seq;
    uint64_t sent_us;
};

static int cmd_send(const char *host, int port, long interval_us) {
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) { fprintf(stderr, "labudp: bad address %s\n", host); return 1; }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof sa)) { perror("labudp: socket"); return 1; }
    struct timespec period = { interval_us / 1000000, (interval_us % 1000000) * 1000 };
    struct datagram d = { 0, 0 };
    for (;;) {
        d.seq++;
        d.sent_us = mono_us();
        /* ECONNREFUSED (no receiver yet) or ENOBUFS: the number is spent
         * anyway, so the receiver counts it as lost. */
        send(s, &d, sizeof d, 0);
        nanosleep(&period, NULL);
    }
}

static volatile sig_atomic_t mark;
static void on_usr1(int sig) { (void)sig; mark = 1; }

static void put_live(const char *out, long long last_us, uint64_t seq, unsigned long recv) {
    char path[256], tmp[264];
    snprintf(path, sizeof path, "%s.live", out);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fprintf(f, "last_us=%lld seq=%llu recv=%lu\n", last_us, (unsigned long long)seq, recv);
    fclose(f);
    rename(tmp, path);
}

static int cmd_recv(int port, const char *out) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
    if (s < 0 || bind(s, (struct sockaddr *)&sa, sizeof sa)) { perror("labudp: bind"); return 1; }
    /* The socket buffer must hold what arrives while this process is not
     * scheduled (L2 is busy emulating the guest). */
    int rcvbuf = 4 << 20;
    setsockopt(s, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    /* No SA_RESTART: recv returns EINTR, and the window is written at once. */
    struct sigaction act = { .sa_handler = on_usr1 };
    sigaction(SIGUSR1, &act, NULL);
    /* LABUDP_TRACE set: every arrival of the current window, one line each
     * (`arrival_us seq sent_us`: arrival on this host's CLOCK_MONOTONIC, sent
     * on the guest's), in OUT.trace; at each SIGUSR1 it becomes
     * OUT.trace.last (the window just closed) and a new one starts. */
    char trace_path[264];
    snprintf(trace_path, sizeof trace_path, "%s.trace", out);
    FILE *trace = getenv("LABUDP_TRACE") ? fopen(trace_path, "w") : NULL;
    long long prev_us = 0, live_us = 0, max_gap = 0;
    uint64_t prev_seq = 0, gap_seq = 0, first_seq = 0;
    unsigned long total = 0, recv_n = 0, lost = 0, dup = 0;
    for (;;) {
        struct datagram d;
        ssize_t r = recv(s, &d, sizeof d, 0);
        long long now = mono_us();
        if (r == (ssize_t)sizeof d) {
            total++;
            recv_n++;
            if (!first_seq) first_seq = d.seq;
            if (prev_us && now - prev_us > max_gap) { max_gap = now - prev_us; gap_seq = d.seq; }
            if (d.seq <= prev_seq) dup++;
            else {
                if (prev_seq) lost += d.seq - prev_seq - 1;
                prev_seq = d.seq;
            }
            prev_us = now;
            if (trace)
                fprintf(trace, "%lld %llu %llu\n", now, (unsigned long long)d.seq,
                        (unsigned long long)d.sent_us);
        } else if (r < 0 && errno != EINTR) {
            perror("labudp: recv");
            return 1;
        }
        if (now - live_us >= 100000 || mark) {
            put_live(out, prev_us, prev_seq, total);
            live_us = now;
        }
        if (mark) {
            mark = 0;
            FILE *f = fopen(out, "a");
            if (f) {
                fprintf(f, "recv=%lu lost=%lu dup=%lu max_gap_us=%lld gap_seq=%llu first_seq=%llu last_seq=%llu\n",
                        recv_n, lost, dup, max_gap, (unsigned long long)gap_seq,
                        (unsigned long long)first_seq, (unsigned long long)prev_seq);
                fclose(f);
            }
            if (trace) {
                char done[272];
                snprintf(done, sizeof done, "%s.last", trace_path);
                fclose(trace);
                rename(trace_path, done);
                trace = fopen(trace_path, "w");
            }
            recv_n = lost = dup = 0;
            max_gap = 0;
            gap_seq = first_seq = 0;
        }
    }
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 5 && !strcmp(argv[1], "send")) return cmd_send(argv[2], atoi(argv[3]), atol(argv[4]));
    if (argc == 4 && !strcmp(argv[1], "recv")) return cmd_recv(atoi(argv[2]), argv[3]);
    fprintf(stderr, "usage: labudp send HOST PORT INTERVAL_US | recv PORT OUT\n");
    return 2;
}
