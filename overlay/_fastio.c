/* Batched datagram and TUN I/O for the agents' hot path: one system call (recvmmsg/sendmmsg) or one
 * call into C (TUN reads) for up to a batch of packets, instead of one Python-level call each.
 *
 * The pure-Python implementation of the same API is overlay/runtime/batchio.py, which imports this module
 * when it was built (an optional extension: `pip install` skips it where no compiler or Python headers
 * exist) and otherwise falls back; tests/runtime/test_batchio.py checks that both behave alike.
 *
 *   recv_batch(sock, max) -> list[(bytes, (host, port))]  recvmmsg, MSG_DONTWAIT; [] when nothing waits
 *   send_batch(sock, items, start) -> (sent, errno)        sendmmsg of items[start:], (bytes, (host, port)),
 *                                                           equal-sized runs to one peer as UDP GSO
 *   read_batch(fd, max) -> list[bytes]                      read() until EAGAIN or max (a TUN queue)
 *   read_batch(fd, max, 1) -> (items, dropped)              the same from a TUN with a vnet header: an
 *                                                           item is a packet, or the list of segments a
 *                                                           super-packet splits into (offload.split)
 *   write_batch(fd, packets, vnet) -> (written, failed, writes, bytes)  write() each packet; with vnet,
 *                                                           runs of one TCP flow as super-packets (offload.coalesce)
 *   split(header, packet) / coalesce(packets)               the two transformations alone, for the tests
 *
 * recv_batch asks for UDP GRO's segment size: a datagram the kernel received (or a local sender sent)
 * as one GSO train comes back as the datagrams it holds, each its own item — or, with recv_batch(sock,
 * max, 1), as one item ([payload, ...], peer).
 *   flow_run(payloads, start, offset) -> n                  payloads[start:start+n] carry one TCP flow
 *   nat_run(payloads, start, count, at, prefix, addresses, ports, ip_delta, l4_delta) -> [datagram]
 *                                                           a TM's translation of such a run
 *   distribute(packets, start, state) -> (queues, combos, stop)  the distributor's fast path, compiled
 *   deliver(items, start, state) -> (inners, stop)          its from_overlay for TMs' data, compiled
 *   translate(items, start, state, now) -> (outputs, stop, received, last)  the TM's fast path, compiled
 *   window_accept(region, key, counter) -> 0..3             a shared replay window (overlay/antireplay.py)
 *
 * One thread only: the message arrays and slots are static (the agents are single-threaded; workers are
 * processes), and recv_batch lets the kernel fill them with the GIL released.
 *
 * Errors: recv_batch and read_batch raise OSError when the first call fails with anything but EAGAIN
 * (what was already read is returned first; the error comes on the next call). send_batch never raises
 * for a datagram the kernel refuses: it returns how many were sent and the errno of the one that was
 * not, and the caller counts it and goes on with the next.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define BATCH 64
#define SLOT (65536 + 16) /* a whole UDP payload, or a TUN packet (up to 64 KiB) behind its 10-byte vnet
                            * header, always fits: nothing is ever truncated */

static char *slots;               /* BATCH buffers of SLOT bytes, allocated on first use */
static struct mmsghdr messages[BATCH];
static struct iovec vectors[BATCH];
static struct sockaddr_storage names[BATCH];

/* The peer of the previous datagram, and its Python tuple: most datagrams come from a few peers. */
static struct sockaddr_storage last_name;
static socklen_t last_name_len;
static PyObject *last_peer;

/* An int or an object with fileno() (a socket): the descriptor. */
static int to_fd(PyObject *object, void *out) {
    int fd = PyObject_AsFileDescriptor(object);
    if (fd < 0)
        return 0;
    *(int *)out = fd;
    return 1;
}

static int ensure_slots(void) {
    if (slots == NULL) {
        slots = PyMem_RawMalloc((size_t)BATCH * SLOT);
        if (slots == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

static PyObject *peer_tuple(const struct sockaddr_storage *name, socklen_t length) {
    if (last_peer != NULL && length == last_name_len && memcmp(name, &last_name, length) == 0) {
        Py_INCREF(last_peer);
        return last_peer;
    }
    char host[INET6_ADDRSTRLEN];
    int port;
    if (name->ss_family == AF_INET) {
        const struct sockaddr_in *in4 = (const struct sockaddr_in *)name;
        inet_ntop(AF_INET, &in4->sin_addr, host, sizeof host);
        port = ntohs(in4->sin_port);
    } else if (name->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)name;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        port = ntohs(in6->sin6_port);
    } else {
        host[0] = '\0';
        port = 0;
    }
    PyObject *peer = Py_BuildValue("(si)", host, port);
    if (peer == NULL)
        return NULL;
    Py_XDECREF(last_peer);
    Py_INCREF(peer);
    last_peer = peer;
    memcpy(&last_name, name, length);
    last_name_len = length;
    return peer;
}

#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif

/* Room for the UDP_GRO control message (an int: the segment size of a coalesced train). */
static union {
    char buffer[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
} receive_controls[BATCH];

static int gro_segment_size(struct msghdr *header) {
    for (struct cmsghdr *control = CMSG_FIRSTHDR(header); control != NULL; control = CMSG_NXTHDR(header, control)) {
        if (control->cmsg_level == SOL_UDP && control->cmsg_type == UDP_GRO) {
            int size;
            memcpy(&size, CMSG_DATA(control), sizeof size);
            return size;
        }
    }
    return 0;
}

static int append_datagram(PyObject *result, const char *data, Py_ssize_t size, PyObject *peer) {
    PyObject *payload = PyBytes_FromStringAndSize(data, size);
    PyObject *item = payload ? PyTuple_Pack(2, payload, peer) : NULL;
    Py_XDECREF(payload);
    if (item == NULL)
        return -1;
    int failed = PyList_Append(result, item);
    Py_DECREF(item);
    return failed;
}

static PyObject *recv_batch(PyObject *self, PyObject *args) {
    int fd, max = BATCH, group = 0;
    if (!PyArg_ParseTuple(args, "O&|ip", to_fd, &fd, &max, &group))
        return NULL;
    if (max < 1 || max > BATCH)
        max = BATCH;
    if (ensure_slots() < 0)
        return NULL;
    for (int i = 0; i < max; i++) {
        vectors[i].iov_base = slots + (size_t)i * SLOT;
        vectors[i].iov_len = SLOT;
        memset(&messages[i].msg_hdr, 0, sizeof messages[i].msg_hdr);
        messages[i].msg_hdr.msg_iov = &vectors[i];
        messages[i].msg_hdr.msg_iovlen = 1;
        messages[i].msg_hdr.msg_name = &names[i];
        messages[i].msg_hdr.msg_namelen = sizeof names[i];
        messages[i].msg_hdr.msg_control = receive_controls[i].buffer;
        messages[i].msg_hdr.msg_controllen = sizeof receive_controls[i].buffer;
    }
    int count;
    Py_BEGIN_ALLOW_THREADS
    count = recvmmsg(fd, messages, (unsigned)max, MSG_DONTWAIT, NULL);
    Py_END_ALLOW_THREADS
    if (count < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return PyList_New(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *result = PyList_New(0);
    if (result == NULL)
        return NULL;
    for (int i = 0; i < count; i++) {
        PyObject *peer = peer_tuple(&names[i], messages[i].msg_hdr.msg_namelen);
        if (peer == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        const char *data = slots + (size_t)i * SLOT;
        Py_ssize_t length = messages[i].msg_len;
        /* A GRO train (the socket has UDP_GRO on): the datagrams it holds, all `segment` bytes but the last. */
        Py_ssize_t segment = gro_segment_size(&messages[i].msg_hdr);
        if (segment <= 0 || segment >= length)
            segment = length;
        int failed = 0;
        Py_ssize_t offset = 0;
        if (group && segment < length) {
            /* `group`: the train as one item, ([payload, ...], peer): one sender's, to be handled together. */
            PyObject *train = PyList_New(0);
            failed = train == NULL;
            while (!failed && offset < length) {
                Py_ssize_t size = length - offset < segment ? length - offset : segment;
                PyObject *payload = PyBytes_FromStringAndSize(data + offset, size);
                failed = payload == NULL || PyList_Append(train, payload) < 0;
                Py_XDECREF(payload);
                offset += size;
            }
            PyObject *item = failed ? NULL : PyTuple_Pack(2, train, peer);
            failed = item == NULL || PyList_Append(result, item) < 0;
            Py_XDECREF(item);
            Py_XDECREF(train);
        } else {
            do {
                Py_ssize_t size = length - offset < segment ? length - offset : segment;
                failed = append_datagram(result, data + offset, size, peer);
                offset += size;
            } while (!failed && offset < length);
        }
        Py_DECREF(peer);
        if (failed) {
            Py_DECREF(result);
            return NULL;
        }
    }
    return result;
}

/* (host, port) -> a sockaddr; 0, or -1 with a Python exception set. */
static int to_sockaddr(PyObject *peer, struct sockaddr_storage *name, socklen_t *length) {
    const char *host;
    int port;
    if (!PyTuple_Check(peer) || !PyArg_ParseTuple(peer, "si", &host, &port))
        return -1;
    memset(name, 0, sizeof *name);
    struct sockaddr_in *in4 = (struct sockaddr_in *)name;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)name;
    if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)port);
        *length = sizeof *in4;
    } else if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        *length = sizeof *in6;
    } else {
        PyErr_Format(PyExc_ValueError, "not an IP address: %s", host);
        return -1;
    }
    return 0;
}

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#define GSO_MAX_BYTES 65000 /* a GSO send is one UDP datagram to the stack: under 64 KiB in all */

/* UDP GSO (UDP_SEGMENT): a run of equal-sized datagrams to one peer leaves as one message the kernel
 * segments late — ~0.45 µs a datagram instead of ~4 µs (PERFORMANCE-NOTES.md). Switched off for good
 * when the kernel does not know the option. */
static int gso_enabled = 1;
static union {
    char buffer[CMSG_SPACE(sizeof(uint16_t))];
    struct cmsghdr align;
} controls[BATCH];

static int same_peer(PyObject *a, PyObject *b) {
    if (a == b)
        return 1;
    int equal = PyObject_RichCompareBool(a, b, Py_EQ);
    if (equal < 0) {
        PyErr_Clear();
        return 0;
    }
    return equal;
}

/* Fill messages for items[first:first+count] (count <= BATCH datagrams), grouping runs for GSO when
 * `gso`; run_length[m] = datagrams in message m. Returns the number of messages, or -1 (exception). */
static int build_messages(PyObject *items, Py_ssize_t first, int count, int gso, int *run_length) {
    int messages_used = 0;
    for (int i = 0; i < count;) {
        PyObject *item = PyList_GET_ITEM(items, first + i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(item, 0))) {
            PyErr_SetString(PyExc_TypeError, "send_batch items are (bytes, (host, port))");
            return -1;
        }
        PyObject *payload = PyTuple_GET_ITEM(item, 0), *peer = PyTuple_GET_ITEM(item, 1);
        Py_ssize_t size = PyBytes_GET_SIZE(payload);
        int m = messages_used++;
        socklen_t length;
        if (to_sockaddr(peer, &names[m], &length) < 0)
            return -1;
        struct msghdr *header = &messages[m].msg_hdr;
        memset(header, 0, sizeof *header);
        header->msg_name = &names[m];
        header->msg_namelen = length;
        header->msg_iov = &vectors[i];
        vectors[i].iov_base = PyBytes_AS_STRING(payload);
        vectors[i].iov_len = (size_t)size;
        int run = 1;
        Py_ssize_t total = size;
        while (gso && size > 0 && i + run < count) {
            PyObject *next = PyList_GET_ITEM(items, first + i + run);
            if (!PyTuple_Check(next) || PyTuple_GET_SIZE(next) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(next, 0)))
                break;
            Py_ssize_t next_size = PyBytes_GET_SIZE(PyTuple_GET_ITEM(next, 0));
            if (next_size == 0 || next_size > size || total + next_size > GSO_MAX_BYTES ||
                !same_peer(peer, PyTuple_GET_ITEM(next, 1)))
                break;
            vectors[i + run].iov_base = PyBytes_AS_STRING(PyTuple_GET_ITEM(next, 0));
            vectors[i + run].iov_len = (size_t)next_size;
            total += next_size;
            run++;
            if (next_size < size)
                break; /* only the last segment may be shorter */
        }
        header->msg_iovlen = (size_t)run;
        if (run > 1) {
            header->msg_control = controls[m].buffer;
            header->msg_controllen = sizeof controls[m].buffer;
            struct cmsghdr *control = CMSG_FIRSTHDR(header);
            control->cmsg_level = SOL_UDP;
            control->cmsg_type = UDP_SEGMENT;
            control->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t segment = (uint16_t)size;
            memcpy(CMSG_DATA(control), &segment, sizeof segment);
        }
        run_length[m] = run;
        i += run;
    }
    return messages_used;
}

