/* tm_relay.c: the TM-shaped C baseline (benchmarks/run.py, docs/performance.md).
 *
 * The loop the Python TM agent is measured against:
 *   recvmmsg (batch 64) GRE-in-UDP datagrams
 *   per datagram: parse GRE (4 or 8 bytes), the inner IPv4 header and TCP/UDP ports; look the 5-tuple up
 *                 in a conntrack hash table — the first packet of a flow to a configured VIP:port opens an
 *                 entry (DNAT to its server), later ones find it; rewrite the destination address and port
 *                 with incremental checksum updates (RFC 1624: IPv4 header, TCP/UDP; a zero UDP checksum
 *                 stays zero)
 *   sendmmsg the batch back, GRE-in-UDP, to the distributor (REPLY address:port; the product's TM sends
 *   to its configured [[distributor]] endpoint, not to the datagram's source port).
 * IPv4 inner packets only, no timeouts, no reverse direction: the floor for an established-flow DNAT.
 *
 * usage: tm_relay [-s SECONDS] BIND_ADDR:PORT REPLY_ADDR:PORT PROTO:VIP:PORT=SERVER:PORT [...]
 *   e.g. tm_relay 192.0.2.6:4754 192.0.2.2:4754 udp:203.0.113.80:9=203.0.113.10:9
 * Prints "ready", runs until SIGTERM/SIGINT or SECONDS (default 600), prints
 * "rx N tx N opened N dropped N".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "xxh64.h"

#define BATCH 64
#define MAX_DATAGRAM 65536
#define CT_SLOTS (1 << 18)   /* open addressing, linear probing; plenty for the benchmark's flows */
#define MAX_SERVICES 16
#define SEED 0x746d72656c6179ULL

struct tuple { uint32_t src, dst; uint16_t sport, dport; uint8_t proto, pad[3]; };
struct entry { struct tuple key; uint32_t new_dst; uint16_t new_dport; uint8_t used; };
struct service { uint8_t proto; uint32_t vip; uint16_t port; uint32_t server; uint16_t server_port; };

static struct entry conntrack[CT_SLOTS];
static struct service services[MAX_SERVICES];
static int nservices;
static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static void parse_endpoint(const char *text, uint32_t *addr, uint16_t *port)
{
    char host[64];
    const char *colon = strrchr(text, ':');
    size_t n = colon ? (size_t)(colon - text) : 0;
    if (!colon || n >= sizeof host) { fprintf(stderr, "bad endpoint %s\n", text); exit(2); }
    memcpy(host, text, n);
    host[n] = 0;
    if (inet_pton(AF_INET, host, addr) != 1) { fprintf(stderr, "bad address %s\n", text); exit(2); }
    *port = htons((uint16_t)atoi(colon + 1));
}

static void parse_service(const char *text)
{
    char buf[128], *eq;
    struct service *s = &services[nservices++];
    snprintf(buf, sizeof buf, "%s", text);
    eq = strchr(buf, '=');
    if (!eq || nservices > MAX_SERVICES) { fprintf(stderr, "bad service %s\n", text); exit(2); }
    *eq = 0;
    s->proto = strncmp(buf, "tcp:", 4) == 0 ? 6 : 17;
    parse_endpoint(strchr(buf, ':') + 1, &s->vip, &s->port);
    parse_endpoint(eq + 1, &s->server, &s->server_port);
}

/* RFC 1624 incremental update: HC' = ~(~HC + ~m + m'), over 16-bit words (network order in, out). */
static inline uint16_t csum_update(uint16_t check, uint32_t old_sum, uint32_t new_sum)
{
    uint32_t sum = (uint16_t)~ntohs(check) + old_sum + new_sum;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return htons((uint16_t)~sum);
}
static inline uint32_t words(uint32_t x) { x = ntohl(x); return (x >> 16) + (x & 0xffff); }
static inline uint32_t not_words(uint32_t x) { return words(~x); }

/* The entry for this 5-tuple; opens one when the tuple is for a service. NULL: no state, no service. */
static struct entry *lookup(const struct tuple *t, unsigned long long *opened)
{
    uint32_t slot = (uint32_t)xxh64(t, sizeof *t, SEED) & (CT_SLOTS - 1);
    for (int probe = 0; probe < 64; probe++, slot = (slot + 1) & (CT_SLOTS - 1)) {
        struct entry *e = &conntrack[slot];
        if (!e->used) {
            for (int i = 0; i < nservices; i++) {
                const struct service *s = &services[i];
                if (s->proto == t->proto && s->vip == t->dst && s->port == t->dport) {
                    e->key = *t;
                    e->new_dst = s->server;
                    e->new_dport = s->server_port;
                    e->used = 1;
                    (*opened)++;
                    return e;
                }
            }
            return NULL;
        }
        if (memcmp(&e->key, t, sizeof *t) == 0) return e;
    }
    return NULL;   /* table region full */
}

