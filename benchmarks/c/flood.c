/* flood.c: the saturating generator of benchmarks/run.py — small UDP datagrams, for a bounded time.
 *
 * Two modes:
 *   udp  many sockets (one per source address x source port), each connected to DST; every call sends one
 *        batch from the next socket: with UDP GSO (-g N, UDP_SEGMENT) one sendmsg carries N equal
 *        datagrams, else one sendmmsg carries 64. So each batch is one flow; consecutive batches are
 *        different flows (the distributor hashes the source endpoint).
 *   gre  imitates a distributor: one socket bound to BIND sends GRE-in-UDP to DST (a TM); the inner
 *        packets are IPv4/UDP to VIP from FLOWS distinct source endpoints (correct checksums), built once
 *        into one contiguous ring, so a GSO batch is a slice of it: every datagram of a batch is another
 *        inner flow, and the ring cycles through all of them (the first pass opens them at the TM).
 * Without -g, or when the egress refuses GSO (EIO), sendmmsg of 64. -r PPS caps the rate (paced per batch
 * with clock_nanosleep), so the generator's core keeps room for the kernel work the harness steers there.
 *
 * usage: flood udp -d DST:PORT -a SRC[,SRC...] [-p PORTS_PER_ADDR] [-l SIZE] [-g SEGS] [-r PPS] [-t SECONDS]
 *        flood gre -d DST:PORT -b BIND_ADDR -v VIP:PORT [-f FLOWS] [-l SIZE] [-g SEGS] [-r PPS] [-t SECONDS]
 * SIZE is the (inner) IP packet size in bytes (default 64). Prints
 * "sent N errors E seconds S" when done. Never runs longer than SECONDS (default 3, at most 120).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#define BATCH 64
#define MAX_SOCKETS 4096

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void endpoint(const char *text, struct sockaddr_in *out)
{
    char host[64];
    const char *colon = strchr(text, ':');
    size_t n = colon ? (size_t)(colon - text) : strlen(text);
    if (n >= sizeof host) { fprintf(stderr, "bad address %s\n", text); exit(2); }
    memcpy(host, text, n);
    host[n] = 0;
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons(colon ? (uint16_t)atoi(colon + 1) : 0);
    if (inet_pton(AF_INET, host, &out->sin_addr) != 1) { fprintf(stderr, "bad address %s\n", text); exit(2); }
}

static uint32_t sum16(const void *data, size_t len, uint32_t sum)
{
    const uint8_t *p = data;
    for (; len > 1; len -= 2, p += 2) sum += (uint32_t)(p[0] << 8 | p[1]);
    if (len) sum += (uint32_t)(p[0] << 8);
    return sum;
}
static uint16_t fold(uint32_t sum)
{
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* One inner IPv4/UDP packet of `size` bytes from src:sport to vip, checksums right. */
static void build_inner(uint8_t *p, size_t size, uint32_t src, uint16_t sport, const struct sockaddr_in *vip)
{
    memset(p, 0, size);
    p[0] = 0x45;
    p[2] = (uint8_t)(size >> 8); p[3] = (uint8_t)size;
    p[8] = 64; p[9] = 17;
    memcpy(p + 12, &src, 4);
    memcpy(p + 16, &vip->sin_addr, 4);
    uint16_t ip_check = htons(fold(sum16(p, 20, 0)));
    memcpy(p + 10, &ip_check, 2);
    uint8_t *u = p + 20;
    uint16_t sp = htons(sport), ulen = htons((uint16_t)(size - 20));
    memcpy(u, &sp, 2);
    memcpy(u + 2, &vip->sin_port, 2);
    memcpy(u + 4, &ulen, 2);
    for (size_t i = 8; i < size - 20; i++) u[i] = (uint8_t)('a' + i % 26);
    uint32_t pseudo = sum16(p + 12, 8, 0) + 17 + (uint32_t)(size - 20);
    uint16_t check = fold(sum16(u, size - 20, pseudo));
    check = htons(check ? check : 0xffff);
    memcpy(u + 6, &check, 2);
}

/* Send `segs` datagrams of `seg` bytes starting at buf: one GSO sendmsg, or sendmmsg. Returns how many
 * went out (0 on an error other than EIO; *gso cleared on EIO: the device cannot segment). */
static int send_batch(int fd, uint8_t *buf, size_t seg, int segs, int *gso, unsigned long long *errors)
{
    if (*gso) {
        char control[CMSG_SPACE(sizeof(uint16_t))];
        struct iovec iov = {.iov_base = buf, .iov_len = seg * (size_t)segs};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                             .msg_controllen = sizeof control};
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_UDP;
        cm->cmsg_type = UDP_SEGMENT;
        cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        uint16_t size = (uint16_t)seg;
        memcpy(CMSG_DATA(cm), &size, sizeof size);
        if (sendmsg(fd, &msg, 0) >= 0) return segs;
        if (errno == EIO) { *gso = 0; fprintf(stderr, "flood: GSO refused (EIO), using sendmmsg\n"); }
        else (*errors)++;
        return 0;
    }
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    int n = segs < BATCH ? segs : BATCH;
    for (int i = 0; i < n; i++) {
        iov[i] = (struct iovec){.iov_base = buf + seg * (size_t)i, .iov_len = seg};
        memset(&msgs[i], 0, sizeof msgs[i]);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int sent = sendmmsg(fd, msgs, (unsigned)n, 0);
    if (sent < 0) { (*errors)++; return 0; }
    return sent;
}