static PyObject *send_batch(PyObject *self, PyObject *args) {
    int fd;
    PyObject *items;
    Py_ssize_t start = 0;
    if (!PyArg_ParseTuple(args, "O&O!|n", to_fd, &fd, &PyList_Type, &items, &start))
        return NULL;
    if (start < 0)
        start = 0;
    Py_ssize_t total = PyList_GET_SIZE(items);
    Py_ssize_t sent = 0; /* datagrams */
    int run_length[BATCH];
    while (start + sent < total) {
        Py_ssize_t first = start + sent;
        int count = (int)(total - first < BATCH ? total - first : BATCH);
        int gso = gso_enabled;
        int used = build_messages(items, first, count, gso, run_length);
        if (used < 0)
            return NULL;
        int done = sendmmsg(fd, messages, (unsigned)used, MSG_DONTWAIT);
        int error = done < 0 ? errno : 0;
        if (done < 0)
            done = 0;
        for (int m = 0; m < done; m++)
            sent += run_length[m];
        if (done == used)
            continue;
        if (error == 0) {
            /* The kernel stopped at a message it refused: ask again for it alone, to learn why. */
            int single = sendmmsg(fd, &messages[done], 1, MSG_DONTWAIT);
            if (single == 1) {
                sent += run_length[done];
                continue;
            }
            error = errno;
        }
        if (run_length[done] > 1 && (error == EIO || error == EINVAL || error == ENOPROTOOPT || error == EMSGSIZE)) {
            /* GSO itself refused (no checksum offload, a segment over the MTU, an old kernel): this run
             * again without it, datagram by datagram. */
            if (error == EIO || error == ENOPROTOOPT)
                gso_enabled = 0;
            int plain = build_messages(items, start + sent, run_length[done], 0, run_length);
            if (plain < 0)
                return NULL;
            int again = sendmmsg(fd, messages, (unsigned)plain, MSG_DONTWAIT);
            if (again < 0)
                return Py_BuildValue("(ni)", sent, errno);
            sent += again;
            if (again < plain) {
                int single = sendmmsg(fd, &messages[again], 1, MSG_DONTWAIT);
                if (single < 0)
                    return Py_BuildValue("(ni)", sent, errno);
                sent += single;
            }
            continue;
        }
        return Py_BuildValue("(ni)", sent, error);
    }
    return Py_BuildValue("(ni)", sent, 0);
}

static PyObject *set_gso(PyObject *self, PyObject *args) {
    int enabled;
    if (!PyArg_ParseTuple(args, "p", &enabled))
        return NULL;
    int previous = gso_enabled;
    gso_enabled = enabled;
    return PyBool_FromLong(previous);
}

/* ---- TUN offloads: the virtio-net header (overlay/runtime/offload.py is the reference) --------------- */

#define VNET_LEN 10
#define F_NEEDS_CSUM 0x01
#define GSO_NONE 0
#define GSO_TCPV4 1
#define GSO_TCPV6 4
#define GSO_ECN 0x80
#define MAX_SUPER 65535
#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_ECE 0x40
#define TCP_CWR 0x80

/* Why a read was dropped, in offload.py's words (the TUN counts tun_rx_offload_<reason>). */
enum { SPLIT_OK = 0, SPLIT_SHORT, SPLIT_BAD_CSUM_OFFSET, SPLIT_UNSUPPORTED_GSO, SPLIT_BAD_GSO, SPLIT_REASONS };
static const char *split_reasons[SPLIT_REASONS] = {"ok", "short", "bad-csum-offset", "unsupported-gso", "bad-gso"};

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v; }

static uint16_t fold(uint64_t sum) {
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)sum;
}

static uint16_t swap_if_little(uint16_t value) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return (uint16_t)(value << 8 | value >> 8);
#else
    return value;
#endif
}

/* The folded one's-complement sum of `data` as big-endian 16-bit words, plus `initial` (a folded sum).
 * Summed as native 32-bit words and swapped at the end: the sum does not depend on byte order (RFC 1071). */
static uint16_t ones_sum(const uint8_t *data, size_t length, uint16_t initial) {
    uint64_t sum = swap_if_little(initial);
    while (length >= 8) {
        uint64_t word;
        memcpy(&word, data, 8);
        sum += (word & 0xFFFFFFFFu) + (word >> 32);
        data += 8;
        length -= 8;
    }
    if (length >= 4) {
        uint32_t word;
        memcpy(&word, data, 4);
        sum += word;
        data += 4;
        length -= 4;
    }
    if (length >= 2) {
        uint16_t word;
        memcpy(&word, data, 2);
        sum += word;
        data += 2;
        length -= 2;
    }
    if (length) {
        uint16_t word = 0;
        memcpy(&word, data, 1); /* the byte is the high half of a word padded with zero */
        sum += word;
    }
    return swap_if_little(fold(sum));
}

/* The IPv4 or IPv6 pseudo-header's folded sum for TCP (protocol 6) of `length` bytes. */
static uint16_t pseudo_sum(const uint8_t *packet, int version, uint32_t length) {
    const uint8_t *addresses = version == 4 ? packet + 12 : packet + 8;
    size_t size = version == 4 ? 8 : 32;
    return ones_sum(addresses, size, fold((uint64_t)6 + (length & 0xFFFF) + (length >> 16)));
}

static void ipv4_header_checksum(uint8_t *packet, size_t length) {
    put16(packet + 10, 0);
    put16(packet + 10, (uint16_t)~ones_sum(packet, length, 0));
}

/* One TUN read (vnet header + packet) -> `out` gets the packet, or the list of segments a super-packet
 * splits into (offload.split). Returns SPLIT_OK, a reason to drop it, or -1 with a Python error. */
