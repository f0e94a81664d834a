/* dist_loop.c: the distributor-shaped C baseline (benchmarks/run.py, docs/performance.md).
 *
 * The loop the Python distributor agent is measured against, "the same loop written in C":
 *   read packets from a TUN until EAGAIN (at most 64: one batch)
 *   per packet: parse the IPv4/IPv6 source address (and, with -p, the TCP/UDP source port: the product's
 *               [hash] key = "addr+port"; its default is the address alone), xxh64 that endpoint,
 *               pick the TM from a 65,536-row table, prepend the outer GRE header (4 bytes, or 8 with -k)
 *   send the batch GRE-in-UDP with one sendmmsg (each message to its TM's underlay address:port).
 * No policy, no health, no counters per reason: the floor a user-mode distributor cannot go below.
 *
 * With -g, the batch leaves with UDP GSO, the way the product's send path does (overlay/_fastio.c): each
 * TM's datagrams of the batch (in the order read: a flow keeps its order) are cut into runs of equal size
 * (the last of a run may be shorter, at most 64 segments and 65,000 bytes), and each run is one message
 * with a UDP_SEGMENT cmsg: one skb through the stack per run instead of one per datagram. Still one
 * sendmmsg a batch. A run the kernel refuses with EIO or ENOPROTOOPT (the device cannot segment) goes
 * again datagram by datagram, and GSO stays off from then on; EINVAL or EMSGSIZE (a segment over the
 * MTU) sends that run plain and keeps GSO on.
 *
 * usage: dist_loop [-p] [-g] [-k KEY] [-s SECONDS] TUN_NAME BIND_ADDR TM_ADDR[:PORT] [TM_ADDR[:PORT] ...]
 * Creates TUN_NAME (IFF_TUN | IFF_NO_PI), prints "ready" once it exists, runs until SIGTERM/SIGINT or
 * SECONDS (default 600), then prints "rx N tx N dropped N" (with -g followed by "gso_messages N
 * gso_refused N": GSO messages sent, runs the kernel refused) and exits.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "xxh64.h"

#define BATCH 64
#define ROWS 65536
#define HEADROOM 8          /* room in front of each packet for the GRE header */
#define MAX_PACKET 65536
#define MAX_TMS 64
#define SEED 0x6f7665726c6179ULL  /* "overlay" */
#define GSO_MAX_BYTES 65000       /* a GSO send is one UDP datagram to the stack: under 64 KiB in all */
#define GSO_MAX_SEGMENTS 64       /* UDP_MAX_SEGMENTS of older kernels (6.x raised it; a batch is 64 anyway) */
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static int open_tun(const char *name)
{
    struct ifreq ifr;
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) { perror("open /dev/net/tun"); exit(1); }
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) { perror("TUNSETIFF"); exit(1); }
    return fd;
}

static void parse_endpoint(const char *text, int default_port, struct sockaddr_in *out)
{
    char host[64];
    const char *colon = strchr(text, ':');
    size_t n = colon ? (size_t)(colon - text) : strlen(text);
    if (n >= sizeof host) { fprintf(stderr, "bad address %s\n", text); exit(2); }
    memcpy(host, text, n);
    host[n] = 0;
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons(colon ? atoi(colon + 1) : default_port);
    if (inet_pton(AF_INET, host, &out->sin_addr) != 1) { fprintf(stderr, "bad address %s\n", text); exit(2); }
}

/* The endpoint the product hashes for "virtual = hash src": the source address, and the source port when
 * hash_port. Returns the number of bytes put in key (0: not an IP packet we can read). */
static int hash_port;
static size_t endpoint_key(const uint8_t *pkt, size_t len, uint8_t key[18])
{
    size_t l4 = 0, addr_len = 0;
    int proto = -1;
    if (len >= 20 && pkt[0] >> 4 == 4) {
        size_t ihl = (size_t)(pkt[0] & 15) * 4;
        int fragment_offset = ((pkt[6] & 0x1f) << 8) | pkt[7];
        if (ihl < 20 || ihl > len) return 0;
        memcpy(key, pkt + 12, 4);
        addr_len = 4;
        proto = fragment_offset ? -1 : pkt[9];   /* a later fragment has no ports */
        l4 = ihl;
    } else if (len >= 40 && pkt[0] >> 4 == 6) {
        memcpy(key, pkt + 8, 16);
        addr_len = 16;
        proto = pkt[6];                          /* no extension header walk: the common case */
        l4 = 40;
    } else {
        return 0;
    }
    if (hash_port && (proto == 6 || proto == 17) && l4 + 4 <= len) {
        memcpy(key + addr_len, pkt + l4, 2);     /* source port */
        return addr_len + 2;
    }
    return addr_len;
}

/* -g: the batch's datagrams regrouped for GSO. `frame`/`length`/`tm` describe datagram i of the batch as
 * read; the messages go into gmsgs, their segments into giov (each message's run contiguous there). */
