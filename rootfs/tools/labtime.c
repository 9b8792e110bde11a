/* Timing helper for lab scenarios: busybox `date` has no %N and /proc/uptime
 * ticks in 10 ms steps, too coarse to time a VMM launch.
 *   labtime now                          monotonic clock in microseconds
 *   labtime watch PAT SECS LOG CMD...    run CMD (stdout+stderr appended to LOG),
 *       print the microseconds from launch to the end of the first output line
 *       containing PAT, then kill CMD's process group. Exit 0 if seen, 1 on timeout/EOF.
 *   labtime stamp PAT SECS LOG CMD...    the same, with each LOG line prefixed by
 *       the milliseconds since launch at which it ended (for boot diagnostics). */
#define _GNU_SOURCE
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

int main(int argc, char **argv) {
    if (argc == 2 && !strcmp(argv[1], "now")) { printf("%lld\n", now_us()); return 0; }
    int stamp = argc >= 6 && !strcmp(argv[1], "stamp");
    if (argc < 6 || (strcmp(argv[1], "watch") && !stamp)) { fprintf(stderr, "usage: see source\n"); return 2; }
    const char *pat = argv[2];
    long long deadline = now_us() + atoll(argv[3]) * 1000000LL;
    FILE *log = fopen(argv[4], "a");
    int fds[2];
    if (!log || pipe(fds)) { perror("labtime"); return 2; }
    long long start = now_us();
    pid_t pid = fork();
    if (pid == 0) {
        setpgid(0, 0); /* so the kill below reaches everything CMD started */
        dup2(fds[1], 1); dup2(fds[1], 2); close(fds[0]); close(fds[1]);
        execvp(argv[5], argv + 5);
        perror("labtime: exec"); _exit(127);
    }
    close(fds[1]);
    char buf[65536]; size_t len = 0; int found = 0;
    while (!found) {
        long long left = deadline - now_us();
        struct pollfd p = { .fd = fds[0], .events = POLLIN };
        if (left <= 0 || poll(&p, 1, (int)(left / 1000) + 1) <= 0) break;
        ssize_t n = read(fds[0], buf + len, sizeof buf - 1 - len);
        if (n <= 0) break;
        long long t = now_us();
        if (!stamp) fwrite(buf + len, 1, n, log);
        len += n; buf[len] = 0;
        /* Match whole lines only, so the caller finds the complete line in LOG. */
        char *nl = strrchr(buf, '\n');
        if (!nl) { if (len > sizeof buf / 2) len = 0; continue; }
        *nl = 0;
        if (stamp) /* every line in the chunk ended now: one stamp each */
            for (char *l = buf; l;) {
                char *e = strchr(l, '\n');
                fprintf(log, "+%8.3f %.*s\n", (t - start) / 1000.0, e ? (int)(e - l) : (int)strlen(l), l);
                l = e ? e + 1 : NULL;
            }
        if (strstr(buf, pat)) { printf("%lld\n", t - start); found = 1; }
        len = buf + len - (nl + 1); /* keep the unfinished line */
        memmove(buf, nl + 1, len);
    }
    kill(-pid, SIGKILL);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    fclose(log);
    return found ? 0 : 1;
}