static int split_into(const uint8_t *read, size_t size, PyObject *out) {
    if (size < VNET_LEN)
        return SPLIT_SHORT;
    uint8_t flags = read[0], gso = read[1] & (uint8_t)~GSO_ECN;
    uint16_t gso_size, csum_start, csum_offset;
    memcpy(&gso_size, read + 4, 2);
    memcpy(&csum_start, read + 6, 2);
    memcpy(&csum_offset, read + 8, 2);
    const uint8_t *packet = read + VNET_LEN;
    size_t length = size - VNET_LEN;
    if (gso == GSO_NONE) {
        PyObject *copy = PyBytes_FromStringAndSize((const char *)packet, (Py_ssize_t)length);
        if (copy == NULL)
            return -1;
        if (flags & F_NEEDS_CSUM) {
            if ((size_t)csum_start + csum_offset + 2 > length) {
                Py_DECREF(copy);
                return SPLIT_BAD_CSUM_OFFSET;
            }
            uint8_t *data = (uint8_t *)PyBytes_AS_STRING(copy);
            uint16_t value = (uint16_t)~ones_sum(data + csum_start, length - csum_start, 0);
            put16(data + csum_start + csum_offset, value ? value : 0xFFFF);
        }
        int failed = PyList_Append(out, copy);
        Py_DECREF(copy);
        return failed ? -1 : SPLIT_OK;
    }
    if (gso != GSO_TCPV4 && gso != GSO_TCPV6)
        return SPLIT_UNSUPPORTED_GSO;
    int version = length ? packet[0] >> 4 : 0;
    if (!((version == 4 && gso == GSO_TCPV4) || (version == 6 && gso == GSO_TCPV6)) || gso_size == 0)
        return SPLIT_BAD_GSO;
    size_t l4 = csum_start;
    if (l4 < (version == 4 ? 20u : 40u) || l4 + 20 > length || csum_offset != 16)
        return SPLIT_BAD_GSO;
    size_t header_length = l4 + (size_t)(packet[l4 + 12] >> 4) * 4;
    if (header_length < l4 + 20 || header_length > length)
        return SPLIT_BAD_GSO;
    size_t ihl = (size_t)(packet[0] & 0x0F) * 4;
    if (version == 4 && (ihl < 20 || ihl > l4))
        return SPLIT_BAD_GSO; /* the IPv4 header must end where TCP starts, or before */
    uint16_t ip_id = get16(packet + 4);
    uint32_t sequence = get32(packet + l4 + 4);
    uint8_t tcp_flags = packet[l4 + 13];
    size_t payload = length - header_length;
    size_t segments = payload ? (payload + gso_size - 1) / gso_size : 1;
    size_t largest = header_length + (payload < gso_size ? payload : gso_size);
    if (largest > (version == 4 ? 65535u : 65535u + 40))
        return SPLIT_BAD_GSO; /* a segment whose length its IP header cannot hold */
    PyObject *list = PyList_New((Py_ssize_t)segments);
    if (list == NULL)
        return -1;
    for (size_t index = 0; index < segments; index++) {
        size_t start = index * gso_size;
        size_t chunk = payload - start < gso_size ? payload - start : gso_size;
        size_t total = header_length + chunk;
        PyObject *bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
        if (bytes == NULL) {
            Py_DECREF(list);
            return -1;
        }
        uint8_t *segment = (uint8_t *)PyBytes_AS_STRING(bytes);
        memcpy(segment, packet, header_length);
        memcpy(segment + header_length, packet + header_length + start, chunk);
        if (version == 4) {
            put16(segment + 2, (uint32_t)total);
            put16(segment + 4, (uint16_t)(ip_id + index));
            ipv4_header_checksum(segment, ihl);
        } else {
            put16(segment + 4, (uint32_t)(total - 40));
        }
        put32(segment + l4 + 4, sequence + (uint32_t)start);
        uint8_t each = tcp_flags;
        if (index + 1 < segments)
            each &= (uint8_t)~(TCP_FIN | TCP_PSH);
        if (index)
            each &= (uint8_t)~TCP_CWR;
        segment[l4 + 13] = each;
        put16(segment + l4 + 16, 0);
        uint16_t pseudo = pseudo_sum(segment, version, (uint32_t)(total - l4));
        put16(segment + l4 + 16, (uint16_t)~ones_sum(segment + l4, total - l4, pseudo));
        PyList_SET_ITEM(list, (Py_ssize_t)index, bytes);
    }
    int failed;
    if (segments == 1) {
        failed = PyList_Append(out, PyList_GET_ITEM(list, 0));
    } else {
        failed = PyList_Append(out, list);
    }
    Py_DECREF(list);
    return failed ? -1 : SPLIT_OK;
}

static PyObject *split(PyObject *self, PyObject *args) {
    Py_buffer header, packet;
    if (!PyArg_ParseTuple(args, "y*y*", &header, &packet))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t header_length = header.len < VNET_LEN ? header.len : VNET_LEN;   /* as offload.split: header[:10] */
    uint8_t *joined = PyMem_RawMalloc((size_t)header_length + (size_t)packet.len + 1);
    PyObject *out = joined ? PyList_New(0) : PyErr_NoMemory();
    if (out != NULL) {
        memcpy(joined, header.buf, (size_t)header_length);
        memcpy(joined + header_length, packet.buf, (size_t)packet.len);
        int outcome = header.len < VNET_LEN ? SPLIT_SHORT : split_into(joined, (size_t)(header_length + packet.len), out);
        if (outcome > 0) {
            result = PyUnicode_FromString(split_reasons[outcome]);
        } else if (outcome == 0) {
            PyObject *item = PyList_GET_ITEM(out, 0);
            result = PyList_Check(item) ? item : out;
            Py_INCREF(result);
        }
        Py_DECREF(out);
    }
    PyMem_RawFree(joined);
    PyBuffer_Release(&header);
    PyBuffer_Release(&packet);
    return result;
}

/* A TCP segment of a stream (offload._segment): what coalesce and flow_run compare. */
struct segment {
    const uint8_t *packet;
    size_t length, l4, header_length, payload;
    int version;
    uint16_t ip_id;
    uint32_t sequence;
    uint8_t flags;
};

/* `packet` as a TCP segment of a stream: ACK and at most PSH and ECE, not a fragment, exact lengths. With
 * `coalescing` (as_segment: a super-packet is made of it) it must also carry data and have right checksums,
 * so that the kernel's recomputation never "repairs" a corrupt one; without (as_run_member: a train's run is
 * handled as each of its packets would be), checksums are not looked at. */
static int read_segment(const uint8_t *packet, size_t length, struct segment *out, int coalescing) {
    if (length < 40)
        return 0;
    int version = packet[0] >> 4;
    size_t l4;
    if (version == 4) {
        l4 = (size_t)(packet[0] & 0x0F) * 4;
        if (l4 < 20 || packet[9] != 6 || get16(packet + 2) != length || (get16(packet + 6) & 0x3FFF))
            return 0;
    } else if (version == 6) {
        l4 = 40;
        if (packet[6] != 6 || (size_t)get16(packet + 4) + 40 != length)
            return 0;
    } else {
        return 0;
    }
    if (l4 + 20 > length)
        return 0;
    size_t header_length = l4 + (size_t)(packet[l4 + 12] >> 4) * 4;
    uint8_t flags = packet[l4 + 13];
    if (header_length < l4 + 20 || header_length > length || (coalescing && header_length == length) ||
        !(flags & TCP_ACK) || (flags & ~(TCP_ACK | TCP_PSH | TCP_ECE)))
        return 0;
    if (coalescing) {
        if (version == 4 && ones_sum(packet, l4, 0) != 0xFFFF)
            return 0;
        uint16_t pseudo = pseudo_sum(packet, version, (uint32_t)(length - l4));
        if (ones_sum(packet + l4, length - l4, pseudo) != 0xFFFF)
            return 0;
    }
    out->packet = packet;
    out->length = length;
    out->version = version;
    out->l4 = l4;
    out->header_length = header_length;
    out->payload = length - header_length;
    out->ip_id = get16(packet + 4);
    out->sequence = get32(packet + l4 + 4);
    out->flags = flags;
    return 1;
}

static int as_segment(const uint8_t *packet, size_t length, struct segment *out) {
    return read_segment(packet, length, out, 1);
}

static int as_run_member(const uint8_t *packet, size_t length, struct segment *out) {
    return read_segment(packet, length, out, 0);
}

/* The headers are the same but for what differs between the segments of one super-packet (offload._masked). */
static int same_header(const struct segment *a, const struct segment *b) {
    const uint8_t *x = a->packet, *y = b->packet;
    size_t l4 = a->l4;
    if (a->version == 4) {
        if (memcmp(x, y, 2) || memcmp(x + 6, y + 6, 4) || memcmp(x + 12, y + 12, l4 - 12))
            return 0;
    } else if (memcmp(x, y, 4) || memcmp(x + 6, y + 6, 34)) {
        return 0;
    }
    return !memcmp(x + l4, y + l4, 4) && !memcmp(x + l4 + 8, y + l4 + 8, 5) &&
           (x[l4 + 13] & ~TCP_PSH) == (y[l4 + 13] & ~TCP_PSH) && !memcmp(x + l4 + 14, y + l4 + 14, 2) &&
           !memcmp(x + l4 + 18, y + l4 + 18, a->header_length - l4 - 18);
}