static struct mmsghdr gmsgs[BATCH];
static struct iovec giov[BATCH];
static int grun[BATCH];                 /* datagrams in message m */
static union { char buffer[CMSG_SPACE(sizeof(uint16_t))]; struct cmsghdr align; } gcontrol[BATCH];

static int build_gso(int n, uint8_t *const frame[], const size_t length[], const int tm[], struct sockaddr_in *tms)
{
    int used = 0, segments = 0;
    uint8_t seen[MAX_TMS] = {0};
    for (int first = 0; first < n; first++) {
        int t = tm[first];
        if (seen[t]) continue;
        seen[t] = 1;
        /* TM t's datagrams, from its first in the batch on, in order: cut into runs. */
        int m = -1;
        size_t size = 0, total = 0;
        for (int i = first; i < n; i++) {
            if (tm[i] != t) continue;
            if (m < 0 || length[i] > size || total + length[i] > GSO_MAX_BYTES || grun[m] == GSO_MAX_SEGMENTS ||
                giov[segments - 1].iov_len < size) {   /* only a run's last segment may be shorter */
                m = used++;
                struct msghdr *header = &gmsgs[m].msg_hdr;
                memset(header, 0, sizeof *header);
                header->msg_name = &tms[t];
                header->msg_namelen = sizeof tms[t];
                header->msg_iov = &giov[segments];
                grun[m] = 0;
                size = length[i];
                total = 0;
            }
            giov[segments].iov_base = frame[i];
            giov[segments].iov_len = length[i];
            segments++;
            grun[m]++;
            total += length[i];
        }
    }
    for (int m = 0; m < used; m++) {
        struct msghdr *header = &gmsgs[m].msg_hdr;
        header->msg_iovlen = (size_t)grun[m];
        if (grun[m] > 1) {
            header->msg_control = gcontrol[m].buffer;
            header->msg_controllen = sizeof gcontrol[m].buffer;
            struct cmsghdr *control = CMSG_FIRSTHDR(header);
            control->cmsg_level = SOL_UDP;
            control->cmsg_type = UDP_SEGMENT;
            control->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t segment = (uint16_t)header->msg_iov[0].iov_len;
            memcpy(CMSG_DATA(control), &segment, sizeof segment);
        }
    }
    return used;
}

/* One GSO message's datagrams again, one message each (the kernel refused the run). Returns those sent. */
static int send_plain(int sock, const struct mmsghdr *message)
{
    struct mmsghdr single[BATCH];
    size_t count = message->msg_hdr.msg_iovlen;
    for (size_t i = 0; i < count; i++) {
        memset(&single[i].msg_hdr, 0, sizeof single[i].msg_hdr);
        single[i].msg_hdr.msg_name = message->msg_hdr.msg_name;
        single[i].msg_hdr.msg_namelen = message->msg_hdr.msg_namelen;
        single[i].msg_hdr.msg_iov = &message->msg_hdr.msg_iov[i];
        single[i].msg_hdr.msg_iovlen = 1;
    }
    int done = 0;
    while (done < (int)count) {
        int sent = sendmmsg(sock, single + done, (unsigned)((int)count - done), 0);
        if (sent < 0) {
            if (errno == EINTR) continue;
            break;
        }
        done += sent;
    }
    return done;
}

