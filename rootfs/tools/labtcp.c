/* One long-lived TCP connection exchanging numbered messages, for the lab's
 * live-update scenarios: a connection that survives the update shows no gap
 * and no reconnect; one that does not is visible as a reconnect.
 *
 *   labtcp server PORT STATUS         accept connections one after another;
 *       for each line `seq N` check N follows the previous one on the same
 *       connection and answer `ack N`.
 *   labtcp client HOST PORT STATUS MS send `seq N` every MS ms (N = 1, 2, ...
 *       across reconnects), wait for `ack N`; on a broken connection reconnect
 *       (every 200 ms) and resend the unacknowledged message.
 * Both keep one `key=value` line in STATUS (replaced atomically after every
 * message): server `conns= peer_port= msgs= last= gaps= errors=`, client
 * `conns= local_port= sent= acked= errors=`; `errors` counts malformed or
 * mismatched messages. Events (accept, close, reconnect) go to stdout. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void put_status(const char *path, const char *text) {
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) { perror(tmp); return; }
    fputs(text, f);
    fclose(f);
    rename(tmp, path);
}

/* One line (without its '\n') into buf; 0 on EOF or error. Reading a byte at
 * a time is fine at ten messages a second. */
static int read_line(int s, char *buf, size_t size) {
    size_t n = 0;
    for (;;) {
        char c;
        if (recv(s, &c, 1, 0) != 1) return 0;
        if (c == '\n') { buf[n] = 0; return 1; }
        if (n < size - 1) buf[n++] = c;
    }
}

static int send_line(int s, const char *fmt, unsigned long n) {
    char buf[64];
    int len = snprintf(buf, sizeof buf, fmt, n);
    return send(s, buf, len, MSG_NOSIGNAL) == len;
}

static int server(int port, const char *status) {
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) || listen(ls, 4)) { perror("labtcp: listen"); return 1; }
    unsigned long conns = 0, msgs = 0, last = 0, gaps = 0, errors = 0;
    char line[128], text[256];
    for (;;) {
        struct sockaddr_in peer;
        socklen_t plen = sizeof peer;
        int s = accept(ls, (struct sockaddr *)&peer, &plen);
        if (s < 0) { perror("labtcp: accept"); return 1; }
        conns++;
        int expect = 0;
        printf("TCP-SERVER accept conn=%lu peer=%s:%d\n", conns, inet_ntoa(peer.sin_addr), ntohs(peer.sin_port));
        fflush(stdout);
        while (read_line(s, line, sizeof line)) {
            unsigned long n;
            if (sscanf(line, "seq %lu", &n) != 1) { errors++; continue; }
            if (expect && n != last + 1) {
                gaps++;
                printf("TCP-SERVER gap conn=%lu expected=%lu got=%lu\n", conns, last + 1, n);
            }
            expect = 1;
            last = n;
            msgs++;
            if (!send_line(s, "ack %lu\n", n)) break;
            snprintf(text, sizeof text, "conns=%lu peer_port=%d msgs=%lu last=%lu gaps=%lu errors=%lu\n",
                     conns, ntohs(peer.sin_port), msgs, last, gaps, errors);
            put_status(status, text);
        }
        printf("TCP-SERVER closed conn=%lu last=%lu\n", conns, last);
        fflush(stdout);
        close(s);
    }
}

static int client(const char *host, int port, const char *status, long ms) {
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) { fprintf(stderr, "labtcp: bad address %s\n", host); return 1; }
    struct timespec period = { ms / 1000, (ms % 1000) * 1000000L }, retry = { 0, 200000000L };
    unsigned long conns = 0, seq = 0, acked = 0, errors = 0;
    char line[128], text[256];
    for (;;) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *)&sa, sizeof sa)) { close(s); nanosleep(&retry, NULL); continue; }
        struct sockaddr_in me;
        socklen_t mlen = sizeof me;
        getsockname(s, (struct sockaddr *)&me, &mlen);
        conns++;
        printf("TCP-CLIENT connected conn=%lu local_port=%d\n", conns, ntohs(me.sin_port));
        fflush(stdout);
        for (;;) {
            if (acked == seq) seq++; /* else: resend what the old connection lost */
            if (!send_line(s, "seq %lu\n", seq) || !read_line(s, line, sizeof line)) break;
            unsigned long n;
            if (sscanf(line, "ack %lu", &n) != 1 || n != seq) errors++;
            else acked = n;
            snprintf(text, sizeof text, "conns=%lu local_port=%d sent=%lu acked=%lu errors=%lu\n",
                     conns, ntohs(me.sin_port), seq, acked, errors);
            put_status(status, text);
            nanosleep(&period, NULL);
        }
        printf("TCP-CLIENT connection %lu lost after ack %lu: reconnecting\n", conns, acked);
        fflush(stdout);
        close(s);
    }
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "server")) return server(atoi(argv[2]), argv[3]);
    if (argc == 6 && !strcmp(argv[1], "client")) return client(argv[2], atoi(argv[3]), argv[4], atol(argv[5]));
    fprintf(stderr, "usage: labtcp server PORT STATUS | client HOST PORT STATUS MS\n");
    return 2;
}