/* The longest run of packets[first:] that makes one super-packet (1: it goes alone). */
static Py_ssize_t run_length(PyObject *packets, Py_ssize_t first, struct segment *head) {
    Py_ssize_t count = PyList_GET_SIZE(packets);
    PyObject *item = PyList_GET_ITEM(packets, first);
    if (!as_segment((const uint8_t *)PyBytes_AS_STRING(item), (size_t)PyBytes_GET_SIZE(item), head) ||
        (head->flags & TCP_PSH))
        return 1;
    struct segment last = *head, candidate;
    size_t total = head->header_length + head->payload;
    Py_ssize_t run = 1;
    while (first + run < count) {
        item = PyList_GET_ITEM(packets, first + run);
        if (!PyBytes_Check(item) ||
            !as_segment((const uint8_t *)PyBytes_AS_STRING(item), (size_t)PyBytes_GET_SIZE(item), &candidate))
            break;
        if (candidate.version != head->version || candidate.header_length != head->header_length ||
            candidate.l4 != head->l4 || candidate.payload > head->payload ||
            candidate.sequence != (uint32_t)(last.sequence + last.payload) ||
            (head->version == 4 && candidate.ip_id != (uint16_t)(head->ip_id + run)) ||
            total + candidate.payload > MAX_SUPER || !same_header(head, &candidate))
            break;
        total += candidate.payload;
        last = candidate;
        run++;
        if (candidate.payload < head->payload || (candidate.flags & TCP_PSH))
            break;
    }
    return run;
}

/* flow_run(payloads, start, offset) -> n: payloads[start:start+n] (n >= 1) carry, after the same `offset`
 * bytes of outer header, TCP packets of one flow whose headers differ only where the segments of one
 * stream do (lengths, IPv4 id and checksum, sequence number, PSH, TCP checksum): whatever a node decides
 * for the first from those headers it decides for each (offload.flow_run). */
static PyObject *flow_run(PyObject *self, PyObject *args) {
    PyObject *payloads;
    Py_ssize_t start, offset;
    if (!PyArg_ParseTuple(args, "O!nn", &PyList_Type, &payloads, &start, &offset))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(payloads);
    if (start < 0 || start >= count || offset < 0) {
        PyErr_SetString(PyExc_IndexError, "flow_run: start or offset out of range");
        return NULL;
    }
    PyObject *first = PyList_GET_ITEM(payloads, start);
    if (!PyBytes_Check(first))
        return PyLong_FromLong(1);
    const uint8_t *head_bytes = (const uint8_t *)PyBytes_AS_STRING(first);
    Py_ssize_t head_size = PyBytes_GET_SIZE(first);
    struct segment head, candidate;
    if (head_size <= offset || !as_run_member(head_bytes + offset, (size_t)(head_size - offset), &head))
        return PyLong_FromLong(1);
    Py_ssize_t run = 1;
    while (start + run < count) {
        PyObject *item = PyList_GET_ITEM(payloads, start + run);
        if (!PyBytes_Check(item))
            break;
        const uint8_t *bytes = (const uint8_t *)PyBytes_AS_STRING(item);
        Py_ssize_t size = PyBytes_GET_SIZE(item);
        if (size <= offset || memcmp(bytes, head_bytes, (size_t)offset) ||
            !as_run_member(bytes + offset, (size_t)(size - offset), &candidate) ||
            candidate.version != head.version || candidate.header_length != head.header_length ||
            candidate.l4 != head.l4 || !same_header(&head, &candidate))
            break;
        run++;
    }
    return PyLong_FromSsize_t(run);
}

/* x - delta with an end-around borrow: RFC 1624's ~(~HC + delta), folded, for HC and delta in 0..0xFFFF —
 * exactly the TM's fast path arithmetic (TrafficManager.forward_established). */
static uint16_t minus_delta(uint16_t checksum, long delta) {
    long value = (long)checksum - delta;
    if (value < 0)
        value += 0xFFFF;
    return (uint16_t)value;
}

/* nat_run(payloads, start, count, at, prefix, addresses, ports, ip_delta, l4_delta) -> [datagram]: the TM's
 * established-flow translation of payloads[start:start+count], TCP packets of one connection (flow_run
 * found them): prefix + the inner packet from `at` with the connection's new addresses and ports and both
 * checksums updated by its deltas; `addresses` None: the packet unchanged (firewall mode). */
static PyObject *nat_run(PyObject *self, PyObject *args) {
    PyObject *payloads, *addresses_object;
    Py_ssize_t start, count, at;
    Py_buffer prefix, ports;
    long ip_delta, l4_delta;
    if (!PyArg_ParseTuple(args, "O!nnny*Oy*ll", &PyList_Type, &payloads, &start, &count, &at, &prefix,
                          &addresses_object, &ports, &ip_delta, &l4_delta))
        return NULL;
    PyObject *result = NULL;
    Py_buffer addresses = {0};
    int have_addresses = addresses_object != Py_None;
    if (have_addresses && PyObject_GetBuffer(addresses_object, &addresses, PyBUF_SIMPLE) < 0)
        goto done;
    if (start < 0 || count < 0 || start > PyList_GET_SIZE(payloads) || count > PyList_GET_SIZE(payloads) - start ||
        at < 0 || at > 65536 || ports.len != 4) {
        PyErr_SetString(PyExc_ValueError, "nat_run: bad run or ports");
        goto done;
    }
    result = PyList_New(count);
    for (Py_ssize_t i = 0; result != NULL && i < count; i++) {
        PyObject *item = PyList_GET_ITEM(payloads, start + i);
        Py_ssize_t size = PyBytes_Check(item) ? PyBytes_GET_SIZE(item) : -1;
        if (size < at + 40) {
            PyErr_SetString(PyExc_ValueError, "nat_run: not a TCP packet after `at`");
            Py_CLEAR(result);
            break;
        }
        const uint8_t *inner = (const uint8_t *)PyBytes_AS_STRING(item) + at;
        size_t length = (size_t)(size - at);
        int version = inner[0] >> 4;
        size_t l4 = version == 4 ? (size_t)(inner[0] & 0x0F) * 4 : 40;
        size_t address_offset = version == 4 ? 12 : 8, address_length = version == 4 ? 8 : 32;
        if (l4 + 20 > length || (have_addresses && (size_t)addresses.len != address_length)) {
            PyErr_SetString(PyExc_ValueError, "nat_run: addresses do not fit the packet");
            Py_CLEAR(result);
            break;
        }
        PyObject *out = PyBytes_FromStringAndSize(NULL, prefix.len + (Py_ssize_t)length);
        if (out == NULL) {
            Py_CLEAR(result);
            break;
        }
        uint8_t *data = (uint8_t *)PyBytes_AS_STRING(out);
        memcpy(data, prefix.buf, (size_t)prefix.len);
        uint8_t *packet = data + prefix.len;
        memcpy(packet, inner, length);
        if (have_addresses) {
            if (version == 4)
                put16(packet + 10, minus_delta(get16(packet + 10), ip_delta));
            memcpy(packet + address_offset, addresses.buf, address_length);
            memcpy(packet + l4, ports.buf, 4);
            put16(packet + l4 + 16, minus_delta(get16(packet + l4 + 16), l4_delta));
        }
        PyList_SET_ITEM(result, i, out);
    }
done:
    if (have_addresses && addresses.obj != NULL)
        PyBuffer_Release(&addresses);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&ports);
    return result;
}

static uint8_t super_buffer[VNET_LEN + MAX_SUPER];

/* packets[first:first+run] as one vnet-headed super-packet in super_buffer; returns its length. */
static size_t build_super(PyObject *packets, Py_ssize_t first, Py_ssize_t run, const struct segment *head) {
    uint8_t *packet = super_buffer + VNET_LEN;
    size_t l4 = head->l4, length = head->header_length;
    memcpy(packet, head->packet, head->header_length);
    uint8_t last_flags = head->flags;
    for (Py_ssize_t i = 0; i < run; i++) {
        PyObject *item = PyList_GET_ITEM(packets, first + i);
        size_t size = (size_t)PyBytes_GET_SIZE(item);
        memcpy(packet + length, PyBytes_AS_STRING(item) + head->header_length, size - head->header_length);
        length += size - head->header_length;
        last_flags = (uint8_t)PyBytes_AS_STRING(item)[l4 + 13];
    }
    if (head->version == 4) {
        put16(packet + 2, (uint32_t)length);
        ipv4_header_checksum(packet, l4);
    } else {
        put16(packet + 4, (uint32_t)(length - 40));
    }
    packet[l4 + 13] = head->flags | (last_flags & TCP_PSH);
    /* A partial checksum: the pseudo-header's folded sum over the super-packet's TCP length. */
    put16(packet + l4 + 16, pseudo_sum(packet, head->version, (uint32_t)(length - l4)));
    uint16_t header_length = (uint16_t)head->header_length, gso_size = (uint16_t)head->payload;
    uint16_t csum_start = (uint16_t)l4, csum_offset = 16;
    super_buffer[0] = F_NEEDS_CSUM;
    super_buffer[1] = head->version == 4 ? GSO_TCPV4 : GSO_TCPV6;
    memcpy(super_buffer + 2, &header_length, 2);
    memcpy(super_buffer + 4, &gso_size, 2);
    memcpy(super_buffer + 6, &csum_start, 2);
    memcpy(super_buffer + 8, &csum_offset, 2);
    return VNET_LEN + length;
}

static int check_packets(PyObject *packets) {
    Py_ssize_t count = PyList_GET_SIZE(packets);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!PyBytes_Check(PyList_GET_ITEM(packets, i))) {
            PyErr_SetString(PyExc_TypeError, "packets must be bytes");
            return -1;
        }
    }
    return 0;
}

static const uint8_t empty_header[VNET_LEN];

