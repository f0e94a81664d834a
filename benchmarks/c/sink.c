/* sink.c: counts the GRE-in-UDP datagrams a subject sends (benchmarks/run.py).
 *
 * Binds one UDP socket per ADDR:PORT, drains them with recvmmsg, and counts every datagram except
 * keepalives (GRE protocol 0x88B5, plain or sealed authenticate-only), which it echoes unchanged to their sender, as a TM agent does, so a
 * distributor under test sees its TMs up. SIGUSR1 prints "count N ns T" (T: CLOCK_MONOTONIC), which is how
 * the harness takes its two readings around a measurement window. Exits on SIGTERM/SIGINT or after
 * SECONDS (default 600), printing the final line.
 *
 * usage: sink [-s SECONDS] ADDR:PORT [ADDR:PORT ...]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAX_SOCKETS 16
#define MAX_DATAGRAM 2048   /* only the first bytes matter; longer datagrams are truncated, still counted */

static volatile sig_atomic_t stop, report;
static void on_stop(int sig) { (void)sig; stop = 1; }
static void on_report(int sig) { (void)sig; report = 1; }

static void print_count(unsigned long long count, unsigned long long echoed)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    printf("count %llu ns %lld echoed %llu\n", count, (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec, echoed);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    int opt, seconds = 600, nfds = 0;
    while ((opt = getopt(argc, argv, "s:")) != -1) {
        if (opt == 's') seconds = atoi(optarg);
        else return 2;
    }
    struct pollfd pfds[MAX_SOCKETS];
    for (int i = optind; i < argc && nfds < MAX_SOCKETS; i++) {
        char host[64];
        const char *colon = strrchr(argv[i], ':');
        size_t n = colon ? (size_t)(colon - argv[i]) : 0;
        struct sockaddr_in a = {.sin_family = AF_INET};
        if (!colon || n >= sizeof host) { fprintf(stderr, "bad endpoint %s\n", argv[i]); return 2; }
        memcpy(host, argv[i], n);
        host[n] = 0;
        if (inet_pton(AF_INET, host, &a.sin_addr) != 1) { fprintf(stderr, "bad address %s\n", host); return 2; }
        a.sin_port = htons((uint16_t)atoi(colon + 1));
        int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int bufsize = 16 << 20;
        setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bufsize, sizeof bufsize);   /* root: past rmem_max */
        if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror(argv[i]); return 1; }
        pfds[nfds++] = (struct pollfd){.fd = fd, .events = POLLIN};
    }
    if (!nfds) { fprintf(stderr, "usage: %s [-s SECONDS] ADDR:PORT...\n", argv[0]); return 2; }

    struct sigaction sa = {.sa_handler = on_stop};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = on_report;   /* no SA_RESTART: poll returns EINTR and the report goes out at once */
    sigaction(SIGUSR1, &sa, NULL);
    printf("ready\n");
    fflush(stdout);

    static uint8_t buffers[BATCH][MAX_DATAGRAM];
    static struct sockaddr_in peers[BATCH];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    unsigned long long count = 0, echoed = 0;
    time_t deadline = time(NULL) + seconds;
    while (!stop && time(NULL) < deadline) {
        if (report) { report = 0; print_count(count, echoed); }
        if (poll(pfds, (nfds_t)nfds, 200) <= 0) continue;
        for (int s = 0; s < nfds; s++) {
            if (!(pfds[s].revents & POLLIN)) continue;
            for (;;) {
                for (int i = 0; i < BATCH; i++) {
                    iov[i] = (struct iovec){.iov_base = buffers[i], .iov_len = MAX_DATAGRAM};
                    memset(&msgs[i], 0, sizeof msgs[i]);
                    msgs[i].msg_hdr.msg_iov = &iov[i];
                    msgs[i].msg_hdr.msg_iovlen = 1;
                    msgs[i].msg_hdr.msg_name = &peers[i];
                    msgs[i].msg_hdr.msg_namelen = sizeof peers[i];
                }
                int n = recvmmsg(pfds[s].fd, msgs, BATCH, MSG_DONTWAIT, NULL);
                if (n <= 0) break;
                for (int i = 0; i < n; i++) {
                    const uint8_t *d = buffers[i];
                    /* A keepalive, plain or sealed authenticate-only (overlay/auth.py: marker 0x4F, flags bit 0
                     * clear, the GRE header behind the 18-byte header): echoed unchanged. */
                    int plain = msgs[i].msg_len >= 4 && d[2] == 0x88 && d[3] == 0xB5;
                    int sealed = msgs[i].msg_len >= 18 + 4 + 16 && d[0] == 0x4F && !(d[1] & 1)
                                 && d[20] == 0x88 && d[21] == 0xB5;
                    if (plain || sealed) {
                        sendto(pfds[s].fd, d, msgs[i].msg_len, MSG_DONTWAIT, (struct sockaddr *)&peers[i],
                               msgs[i].msg_hdr.msg_namelen);
                        echoed++;
                    } else {
                        count++;
                    }
                }
                if (n < BATCH || report || stop) break;
            }
        }
    }
    print_count(count, echoed);
    return 0;
}