int main(int argc, char **argv)
{
    if (argc < 2 || (strcmp(argv[1], "udp") && strcmp(argv[1], "gre"))) {
        fprintf(stderr, "usage: %s udp|gre -d DST:PORT ... (see the comment at the top of flood.c)\n", argv[0]);
        return 2;
    }
    int gre_mode = strcmp(argv[1], "gre") == 0;
    struct sockaddr_in dst, vip, bind_addr;
    memset(&vip, 0, sizeof vip);
    memset(&bind_addr, 0, sizeof bind_addr);
    char *sources = NULL;
    int have_dst = 0, ports = 64, flows = 4096, segs = 0, size = 64;
    double seconds = 3, rate = 0;
    int opt;
    optind = 2;
    while ((opt = getopt(argc, argv, "d:a:p:b:v:f:l:g:r:t:")) != -1) {
        switch (opt) {
        case 'd': endpoint(optarg, &dst); have_dst = 1; break;
        case 'a': sources = optarg; break;
        case 'p': ports = atoi(optarg); break;
        case 'b': endpoint(optarg, &bind_addr); break;
        case 'v': endpoint(optarg, &vip); break;
        case 'f': flows = atoi(optarg); break;
        case 'l': size = atoi(optarg); break;
        case 'g': segs = atoi(optarg); break;
        case 't': seconds = atof(optarg); break;
        case 'r': rate = atof(optarg); break;
        default: return 2;
        }
    }
    if (!have_dst || size < 28 || size > 1400 || seconds <= 0 || seconds > 120 || flows < 1 || ports < 1) {
        fprintf(stderr, "flood: need -d; 28 <= SIZE <= 1400; 0 < SECONDS <= 120\n");
        return 2;
    }
    int gso = segs > 0;
    int per_call = gso ? (segs > 64 ? 64 : segs) : BATCH;

    static int fds[MAX_SOCKETS];
    int nfds = 0;
    uint8_t *ring;
    size_t seg, ring_len;
    int sndbuf = 4 << 20;
    if (gre_mode) {
        /* GRE (4 bytes, inner IPv4) + inner packet; flows rounded up to whole batches. */
        flows = (flows + per_call - 1) / per_call * per_call;
        seg = 4 + (size_t)size;
        ring_len = seg * (size_t)flows;
        ring = malloc(ring_len);
        for (int i = 0; i < flows; i++) {
            uint8_t *d = ring + seg * (size_t)i;
            d[0] = 0; d[1] = 0; d[2] = 0x08; d[3] = 0x00;
            /* 256 source ports per address from 198.51.100.20 up: flows / 256 client addresses */
            uint32_t src = htonl(0xC6336414u + (uint32_t)(i / 256));   /* 198.51.100.20 + i/256 */
            build_inner(d + 4, (size_t)size, src, (uint16_t)(20000 + i % 256), &vip);
        }
        int fd = socket(AF_INET, SOCK_DGRAM, 0);
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
        if (bind(fd, (struct sockaddr *)&bind_addr, sizeof bind_addr) < 0) { perror("bind"); return 1; }
        if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0) { perror("connect"); return 1; }
        fds[nfds++] = fd;
    } else {
        /* Plain UDP payloads: size - 28 bytes each (IPv4 + UDP headers are the kernel's). */
        seg = (size_t)size - 28;
        ring_len = seg * (size_t)per_call;
        ring = calloc(1, ring_len ? ring_len : 1);
        if (!sources) { fprintf(stderr, "flood udp: need -a SRC[,SRC...]\n"); return 2; }
        for (char *tok = strtok(sources, ","); tok; tok = strtok(NULL, ",")) {
            struct sockaddr_in src;
            endpoint(tok, &src);
            for (int p = 0; p < ports && nfds < MAX_SOCKETS; p++) {
                int fd = socket(AF_INET, SOCK_DGRAM, 0);
                setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
                src.sin_port = 0;   /* ephemeral: one source port per socket */
                if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) { perror("bind"); return 1; }
                if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0) { perror("connect"); return 1; }
                fds[nfds++] = fd;
            }
        }
    }

    unsigned long long sent = 0, errors = 0;
    size_t offset = 0;
    double start = now(), end = start + seconds, t = start;
    for (unsigned long long call = 0; t < end; call++) {
        int fd = fds[call % (unsigned long long)nfds];
        uint8_t *buf = gre_mode ? ring + offset : ring;
        sent += (unsigned long long)send_batch(fd, buf, seg, per_call, &gso, &errors);
        if (gre_mode) offset = (offset + seg * (size_t)per_call) % ring_len;
        if (!gso && per_call > BATCH) per_call = BATCH;
        t = now();
        if (rate > 0 && (double)sent / rate > t - start) {   /* ahead of schedule: sleep until on it */
            double due = start + (double)sent / rate;
            struct timespec ts = {.tv_sec = (time_t)due, .tv_nsec = (long)((due - (double)(time_t)due) * 1e9)};
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
            t = now();
        }
    }
    printf("sent %llu errors %llu seconds %.3f\n", sent, errors, t - start);
    return 0;
}