static PyObject *coalesce(PyObject *self, PyObject *args) {
    PyObject *packets;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &packets) || check_packets(packets) < 0)
        return NULL;
    PyObject *writes = PyList_New(0);
    Py_ssize_t count = PyList_GET_SIZE(packets);
    for (Py_ssize_t first = 0; writes != NULL && first < count;) {
        struct segment head;
        Py_ssize_t run = run_length(packets, first, &head);
        PyObject *write;
        if (run > 1) {
            write = PyBytes_FromStringAndSize((const char *)super_buffer, (Py_ssize_t)build_super(packets, first, run, &head));
        } else {
            PyObject *item = PyList_GET_ITEM(packets, first);
            write = PyBytes_FromStringAndSize(NULL, VNET_LEN + PyBytes_GET_SIZE(item));
            if (write != NULL) {
                memset(PyBytes_AS_STRING(write), 0, VNET_LEN);
                memcpy(PyBytes_AS_STRING(write) + VNET_LEN, PyBytes_AS_STRING(item), (size_t)PyBytes_GET_SIZE(item));
            }
        }
        if (write == NULL || PyList_Append(writes, write) < 0)
            Py_CLEAR(writes);
        Py_XDECREF(write);
        first += run;
    }
    return writes;
}

/* write_batch(fd, packets, vnet) -> (written, failed, writes, written_bytes): packets written and lost
 * (each write() refused loses the packets it carried), the write() calls made, and the bytes of the
 * packets written (without vnet headers). */
static PyObject *write_batch(PyObject *self, PyObject *args) {
    int fd, vnet = 0;
    PyObject *packets;
    if (!PyArg_ParseTuple(args, "O&O!|p", to_fd, &fd, &PyList_Type, &packets, &vnet) || check_packets(packets) < 0)
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(packets), written = 0, failed = 0, writes = 0, written_bytes = 0;
    for (Py_ssize_t first = 0; first < count;) {
        PyObject *item = PyList_GET_ITEM(packets, first);
        Py_ssize_t run = 1;
        ssize_t done;
        struct segment head;
        if (vnet && (run = run_length(packets, first, &head)) > 1) {
            done = write(fd, super_buffer, build_super(packets, first, run, &head));
        } else if (vnet) {
            struct iovec parts[2] = {{(void *)empty_header, VNET_LEN},
                                     {PyBytes_AS_STRING(item), (size_t)PyBytes_GET_SIZE(item)}};
            done = writev(fd, parts, 2);
        } else {
            done = write(fd, PyBytes_AS_STRING(item), (size_t)PyBytes_GET_SIZE(item));
        }
        writes++;
        if (done < 0) {
            failed += run;
        } else {
            written += run;
            for (Py_ssize_t i = 0; i < run; i++)
                written_bytes += PyBytes_GET_SIZE(PyList_GET_ITEM(packets, first + i));
        }
        first += run;
    }
    return Py_BuildValue("(nnnn)", written, failed, writes, written_bytes);
}

/* ---- the distributor's fast path, compiled (Distributor.compiled_state / from_tun) --------------------- */

#include "xxh64.h"

#define COMBOS 64

/* distribute(packets, start, state) -> (queues, combos, stop): the distributor's fast path
 * (`Distributor._fast_tm` with `parse_flow`'s fast branch) for packets[start:], in order, until the first
 * packet it does not serve — that one, at `stop`, goes to `Distributor.from_tun` (it may be served by the
 * full path, or dropped), and the caller calls again from stop + 1. For each packet served: the GRE header
 * (marked where the row has a second chance) + the packet, to its TM, in queues[flow hash % sockets] as
 * (payload, destination) — what `UnderlayEndpoint.send` would queue — and one count for its (cell, TM) in
 * combos [(roles index, TM index, count)]. `state` is `Distributor.compiled_state()`: (roles cache, the 256
 * fast cells by src_roles * 16 + dst_roles, management addresses, largest inner packet, hash ports?, seed,
 * row mask, the table's first choices, its second-chance marks or None, the two unmarked GRE headers, the
 * fleet id, each TM's destination, send sockets). */
static PyObject *distribute(PyObject *self, PyObject *args) {
    PyObject *packets, *state;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "O!nO!", &PyList_Type, &packets, &start, &PyTuple_Type, &state))
        return NULL;
    PyObject *cache, *grid, *management, *first, *fallback, *headers, *dests;
    Py_ssize_t largest, mask, sockets;
    int hash_ports;
    unsigned long long seed;
    long fleet;
    if (!PyArg_ParseTuple(state, "O!O!O!npKnO!OO!lO!n", &PyDict_Type, &cache, &PyList_Type, &grid, &PyDict_Type,
                          &management, &largest, &hash_ports, &seed, &mask, &PyList_Type, &first, &fallback,
                          &PyTuple_Type, &headers, &fleet, &PyList_Type, &dests, &sockets))
        return NULL;
    if (start < 0 || mask < 0 || PyList_GET_SIZE(grid) != 256 || PyTuple_GET_SIZE(headers) != 2 ||
        mask + 1 != PyList_GET_SIZE(first) ||
        (fallback != Py_None && (!PyList_Check(fallback) || PyList_GET_SIZE(fallback) != mask + 1))) {
        PyErr_SetString(PyExc_ValueError, "distribute: inconsistent state");
        return NULL;
    }
    Py_ssize_t queues_count = sockets > 0 ? sockets : 1;
    PyObject *queues = PyList_New(queues_count);
    if (queues == NULL)
        return NULL;
    for (Py_ssize_t q = 0; q < queues_count; q++) {
        PyObject *queue = PyList_New(0);
        if (queue == NULL) {
            Py_DECREF(queues);
            return NULL;
        }
        PyList_SET_ITEM(queues, q, queue);
    }
    int combo_roles[COMBOS];
    long combo_tm[COMBOS];
    Py_ssize_t combo_count[COMBOS];
    int combos_used = 0;
    Py_ssize_t count = PyList_GET_SIZE(packets), index = start;
    int failed = 0;
    for (; index < count; index++) {
        PyObject *item = PyList_GET_ITEM(packets, index);
        if (!PyBytes_Check(item))
            break;
        const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(item);
        Py_ssize_t size = PyBytes_GET_SIZE(item);
        int version;
        size_t address_length;
        const uint8_t *src, *dst;
        uint16_t sport, dport;
        /* parse_flow's fast branch, TCP and UDP only (ICMP and the rest: the Python path). */
        if (size >= 28 && p[0] == 0x45) {
            Py_ssize_t total = get16(p + 2);
            uint8_t protocol = p[9];
            if (total > size || (get16(p + 6) & 0x3FFF))
                break;
            if (protocol == 6) {
                if (total < 40)
                    break;
                Py_ssize_t offset = (Py_ssize_t)(p[32] >> 4) << 2;
                if (offset < 20 || offset > total - 20)
                    break;
            } else if (protocol == 17) {
                Py_ssize_t length = get16(p + 24);
                if (length < 8 || length > total - 20)
                    break;
            } else {
                break;
            }
            version = 4, src = p + 12, dst = p + 16, address_length = 4, sport = get16(p + 20), dport = get16(p + 22);
        } else if (size >= 48 && p[0] >> 4 == 6) {
            Py_ssize_t payload = get16(p + 4);
            uint8_t next = p[6];
            if (40 + payload > size)
                break;
            if (next == 6) {
                if (payload < 20)
                    break;
                Py_ssize_t offset = (Py_ssize_t)(p[52] >> 4) << 2;
                if (offset < 20 || offset > payload)
                    break;
            } else if (next == 17) {
                Py_ssize_t length = get16(p + 44);
                if (length < 8 || length > payload)
                    break;
            } else {
                break;
            }
            version = 6, src = p + 8, dst = p + 24, address_length = 16, sport = get16(p + 40), dport = get16(p + 42);
        } else {
            break;
        }
        if (size > largest)
            break;
        /* _fast_tm: not to a management address; both roles cached; a hashing cell; a row with a TM. */
        PyObject *dst_object = PyBytes_FromStringAndSize((const char *)dst, (Py_ssize_t)address_length);
        PyObject *src_object = dst_object ? PyBytes_FromStringAndSize((const char *)src, (Py_ssize_t)address_length) : NULL;
        if (src_object == NULL) {
            Py_XDECREF(dst_object);
            failed = 1;
            break;
        }
        int managed = PyDict_Contains(management, dst_object);
        PyObject *src_roles = managed ? NULL : PyDict_GetItemWithError(cache, src_object);
        PyObject *dst_roles = src_roles ? PyDict_GetItemWithError(cache, dst_object) : NULL;
        Py_DECREF(src_object);
        Py_DECREF(dst_object);
        if (managed < 0 || PyErr_Occurred()) {
            failed = 1;
            break;
        }
        if (dst_roles == NULL || !PyLong_Check(src_roles) || !PyLong_Check(dst_roles))
            break;
        long source_bits = PyLong_AsLong(src_roles), destination_bits = PyLong_AsLong(dst_roles);
        if (PyErr_Occurred()) {
            failed = 1;
            break;
        }
        if (source_bits < 0 || source_bits > 15 || destination_bits < 0 || destination_bits > 15)
            break;
        int roles = (int)(source_bits * 16 + destination_bits);
        PyObject *cell = PyList_GET_ITEM(grid, roles);
        if (cell == Py_None || !PyTuple_Check(cell) || PyTuple_GET_SIZE(cell) != 3)
            break;
        int by_source = PyTuple_GET_ITEM(cell, 2) == Py_True;
        uint8_t key[18];
        size_t key_length = address_length;
        memcpy(key, by_source ? src : dst, address_length);
        if (hash_ports) {
            uint16_t port = by_source ? sport : dport;
            key[address_length] = (uint8_t)(port >> 8);
            key[address_length + 1] = (uint8_t)port;
            key_length += 2;
        }
        uint64_t value = xxh64(key, key_length, (uint64_t)seed);
        Py_ssize_t row = (Py_ssize_t)(value & (uint64_t)mask);
        long tm = PyLong_AsLong(PyList_GET_ITEM(first, row));
        long mark = fallback == Py_None ? 0 : PyLong_AsLong(PyList_GET_ITEM(fallback, row));
        if (PyErr_Occurred()) {
            failed = 1;
            break;
        }
        if (tm < 0 || tm >= PyList_GET_SIZE(dests))
            break;
        int slot = 0;
        while (slot < combos_used && (combo_roles[slot] != roles || combo_tm[slot] != tm))
            slot++;
        if (slot == COMBOS)
            break; /* this batch's count list is full: the caller calls again */
        /* Committed. */
        uint8_t marked[8];
        const char *header;
        Py_ssize_t header_length;
        if (mark) {
            put16(marked, 0x2000);
            put16(marked + 2, version == 6 ? 0x86DD : 0x0800);
            put32(marked + 4, (uint32_t)(((unsigned long)fleet << 16) | (unsigned long)mark));
            header = (const char *)marked, header_length = 8;
        } else {
            PyObject *plain = PyTuple_GET_ITEM(headers, version == 6);
            header = PyBytes_AS_STRING(plain), header_length = PyBytes_GET_SIZE(plain);
        }
        PyObject *payload = PyBytes_FromStringAndSize(NULL, header_length + size);
        PyObject *entry = payload ? PyTuple_Pack(2, payload, PyList_GET_ITEM(dests, tm)) : NULL;
        if (entry != NULL) {
            memcpy(PyBytes_AS_STRING(payload), header, (size_t)header_length);
            memcpy(PyBytes_AS_STRING(payload) + header_length, p, (size_t)size);
        }
        Py_XDECREF(payload);
        PyObject *queue = PyList_GET_ITEM(queues, sockets > 0 ? (Py_ssize_t)(value % (uint64_t)sockets) : 0);
        if (entry == NULL || PyList_Append(queue, entry) < 0) {
            Py_XDECREF(entry);
            failed = 1;
            break;
        }
        Py_DECREF(entry);
        if (slot == combos_used) {
            combo_roles[slot] = roles, combo_tm[slot] = tm, combo_count[slot] = 0;
            combos_used++;
        }
        combo_count[slot]++;
    }
    if (failed) {
        Py_DECREF(queues);
        return NULL;
    }
    PyObject *combos = PyList_New(combos_used);
    for (int slot = 0; combos != NULL && slot < combos_used; slot++) {
        PyObject *combo = Py_BuildValue("(iln)", combo_roles[slot], combo_tm[slot], combo_count[slot]);
        if (combo == NULL)
            Py_CLEAR(combos);
        else
            PyList_SET_ITEM(combos, slot, combo);
    }
    if (combos == NULL) {
        Py_DECREF(queues);
        return NULL;
    }
    PyObject *result = Py_BuildValue("(NNn)", queues, combos, index);
    return result;
}

