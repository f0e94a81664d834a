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
#include <unistd.h>

#define BATCH 64
#define SLOT 65536 /* a whole UDP payload or TUN packet always fits: nothing is ever truncated */

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

static PyObject *recv_batch(PyObject *self, PyObject *args) {
    int fd, max = BATCH;
    if (!PyArg_ParseTuple(args, "O&|i", to_fd, &fd, &max))
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
    PyObject *result = PyList_New(count);
    if (result == NULL)
        return NULL;
    for (int i = 0; i < count; i++) {
        PyObject *payload = PyBytes_FromStringAndSize(slots + (size_t)i * SLOT, messages[i].msg_len);
        PyObject *peer = payload ? peer_tuple(&names[i], messages[i].msg_hdr.msg_namelen) : NULL;
        PyObject *item = peer ? PyTuple_Pack(2, payload, peer) : NULL;
        Py_XDECREF(payload);
        Py_XDECREF(peer);
        if (item == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        PyList_SET_ITEM(result, i, item);
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
#ifndef SOL_UDP
#define SOL_UDP 17
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

static PyObject *read_batch(PyObject *self, PyObject *args) {
    int fd, max = BATCH;
    if (!PyArg_ParseTuple(args, "O&|i", to_fd, &fd, &max))
        return NULL;
    if (ensure_slots() < 0)
        return NULL;
    PyObject *result = PyList_New(0);
    if (result == NULL)
        return NULL;
    for (int i = 0; i < max; i++) {
        ssize_t size = read(fd, slots, SLOT);
        if (size < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || PyList_GET_SIZE(result) > 0)
                break; /* a real error shows on the next call, after these packets are handled */
            Py_DECREF(result);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        PyObject *packet = PyBytes_FromStringAndSize(slots, size);
        if (packet == NULL || PyList_Append(result, packet) < 0) {
            Py_XDECREF(packet);
            Py_DECREF(result);
            return NULL;
        }
        Py_DECREF(packet);
    }
    return result;
}

static PyMethodDef methods[] = {
    {"recv_batch", recv_batch, METH_VARARGS, "recvmmsg up to max datagrams: [(payload, (host, port))]"},
    {"send_batch", send_batch, METH_VARARGS, "sendmmsg items[start:]: (sent, errno of the first refused or 0)"},
    {"read_batch", read_batch, METH_VARARGS, "read up to max packets from a non-blocking fd: [packet]"},
    {"set_gso", set_gso, METH_VARARGS, "switch UDP GSO in send_batch on or off; returns the previous setting"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "overlay._fastio", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastio(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL)
        PyModule_AddIntConstant(m, "BATCH", BATCH);
    return m;
}