/* DNAT one GRE payload in place; 0 when it is not something we forward. */
static int relay(uint8_t *d, size_t len, unsigned long long *opened)
{
    if (len < 4) return 0;
    size_t gre = 4 + ((d[0] & 0x80) ? 4 : 0) + ((d[0] & 0x20) ? 4 : 0) + ((d[0] & 0x10) ? 4 : 0);
    if (len < gre + 20 || d[2] != 0x08 || d[3] != 0x00) return 0;   /* inner IPv4 only */
    uint8_t *ip = d + gre;
    size_t ihl = (size_t)(ip[0] & 15) * 4, inner = len - gre;
    if (ip[0] >> 4 != 4 || ihl < 20 || inner < ihl + 8) return 0;
    if (((ip[6] & 0x1f) << 8 | ip[7]) || (ip[6] & 0x20)) return 0;  /* fragments: not in this baseline */
    uint8_t *l4 = ip + ihl;
    struct tuple t;
    memset(&t, 0, sizeof t);
    memcpy(&t.src, ip + 12, 4);
    memcpy(&t.dst, ip + 16, 4);
    memcpy(&t.sport, l4, 2);
    memcpy(&t.dport, l4 + 2, 2);
    t.proto = ip[9];
    if (t.proto != 6 && t.proto != 17) return 0;
    struct entry *e = lookup(&t, opened);
    if (!e) return 0;

    uint32_t old_dst = t.dst;
    uint16_t check;
    memcpy(ip + 16, &e->new_dst, 4);
    memcpy(&check, ip + 10, 2);
    check = csum_update(check, not_words(old_dst), words(e->new_dst));
    memcpy(ip + 10, &check, 2);

    size_t check_at = t.proto == 6 ? 16 : 6;
    if (inner < ihl + check_at + 2) return 0;
    memcpy(&check, l4 + check_at, 2);
    memcpy(l4 + 2, &e->new_dport, 2);
    if (t.proto == 6 || check != 0) {   /* UDP over IPv4: zero means "no checksum" */
        uint32_t old_sum = not_words(old_dst) + (uint16_t)~ntohs(t.dport);
        uint32_t new_sum = words(e->new_dst) + ntohs(e->new_dport);
        check = csum_update(check, old_sum, new_sum);
        if (t.proto == 17 && check == 0) check = 0xffff;
        memcpy(l4 + check_at, &check, 2);
    }
    return 1;
}

int main(int argc, char **argv)
{
    int opt, seconds = 600;
    while ((opt = getopt(argc, argv, "s:")) != -1) {
        if (opt == 's') seconds = atoi(optarg);
        else { fprintf(stderr, "usage: %s [-s SECONDS] BIND:PORT REPLY:PORT PROTO:VIP:PORT=SERVER:PORT...\n", argv[0]); return 2; }
    }
    if (argc - optind < 3) { fprintf(stderr, "usage: %s [-s SECONDS] BIND:PORT REPLY:PORT PROTO:VIP:PORT=SERVER:PORT...\n", argv[0]); return 2; }
    struct sockaddr_in local = {.sin_family = AF_INET}, reply = {.sin_family = AF_INET};
    parse_endpoint(argv[optind], &local.sin_addr.s_addr, &local.sin_port);
    parse_endpoint(argv[optind + 1], &reply.sin_addr.s_addr, &reply.sin_port);
    for (int i = optind + 2; i < argc; i++) parse_service(argv[i]);

    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int bufsize = 4 << 20;
    setsockopt(sock, SOL_SOCKET, SO_RCVBUF, &bufsize, sizeof bufsize);
    setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &bufsize, sizeof bufsize);
    struct timeval tick = {.tv_sec = 0, .tv_usec = 200000};   /* wake up to see stop/deadline */
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tick, sizeof tick);
    if (bind(sock, (struct sockaddr *)&local, sizeof local) < 0) { perror("bind"); return 1; }

    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    printf("ready\n");
    fflush(stdout);

    static uint8_t buffers[BATCH][MAX_DATAGRAM];
    struct mmsghdr in[BATCH], out[BATCH];
    struct iovec iov_in[BATCH], iov_out[BATCH];
    for (int i = 0; i < BATCH; i++) {
        iov_in[i] = (struct iovec){.iov_base = buffers[i], .iov_len = MAX_DATAGRAM};
        memset(&in[i], 0, sizeof in[i]);
        in[i].msg_hdr.msg_iov = &iov_in[i];
        in[i].msg_hdr.msg_iovlen = 1;
    }
    unsigned long long rx = 0, tx = 0, opened = 0, dropped = 0;
    time_t deadline = time(NULL) + seconds;

    while (!stop && time(NULL) < deadline) {
        int n = recvmmsg(sock, in, BATCH, MSG_WAITFORONE, NULL);   /* >= 1, then whatever else is queued */
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            perror("recvmmsg");
            break;
        }
        int m = 0;
        for (int i = 0; i < n; i++) {
            rx++;
            if (!relay(buffers[i], in[i].msg_len, &opened)) { dropped++; continue; }
            iov_out[m] = (struct iovec){.iov_base = buffers[i], .iov_len = in[i].msg_len};
            memset(&out[m], 0, sizeof out[m]);
            out[m].msg_hdr.msg_name = &reply;
            out[m].msg_hdr.msg_namelen = sizeof reply;
            out[m].msg_hdr.msg_iov = &iov_out[m];
            out[m].msg_hdr.msg_iovlen = 1;
            m++;
        }
        for (int done = 0; done < m;) {
            int sent = sendmmsg(sock, out + done, (unsigned)(m - done), MSG_DONTWAIT);
            if (sent < 0) {
                if (errno == EINTR) continue;
                dropped += (unsigned long long)(m - done);
                break;
            }
            tx += (unsigned long long)sent;
            done += sent;
        }
    }
    printf("rx %llu tx %llu opened %llu dropped %llu\n", rx, tx, opened, dropped);
    return 0;
}