/* deliver(items, start, state) -> (inners, stop): the distributor's `from_overlay` for a TM's plain data
 * datagram (no [auth], no edges: `Distributor.delivery_state`), for items[start:] as (payload, peer), in
 * order, until the first it does not serve (at `stop`: the caller hands it to `from_overlay`, then calls
 * again): the peer is a TM (by its underlay endpoint, else by its address), the GRE header is 4 bytes
 * without a key (fleet id 0) or 8 with our fleet id in the key, the protocol IPv4 or IPv6; the inner packet
 * goes into the TUN as it is (`inners`), counted "from-tm" by the caller. state: (TMs by underlay, TMs by
 * address, fleet id). */
static PyObject *deliver(PyObject *self, PyObject *args) {
    PyObject *items, *state, *by_underlay, *by_address;
    Py_ssize_t start;
    long fleet;
    if (!PyArg_ParseTuple(args, "O!nO!", &PyList_Type, &items, &start, &PyTuple_Type, &state) ||
        !PyArg_ParseTuple(state, "O!O!l", &PyDict_Type, &by_underlay, &PyDict_Type, &by_address, &fleet))
        return NULL;
    if (start < 0)
        start = 0;
    PyObject *inners = PyList_New(0);
    if (inners == NULL)
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(items), index = start;
    for (; index < count; index++) {
        PyObject *item = PyList_GET_ITEM(items, index);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(item, 0)))
            break;
        PyObject *payload = PyTuple_GET_ITEM(item, 0), *peer = PyTuple_GET_ITEM(item, 1);
        const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(payload);
        Py_ssize_t size = PyBytes_GET_SIZE(payload), header;
        if (size < 4)
            break;
        uint16_t flags = get16(p), protocol = get16(p + 2);
        if (protocol != 0x0800 && protocol != 0x86DD)
            break;
        if (flags == 0 && fleet == 0)
            header = 4;
        else if (flags == 0x2000 && size >= 8 && (long)(get32(p + 4) >> 16) == fleet)
            header = 8;
        else
            break;
        PyObject *tm = PyDict_GetItemWithError(by_underlay, peer);
        if (tm == NULL && !PyErr_Occurred() && PyTuple_Check(peer) && PyTuple_GET_SIZE(peer) == 2)
            tm = PyDict_GetItemWithError(by_address, PyTuple_GET_ITEM(peer, 0));
        if (PyErr_Occurred()) {
            Py_DECREF(inners);
            return NULL;
        }
        int named = tm == NULL ? 0 : PyObject_IsTrue(tm);
        if (named < 0) {
            Py_DECREF(inners);
            return NULL;
        }
        if (!named)
            break;
        PyObject *inner = PyBytes_FromStringAndSize((const char *)p + header, size - header);
        if (inner == NULL || PyList_Append(inners, inner) < 0) {
            Py_XDECREF(inner);
            Py_DECREF(inners);
            return NULL;
        }
        Py_DECREF(inner);
    }
    return Py_BuildValue("(Nn)", inners, index);
}

/* ---- the TM's established-flow fast path, compiled (TMNode.from_overlay_batch) --------------------------- */

static PyObject *one;   /* the int 1, for the counters */
static PyObject *s_conn, *s_state, *s_last_seen, *s_direction, *s_reason, *s_addresses, *s_ports, *s_ip_delta,
    *s_l4_delta, *s_move_to_end;

static int intern_names(void) {
    if (one != NULL)
        return 0;   /* the last one made: all of them are there */
    s_conn = PyUnicode_InternFromString("conn");
    s_state = PyUnicode_InternFromString("state");
    s_last_seen = PyUnicode_InternFromString("last_seen");
    s_direction = PyUnicode_InternFromString("direction");
    s_reason = PyUnicode_InternFromString("reason");
    s_addresses = PyUnicode_InternFromString("addresses");
    s_ports = PyUnicode_InternFromString("ports");
    s_ip_delta = PyUnicode_InternFromString("ip_delta");
    s_l4_delta = PyUnicode_InternFromString("l4_delta");
    s_move_to_end = PyUnicode_InternFromString("move_to_end");
    if (!s_conn || !s_state || !s_last_seen || !s_direction || !s_reason || !s_addresses || !s_ports || !s_ip_delta ||
        !s_l4_delta || !s_move_to_end)
        return -1;   /* a MemoryError is set; tried again on the next call */
    one = PyLong_FromLong(1);
    return one == NULL ? -1 : 0;
}

static long attribute_long(PyObject *object, PyObject *name, int *failed) {
    PyObject *value = PyObject_GetAttr(object, name);
    if (value == NULL) {
        *failed = 1;
        return -1;
    }
    long result = PyLong_AsLong(value);
    Py_DECREF(value);
    if (result == -1 && PyErr_Occurred())
        *failed = 1;
    return result;
}

/* One datagram through TrafficManager.forward_established, in C: 1 sent (*out set), 0 not served (nothing
 * changed), -1 error. */