int main(int argc, char **argv)
{
    int opt, ntms = 0, seconds = 600, gso = 0;
    long long key = -1;
    while ((opt = getopt(argc, argv, "pgk:s:")) != -1) {
        if (opt == 'p') hash_port = 1;
        else if (opt == 'g') gso = 1;
        else if (opt == 'k') key = strtoll(optarg, NULL, 0);
        else if (opt == 's') seconds = atoi(optarg);
        else { fprintf(stderr, "usage: %s [-p] [-g] [-k KEY] [-s SECONDS] TUN BIND_ADDR TM[:PORT]...\n", argv[0]); return 2; }
    }
    if (argc - optind < 3) { fprintf(stderr, "usage: %s [-p] [-g] [-k KEY] [-s SECONDS] TUN BIND_ADDR TM[:PORT]...\n", argv[0]); return 2; }
    const int use_gso = gso;

    static struct sockaddr_in tms[MAX_TMS];
    for (int i = optind + 2; i < argc && ntms < MAX_TMS; i++) parse_endpoint(argv[i], 4754, &tms[ntms++]);

    /* The row table: each of the 65,536 rows names one TM (the product's is a rendezvous build; here a
     * hash of the row number spreads them the same way, and the lookup is what the loop pays). */
    static uint8_t table[ROWS];
    for (uint32_t row = 0; row < ROWS; row++) table[row] = (uint8_t)(xxh64(&row, sizeof row, SEED) % (uint64_t)ntms);

    int tun = open_tun(argv[optind]);
    struct sockaddr_in bind_addr;
    parse_endpoint(argv[optind + 1], 0, &bind_addr);
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int bufsize = 4 << 20;
    setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &bufsize, sizeof bufsize);
    if (bind(sock, (struct sockaddr *)&bind_addr, sizeof bind_addr) < 0) { perror("bind"); return 1; }

    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    printf("ready\n");
    fflush(stdout);

    static uint8_t buffers[BATCH][HEADROOM + MAX_PACKET];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    uint8_t gre[8] = {0};
    size_t gre_len = 4;
    if (key >= 0) {
        gre[0] = 0x20;                                  /* K bit */
        uint32_t k = htonl((uint32_t)key);
        memcpy(gre + 4, &k, 4);
        gre_len = 8;
    }
    unsigned long long rx = 0, tx = 0, dropped = 0, gso_messages = 0, gso_refused = 0;
    uint8_t *frames[BATCH];
    size_t lengths[BATCH];
    int tm_of[BATCH];
    time_t deadline = time(NULL) + seconds;
    struct pollfd pfd = {.fd = tun, .events = POLLIN};

    while (!stop && time(NULL) < deadline) {
        int n = 0;
        while (n < BATCH) {
            uint8_t *pkt = buffers[n] + HEADROOM;
            ssize_t len = read(tun, pkt, MAX_PACKET);
            if (len < 0) {
                if (errno == EAGAIN || errno == EINTR) break;
                perror("read tun");
                stop = 1;
                break;
            }
            rx++;
            uint8_t k[18];
            size_t klen = endpoint_key(pkt, (size_t)len, k);
            if (!klen) { dropped++; continue; }
            int tm = table[xxh64(k, klen, SEED) & (ROWS - 1)];
            uint8_t *frame = pkt - gre_len;
            memcpy(frame, gre, gre_len);
            frame[2] = pkt[0] >> 4 == 6 ? 0x86 : 0x08;  /* GRE protocol type: inner IPv6 / IPv4 */
            frame[3] = pkt[0] >> 4 == 6 ? 0xdd : 0x00;
            iov[n].iov_base = frame;
            iov[n].iov_len = (size_t)len + gre_len;
            memset(&msgs[n].msg_hdr, 0, sizeof msgs[n].msg_hdr);
            msgs[n].msg_hdr.msg_name = &tms[tm];
            msgs[n].msg_hdr.msg_namelen = sizeof tms[tm];
            msgs[n].msg_hdr.msg_iov = &iov[n];
            msgs[n].msg_hdr.msg_iovlen = 1;
            frames[n] = frame;
            lengths[n] = (size_t)len + gre_len;
            tm_of[n] = tm;
            n++;
        }
        if (gso && n > 0) {
            int used = build_gso(n, frames, lengths, tm_of, tms);
            for (int done = 0; done < used;) {
                int sent = sendmmsg(sock, gmsgs + done, (unsigned)(used - done), 0);
                if (sent > 0) {
                    for (int m = done; m < done + sent; m++) {
                        tx += (unsigned long long)grun[m];
                        gso_messages += grun[m] > 1;
                    }
                    done += sent;
                    continue;
                }
                if (sent < 0 && errno == EINTR) continue;
                int error = errno;
                if (grun[done] > 1 && (error == EIO || error == ENOPROTOOPT || error == EINVAL || error == EMSGSIZE)) {
                    /* GSO itself refused this run: again without it; EIO/ENOPROTOOPT: the device cannot, ever. */
                    gso_refused++;
                    if (error == EIO || error == ENOPROTOOPT) {
                        fprintf(stderr, "dist_loop: GSO refused (%s), sending plain from now on\n", strerror(error));
                        gso = 0;
                    }
                    int plain = send_plain(sock, &gmsgs[done]);
                    tx += (unsigned long long)plain;
                    dropped += (unsigned long long)(grun[done] - plain);
                    done++;
                    continue;
                }
                for (int m = done; m < used; m++)      /* EAGAIN/ENOBUFS: lose the rest, as the agent does */
                    dropped += (unsigned long long)grun[m];
                break;
            }
        } else {
            for (int done = 0; done < n;) {
                int sent = sendmmsg(sock, msgs + done, (unsigned)(n - done), 0);
                if (sent < 0) {
                    if (errno == EINTR) continue;
                    dropped += (unsigned long long)(n - done);  /* EAGAIN/ENOBUFS: lose the rest, as the agent does */
                    break;
                }
                tx += (unsigned long long)sent;
                done += sent;
            }
        }
        if (n < BATCH) poll(&pfd, 1, 200);  /* drained: wait for more (bounded, to see stop/deadline) */
    }
    if (use_gso)
        printf("rx %llu tx %llu dropped %llu gso_messages %llu gso_refused %llu\n", rx, tx, dropped, gso_messages,
               gso_refused);
    else
        printf("rx %llu tx %llu dropped %llu\n", rx, tx, dropped);
    return 0;
}