static int translate_one(PyObject *data_object, Py_ssize_t at, PyObject *state, double now, PyObject **out) {
    PyObject *tcp = PyTuple_GET_ITEM(state, 3), *udp = PyTuple_GET_ITEM(state, 4);
    PyObject *management = PyTuple_GET_ITEM(state, 5), *timeouts = PyTuple_GET_ITEM(state, 6);
    PyObject *by_state = PyTuple_GET_ITEM(state, 7), *held = PyTuple_GET_ITEM(state, 8);
    PyObject *counts = PyTuple_GET_ITEM(state, 9), *prefixes = PyTuple_GET_ITEM(state, 10);
    long established = PyLong_AsLong(PyTuple_GET_ITEM(state, 11)), replied = PyLong_AsLong(PyTuple_GET_ITEM(state, 12));
    const uint8_t *data = (const uint8_t *)PyBytes_AS_STRING(data_object);
    Py_ssize_t size = PyBytes_GET_SIZE(data_object) - at;
    if (size < 20)
        return 0;
    const uint8_t *packet = data + at;
    int version;
    Py_ssize_t l4;
    uint8_t protocol;
    const uint8_t *key, *destination;
    Py_ssize_t key_length, address_length;
    uint16_t ip_checksum = 0;
    if (packet[0] == 0x45) {
        if (get16(packet + 2) != size || (get16(packet + 6) & 0x3FFF))
            return 0;
        protocol = packet[9], ip_checksum = get16(packet + 10);
        version = 4, l4 = 20, key = packet + 12, key_length = 12, destination = packet + 16, address_length = 4;
    } else if (packet[0] >> 4 == 6) {
        if (size < 40 || 40 + (Py_ssize_t)get16(packet + 4) != size)
            return 0;
        protocol = packet[6];
        version = 6, l4 = 40, key = packet + 8, key_length = 36, destination = packet + 24, address_length = 16;
    } else {
        return 0;
    }
    Py_ssize_t room = size - l4;
    uint16_t l4_checksum;
    PyObject *table;
    if (protocol == 6) {
        if (room < 20)
            return 0;
        Py_ssize_t offset = (Py_ssize_t)(packet[l4 + 12] >> 4) << 2;
        if (offset < 20 || offset > room || (packet[l4 + 13] & (TCP_FIN | 0x02 | 0x04)))
            return 0;
        l4_checksum = get16(packet + l4 + 16), table = tcp;
    } else if (protocol == 17) {
        if (room < 8)
            return 0;
        Py_ssize_t length = get16(packet + l4 + 4);
        if (length < 8 || length > room)
            return 0;
        l4_checksum = get16(packet + l4 + 6), table = udp;
    } else {
        return 0;
    }
    PyObject *destination_object = PyBytes_FromStringAndSize((const char *)destination, address_length);
    if (destination_object == NULL)
        return -1;
    int managed = PySequence_Contains(management, destination_object);
    Py_DECREF(destination_object);
    if (managed)
        return managed < 0 ? -1 : 0;
    PyObject *key_object = PyBytes_FromStringAndSize((const char *)key, key_length);
    if (key_object == NULL)
        return -1;
    PyObject *half = PyDict_GetItemWithError(table, key_object);   /* borrowed */
    Py_DECREF(key_object);
    if (half == NULL)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *conn = PyObject_GetAttr(half, s_conn);
    if (conn == NULL)
        return -1;
    int failed = 0, result = 0;
    PyObject *reason = NULL, *addresses = NULL, *ports = NULL, *seen = NULL;
    long conn_state = attribute_long(conn, s_state, &failed);
    if (failed)
        goto done;
    if (protocol == 6 ? conn_state != established
                      : (attribute_long(half, s_direction, &failed) != 0 && conn_state != replied)) {
        goto done;   /* failed is set if the attribute was missing */
    }
    if (failed || conn_state < 0 || conn_state >= PyList_GET_SIZE(timeouts) || conn_state >= PyList_GET_SIZE(by_state))
        goto done;
    seen = PyObject_GetAttr(conn, s_last_seen);
    if (seen == NULL) {
        failed = 1;
        goto done;
    }
    double last_seen = PyFloat_AsDouble(seen), timeout = PyFloat_AsDouble(PyList_GET_ITEM(timeouts, conn_state));
    if (PyErr_Occurred()) {
        failed = 1;
        goto done;
    }
    if (last_seen + timeout <= now)
        goto done;
    if (PyDict_GET_SIZE(held)) {
        int is_held = PyDict_Contains(held, conn);
        if (is_held) {
            failed = is_held < 0;
            goto done;
        }
    }
    reason = PyObject_GetAttr(half, s_reason);
    addresses = reason ? PyObject_GetAttr(half, s_addresses) : NULL;
    if (addresses == NULL) {
        failed = 1;
        goto done;
    }
    long ip_delta = 0, l4_delta = 0;
    if (addresses != Py_None) {
        ports = PyObject_GetAttr(half, s_ports);
        if (ports == NULL) {
            failed = 1;
            goto done;
        }
        ip_delta = attribute_long(half, s_ip_delta, &failed);
        l4_delta = failed ? 0 : attribute_long(half, s_l4_delta, &failed);
        if (failed || ports == NULL || !PyBytes_Check(ports) || PyBytes_GET_SIZE(ports) != 4 || !PyBytes_Check(addresses) ||
            PyBytes_GET_SIZE(addresses) != 2 * address_length) {
            failed = failed || ports == NULL;
            if (!failed)
                PyErr_Clear();
            goto done;   /* not what the fast path knows: the Python path decides */
        }
    }
    PyObject *count = PyDict_GetItemWithError(counts, reason);   /* looked up before anything changes */
    if (count == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_KeyError, reason);
        failed = 1;
        goto done;
    }
    Py_INCREF(count);
    /* Committed: what forward_established changes. */
    PyObject *now_object = PyFloat_FromDouble(now);
    if (now_object == NULL || PyObject_SetAttr(conn, s_last_seen, now_object) < 0) {
        Py_XDECREF(now_object);
        Py_DECREF(count);
        failed = 1;
        goto done;
    }
    Py_DECREF(now_object);
    PyObject *moved = PyObject_CallMethodOneArg(PyList_GET_ITEM(by_state, conn_state), s_move_to_end, conn);
    if (moved == NULL) {
        Py_DECREF(count);
        failed = 1;
        goto done;
    }
    Py_DECREF(moved);
    PyObject *next = PyNumber_Add(count, one);
    Py_DECREF(count);
    if (next == NULL || PyDict_SetItem(counts, reason, next) < 0) {
        Py_XDECREF(next);
        failed = 1;
        goto done;
    }
    Py_DECREF(next);
    PyObject *prefix = PyTuple_GET_ITEM(prefixes, version == 6);
    Py_ssize_t prefix_length = PyBytes_GET_SIZE(prefix);
    PyObject *datagram = PyBytes_FromStringAndSize(NULL, prefix_length + size);
    if (datagram == NULL) {
        failed = 1;
        goto done;
    }
    uint8_t *buffer = (uint8_t *)PyBytes_AS_STRING(datagram);
    memcpy(buffer, PyBytes_AS_STRING(prefix), (size_t)prefix_length);
    memcpy(buffer + prefix_length, packet, (size_t)size);
    if (addresses != Py_None) {
        uint8_t *inner = buffer + prefix_length;
        uint16_t checksum;
        if (protocol == 17 && !l4_checksum) {
            checksum = 0;
        } else {
            checksum = minus_delta(l4_checksum, l4_delta);
            if (!checksum && protocol == 17)
                checksum = 0xFFFF;
        }
        if (version == 4)
            put16(inner + 10, minus_delta(ip_checksum, ip_delta));
        memcpy(inner + (version == 4 ? 12 : 8), PyBytes_AS_STRING(addresses), (size_t)(2 * address_length));
        memcpy(inner + l4, PyBytes_AS_STRING(ports), 4);
        put16(inner + l4 + (protocol == 6 ? 16 : 6), checksum);
    }
    *out = datagram;
    result = 1;
done:
    Py_XDECREF(seen);
    Py_XDECREF(reason);
    Py_XDECREF(addresses);
    Py_XDECREF(ports);
    Py_DECREF(conn);
    return failed ? -1 : result;
}

/* translate(items, start, state, now) -> (outputs, stop, received, last): TMNode.from_overlay's fast path
 * for items[start:] as (payload, peer), in order, until the first it does not serve (at `stop`: the
 * caller hands it to `from_overlay`, then calls again). outputs: [(datagram, destination)] to send from the
 * well-known port; received: how many (the core's packets.received); last: the name of the last sender.
 * The peers' counts are incremented here. state: TMNode.compiled_state(). */
static PyObject *translate(PyObject *self, PyObject *args) {
    PyObject *items, *state;
    Py_ssize_t start;
    double now;
    if (!PyArg_ParseTuple(args, "O!nO!d", &PyList_Type, &items, &start, &PyTuple_Type, &state, &now))
        return NULL;
    if (intern_names() < 0)
        return NULL;
    if (start < 0 || PyTuple_GET_SIZE(state) != 14 || !PyDict_Check(PyTuple_GET_ITEM(state, 0)) ||
        !PyDict_Check(PyTuple_GET_ITEM(state, 1)) || !PyBytes_Check(PyTuple_GET_ITEM(state, 2)) ||
        PyBytes_GET_SIZE(PyTuple_GET_ITEM(state, 2)) != 2 || !PyDict_Check(PyTuple_GET_ITEM(state, 3)) ||
        !PyDict_Check(PyTuple_GET_ITEM(state, 4)) || !PyList_Check(PyTuple_GET_ITEM(state, 6)) ||
        !PyList_Check(PyTuple_GET_ITEM(state, 7)) || !PyDict_Check(PyTuple_GET_ITEM(state, 8)) ||
        !PyDict_Check(PyTuple_GET_ITEM(state, 9)) || !PyTuple_Check(PyTuple_GET_ITEM(state, 10)) ||
        PyTuple_GET_SIZE(PyTuple_GET_ITEM(state, 10)) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(PyTuple_GET_ITEM(state, 10), 0)) ||
        !PyBytes_Check(PyTuple_GET_ITEM(PyTuple_GET_ITEM(state, 10), 1)) || !PyDict_Check(PyTuple_GET_ITEM(state, 13))) {
        PyErr_SetString(PyExc_ValueError, "translate: bad state");
        return NULL;
    }
    PyObject *fast_peers = PyTuple_GET_ITEM(state, 0), *fast_headers = PyTuple_GET_ITEM(state, 1);
    PyObject *fleet = PyTuple_GET_ITEM(state, 2), *peers = PyTuple_GET_ITEM(state, 13);
    PyObject *outputs = PyList_New(0), *last = Py_None;
    if (outputs == NULL)
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(items), index = start, received = 0;
    for (; index < count; index++) {
        PyObject *item = PyList_GET_ITEM(items, index);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(item, 0)))
            break;
        PyObject *payload = PyTuple_GET_ITEM(item, 0), *peer = PyTuple_GET_ITEM(item, 1);
        if (!PyTuple_Check(peer) || PyTuple_GET_SIZE(peer) != 2 || PyBytes_GET_SIZE(payload) < 8)
            break;
        PyObject *via = PyDict_GetItemWithError(fast_peers, PyTuple_GET_ITEM(peer, 0));
        if (via == NULL || !PyTuple_Check(via) || PyTuple_GET_SIZE(via) != 2)
            break;
        PyObject *first_four = PyBytes_FromStringAndSize(PyBytes_AS_STRING(payload), 4);
        PyObject *at_object = first_four ? PyDict_GetItemWithError(fast_headers, first_four) : NULL;
        Py_XDECREF(first_four);
        if (at_object == NULL)
            break;
        Py_ssize_t at = PyLong_AsSsize_t(at_object);
        if (at == 8 && memcmp(PyBytes_AS_STRING(payload) + 4, PyBytes_AS_STRING(fleet), 2))
            break;
        if (at != 4 && at != 8)
            break;
        PyObject *datagram = NULL;
        int outcome = translate_one(payload, at, state, now, &datagram);
        if (outcome <= 0)
            break;
        PyObject *name = PyTuple_GET_ITEM(via, 0), *destination = PyTuple_GET_ITEM(via, 1);
        PyObject *entry = PyTuple_Pack(2, datagram, destination);
        Py_DECREF(datagram);
        PyObject *seen = entry ? PyDict_GetItemWithError(peers, destination) : NULL;
        PyObject *next = NULL;
        if (seen != NULL)
            next = PyNumber_Add(seen, one);
        else if (entry != NULL && !PyErr_Occurred())
            next = Py_NewRef(one);
        if (next == NULL || PyDict_SetItem(peers, destination, next) < 0 || PyList_Append(outputs, entry) < 0) {
            Py_XDECREF(next);
            Py_XDECREF(entry);
            Py_DECREF(outputs);
            return NULL;
        }
        Py_DECREF(next);
        Py_DECREF(entry);
        last = name;
        received++;
    }
    if (PyErr_Occurred()) {
        Py_DECREF(outputs);
        return NULL;
    }
    return Py_BuildValue("(NnnO)", outputs, index, received, last);
}

static PyObject *read_batch(PyObject *self, PyObject *args) {
    int fd, max = BATCH, vnet = 0;
    if (!PyArg_ParseTuple(args, "O&|ip", to_fd, &fd, &max, &vnet))
        return NULL;
    if (ensure_slots() < 0)
        return NULL;
    PyObject *result = PyList_New(0);
    if (result == NULL)
        return NULL;
    Py_ssize_t dropped[SPLIT_REASONS] = {0};
    for (int i = 0; i < max; i++) {
        ssize_t size = read(fd, slots, SLOT);
        if (size < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || PyList_GET_SIZE(result) > 0)
                break; /* a real error shows on the next call, after these packets are handled */
            Py_DECREF(result);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (vnet) {
            int outcome = split_into((const uint8_t *)slots, (size_t)size, result);
            if (outcome < 0) {
                Py_DECREF(result);
                return NULL;
            }
            dropped[outcome]++;
            continue;
        }
        PyObject *packet = PyBytes_FromStringAndSize(slots, size);
        if (packet == NULL || PyList_Append(result, packet) < 0) {
            Py_XDECREF(packet);
            Py_DECREF(result);
            return NULL;
        }
        Py_DECREF(packet);
    }
    if (!vnet)
        return result;
    PyObject *drops = PyDict_New();
    for (int reason = 1; drops != NULL && reason < SPLIT_REASONS; reason++) {
        if (!dropped[reason])
            continue;
        PyObject *number = PyLong_FromSsize_t(dropped[reason]);
        if (number == NULL || PyDict_SetItemString(drops, split_reasons[reason], number) < 0)
            Py_CLEAR(drops);
        Py_XDECREF(number);
    }
    if (drops == NULL) {
        Py_DECREF(result);
        return NULL;
    }
    PyObject *pair = PyTuple_Pack(2, result, drops);
    Py_DECREF(result);
    Py_DECREF(drops);
    return pair;
}

/* ---- replay windows shared by a node's packet loops (overlay/antireplay.py: the layout and why) ---------- */

#define WINDOWS_MAGIC "OVLWIN01"
#define WINDOWS_KEYS 64
#define WINDOWS_ATOMIC 1

/* 0 accepted, 1 replayed, 2 too old, 3 no free window; -1 not a region of this layout. Lock-free: a slot
 * only ever grows, by compare-and-swap, so a counter is accepted at most once whatever runs alongside. */
static int window_accept_at(char *base, Py_ssize_t length, uint64_t key, uint64_t counter) {
    if (length < WINDOWS_KEYS || memcmp(base, WINDOWS_MAGIC, 8) != 0)
        return -1;
    uint32_t implementation, capacity, window;
    memcpy(&implementation, base + 8, 4);
    memcpy(&capacity, base + 12, 4);
    memcpy(&window, base + 16, 4);
    uint64_t stride = ((uint64_t)window + 1) * 8;
    /* Bounded before any product (a region's header is ours, but a wrong one must not overflow them). */
    if (implementation != WINDOWS_ATOMIC || capacity < 4 || capacity > (1u << 20) || (capacity & (capacity - 1))
        || window == 0 || window > (1u << 16) || (window & (window - 1))
        || (uint64_t)length < WINDOWS_KEYS + (uint64_t)capacity * (8 + stride))
        return -1;
    uint64_t *keys = (uint64_t *)(base + WINDOWS_KEYS);
    uint32_t *in_use = (uint32_t *)(base + 20);
    uint32_t start = (uint32_t)((key * 0x9E3779B97F4A7C15ULL) >> 32) & (capacity - 1), index = 0;
    int found = 0;
    for (uint32_t probe = 0; probe < capacity && !found; probe++) {
        index = (start + probe) & (capacity - 1);
        uint64_t held = __atomic_load_n(&keys[index], __ATOMIC_ACQUIRE);
        if (held == key) {
            found = 1;
        } else if (held == 0) {
            if (__atomic_load_n(in_use, __ATOMIC_RELAXED) >= capacity / 4 * 3) {
                /* Full — unless another loop claimed this entry meanwhile, for this key (found) or another
                 * (probe on). An entry that is still free ends the search: keys are never freed, so a key
                 * never lies beyond a free entry of its probe sequence. */
                held = __atomic_load_n(&keys[index], __ATOMIC_ACQUIRE);
                if (held == key)
                    found = 1;
                else if (held == 0)
                    return 3;
                continue;
            }
            uint64_t expected = 0;
            if (__atomic_compare_exchange_n(&keys[index], &expected, key, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                __atomic_fetch_add(in_use, 1, __ATOMIC_RELAXED);
                found = 1;
            } else if (expected == key) {
                found = 1;   /* another loop claimed it for the same sender just now */
            }
        }
    }
    if (!found)
        return 3;
    uint64_t *highest = (uint64_t *)(base + WINDOWS_KEYS + (uint64_t)capacity * 8 + index * stride);
    uint64_t value = counter + 1, top = __atomic_load_n(highest, __ATOMIC_ACQUIRE);
    if (counter == UINT64_MAX || (value <= top && top - value >= window))
        return 2;
    uint64_t *slot = highest + 1 + (counter & (window - 1));
    uint64_t seen = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    for (;;) {
        if (seen == value)
            return 1;
        if (seen > value)
            return 2;
        if (__atomic_compare_exchange_n(slot, &seen, value, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            break;
    }
    while (value > top && !__atomic_compare_exchange_n(highest, &top, value, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        ;
    return 0;
}

static PyObject *window_accept(PyObject *self, PyObject *args) {
    Py_buffer view;
    unsigned long long key, counter;
    if (!PyArg_ParseTuple(args, "w*KK", &view, &key, &counter))
        return NULL;
    int result = ((uintptr_t)view.buf & 7) ? -1 : window_accept_at(view.buf, view.len, key, counter);
    PyBuffer_Release(&view);
    if (result < 0) {
        PyErr_SetString(PyExc_ValueError, "not a replay-window region for the compiled extension");
        return NULL;
    }
    return PyLong_FromLong(result);
}

static PyMethodDef methods[] = {
    {"recv_batch", recv_batch, METH_VARARGS, "recvmmsg up to max datagrams: [(payload, (host, port))]"},
    {"send_batch", send_batch, METH_VARARGS, "sendmmsg items[start:]: (sent, errno of the first refused or 0)"},
    {"read_batch", read_batch, METH_VARARGS, "read up to max packets from a non-blocking fd: [packet]"},
    {"set_gso", set_gso, METH_VARARGS, "switch UDP GSO in send_batch on or off; returns the previous setting"},
    {"write_batch", write_batch, METH_VARARGS, "write packets to a TUN (vnet: coalesced): (written, failed, writes)"},
    {"split", split, METH_VARARGS, "a vnet-headed TUN read -> its packets, or the reason it is unusable"},
    {"coalesce", coalesce, METH_VARARGS, "packets -> vnet-headed writes, runs of one TCP flow as super-packets"},
    {"flow_run", flow_run, METH_VARARGS, "how many payloads from start carry one TCP flow after offset bytes"},
    {"nat_run", nat_run, METH_VARARGS, "the TM's established translation of a run of one TCP connection"},
    {"distribute", distribute, METH_VARARGS, "the distributor's fast path for a batch of TUN packets"},
    {"deliver", deliver, METH_VARARGS, "the distributor's from_overlay for a batch of TMs' data datagrams"},
    {"translate", translate, METH_VARARGS, "the TM's established-flow fast path for a receive batch"},
    {"window_accept", window_accept, METH_VARARGS, "a counter against a shared replay window: 0 new, 1 replayed, 2 too old, 3 full"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "overlay._fastio", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastio(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL)
        PyModule_AddIntConstant(m, "BATCH", BATCH);
    return m;
}
