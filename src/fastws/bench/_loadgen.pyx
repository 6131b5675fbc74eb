# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The hot path of `fastws bench`: client connections on non-blocking sockets and epoll, run from C.

One ``Engine`` per client process owns all of that process's connections as
C structs in an array indexed by file descriptor (about 120 bytes each: no
Python object, task or future per connection) and one read buffer shared by
all of them.  Per read it parses the server's unmasked frames in place,
without copying payloads, counts whole messages and answers pings; then,
depending on the mode, it writes the echoes back as one ``send()`` of
pre-built, pre-masked frames (throughput), times the round trip and sends the
next message (latency), or reads the publisher's timestamp out of a broadcast
message (broadcast).  No Python code runs per message or per connection
event: Python sets an engine up, moves it between phases and reads its
counters.

Running it: the epoll descriptor is readable whenever one of the sockets has
an event, so ``loop.add_reader(engine.fileno(), ...)`` + ``engine.poll(0)``
runs the engine inside any asyncio loop (ramps, holds, broadcasts), and
measured windows call ``engine.run_until(deadline)``, which waits in
``epoll_wait`` directly.

All masking uses one key per engine: the frames are masked once, when they
are built, and resent as they are (a server cannot tell).
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset

import errno as _errno
import os as _os

cdef extern from *:
    """
    #include <errno.h>
    #include <stdint.h>
    #include <string.h>
    #include <strings.h>
    #include <time.h>
    #include <unistd.h>
    #include <arpa/inet.h>
    #include <netinet/in.h>
    #include <netinet/tcp.h>
    #include <sys/epoll.h>
    #include <sys/socket.h>
    #include <zlib.h>

    #ifndef IP_BIND_ADDRESS_NO_PORT
    #define IP_BIND_ADDRESS_NO_PORT 24
    #endif
    #define LG_HIST_BUCKETS (256 + 48 * 128)

    static inline int64_t lg_now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }

    /* The bucket of fastws.bench.common.Histogram.index(): exact below 256, then 128 per power of two. */
    static inline int lg_hist_index(uint64_t v) {
        if (v < 256) return (int)v;
        int shift = (64 - __builtin_clzll(v)) - 8;
        int idx = 256 + (shift - 1) * 128 + (int)((v >> shift) - 128);
        return idx < LG_HIST_BUCKETS ? idx : LG_HIST_BUCKETS - 1;
    }

    static int lg_make_addr(const char *ip, int port, struct sockaddr_storage *out, socklen_t *len) {
        memset(out, 0, sizeof(*out));
        struct sockaddr_in *a4 = (struct sockaddr_in *)out;
        if (inet_pton(AF_INET, ip, &a4->sin_addr) == 1) {
            a4->sin_family = AF_INET;
            a4->sin_port = htons((uint16_t)port);
            *len = sizeof(*a4);
            return AF_INET;
        }
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)out;
        if (inet_pton(AF_INET6, ip, &a6->sin6_addr) == 1) {
            a6->sin6_family = AF_INET6;
            a6->sin6_port = htons((uint16_t)port);
            *len = sizeof(*a6);
            return AF_INET6;
        }
        return -1;
    }

    static inline uint32_t lg_rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

    static void lg_sha1_block(uint32_t h[5], const uint8_t *p) {
        uint32_t w[80];
        for (int i = 0; i < 16; i++)
            w[i] = (uint32_t)p[4*i] << 24 | (uint32_t)p[4*i+1] << 16 | (uint32_t)p[4*i+2] << 8 | p[4*i+3];
        for (int i = 16; i < 80; i++) w[i] = lg_rol(w[i-3] ^ w[i-8] ^ w[i-14] ^ w[i-16], 1);
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int i = 0; i < 80; i++) {
            uint32_t f, k;
            if (i < 20) { f = (b & c) | (~b & d); k = 0x5A827999; }
            else if (i < 40) { f = b ^ c ^ d; k = 0x6ED9EBA1; }
            else if (i < 60) { f = (b & c) | (b & d) | (c & d); k = 0x8F1BBCDC; }
            else { f = b ^ c ^ d; k = 0xCA62C1D6; }
            uint32_t t = lg_rol(a, 5) + f + e + k + w[i];
            e = d; d = c; c = lg_rol(b, 30); b = a; a = t;
        }
        h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e;
    }

    /* SHA-1 of at most 119 bytes (a handshake key and the GUID: 60). */
    static void lg_sha1(const uint8_t *data, size_t n, uint8_t *out) {
        uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
        uint8_t buf[128];
        size_t total = (n + 9 <= 64) ? 64 : 128;
        memset(buf, 0, total);
        memcpy(buf, data, n);
        buf[n] = 0x80;
        uint64_t bits = (uint64_t)n * 8;
        for (int i = 0; i < 8; i++) buf[total - 1 - i] = (uint8_t)(bits >> (8 * i));
        for (size_t off = 0; off < total; off += 64) lg_sha1_block(h, buf + off);
        for (int i = 0; i < 5; i++) {
            out[4*i] = (uint8_t)(h[i] >> 24); out[4*i+1] = (uint8_t)(h[i] >> 16);
            out[4*i+2] = (uint8_t)(h[i] >> 8); out[4*i+3] = (uint8_t)h[i];
        }
    }

    static void lg_base64(const uint8_t *in, size_t n, char *out) {
        static const char T[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        size_t i = 0, o = 0;
        for (; i + 2 < n; i += 3) {
            uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i+1] << 8 | in[i+2];
            out[o++] = T[v >> 18 & 63]; out[o++] = T[v >> 12 & 63]; out[o++] = T[v >> 6 & 63]; out[o++] = T[v & 63];
        }
        if (i < n) {
            uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i+1] << 8 : 0);
            out[o++] = T[v >> 18 & 63]; out[o++] = T[v >> 12 & 63];
            out[o++] = i + 1 < n ? T[v >> 6 & 63] : '=';
            out[o++] = '=';
        }
    }

    static inline uint64_t lg_splitmix(uint64_t x) {
        uint64_t z = x + 0x9E3779B97F4A7C15ULL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    }

    /* 1 if the raw-deflate message z[:zn] (permessage-deflate: its 00 00 ff ff tail removed) inflates
       to exactly expect[:n]; a fresh inflater each time, as the check's message is a connection's first. */
    static int lg_inflates_to(const uint8_t *z, size_t zn, const uint8_t *expect, size_t n) {
        static const uint8_t tail[4] = {0, 0, 0xff, 0xff};
        uint8_t buf[4096];
        z_stream zs;
        size_t seen = 0;
        int rc = Z_OK, ok = 1;
        memset(&zs, 0, sizeof(zs));
        if (inflateInit2(&zs, -15) != Z_OK) return 0;
        for (int part = 0; part < 2 && ok && rc != Z_STREAM_END; part++) {
            zs.next_in = (Bytef *)(part ? tail : z);
            zs.avail_in = (uInt)(part ? 4 : zn);
            do {
                zs.next_out = buf;
                zs.avail_out = sizeof(buf);
                rc = inflate(&zs, Z_SYNC_FLUSH);
                size_t got = sizeof(buf) - zs.avail_out;
                if ((rc != Z_OK && rc != Z_STREAM_END && rc != Z_BUF_ERROR) || seen + got > n
                        || memcmp(buf, expect + seen, got) != 0) {
                    ok = 0;
                    break;
                }
                seen += got;
            } while (rc != Z_STREAM_END && (zs.avail_in > 0 || zs.avail_out == 0));
        }
        inflateEnd(&zs);
        return ok && seen == n;
    }

    /* One masked client frame (FIN set; RSV1 too with rsv1: a compressed message) into out (room for
       n + 14 bytes); returns its length. */
    static size_t lg_frame(uint8_t *out, int opcode, const uint8_t *payload, size_t n, const uint8_t *mask,
                           int rsv1) {
        size_t h = 0;
        out[h++] = (uint8_t)(0x80 | (rsv1 ? 0x40 : 0) | opcode);
        if (n < 126) {
            out[h++] = (uint8_t)(0x80 | n);
        } else if (n < 65536) {
            out[h++] = 0x80 | 126; out[h++] = (uint8_t)(n >> 8); out[h++] = (uint8_t)n;
        } else {
            out[h++] = 0x80 | 127;
            for (int i = 7; i >= 0; i--) out[h++] = (uint8_t)((uint64_t)n >> (8 * i));
        }
        memcpy(out + h, mask, 4);
        h += 4;
        for (size_t i = 0; i < n; i++) out[h + i] = payload[i] ^ mask[i & 3];
        return h + n;
    }
    """
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    struct sockaddr_storage:
        pass
    ctypedef union epoll_data_t:
        int fd
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int LG_HIST_BUCKETS
    int EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLL_CLOEXEC
    int AF_INET, SOCK_STREAM, SOCK_NONBLOCK, SOCK_CLOEXEC, SOL_SOCKET, SO_ERROR, MSG_NOSIGNAL, MSG_TRUNC
    int IPPROTO_TCP, IPPROTO_IP, TCP_NODELAY, IP_BIND_ADDRESS_NO_PORT
    int EAGAIN, EWOULDBLOCK, EINPROGRESS, EINTR, EMFILE
    int errno
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *ev)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    int socket(int domain, int type, int protocol)
    int bind(int fd, const sockaddr *addr, socklen_t len)
    int connect(int fd, const sockaddr *addr, socklen_t len)
    Py_ssize_t send(int fd, const void *buf, size_t n, int flags)
    Py_ssize_t recv(int fd, void *buf, size_t n, int flags)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
    int close(int fd)
    void *memmem(const void *hay, size_t hn, const void *needle, size_t nn)
    int strncasecmp(const char *a, const char *b, size_t n)
    int64_t lg_now_ns()
    int lg_hist_index(uint64_t v)
    int lg_make_addr(const char *ip, int port, sockaddr_storage *out, socklen_t *len)
    void lg_sha1(const uint8_t *data, size_t n, uint8_t *out)
    void lg_base64(const uint8_t *inp, size_t n, char *out)
    uint64_t lg_splitmix(uint64_t x)
    size_t lg_frame(uint8_t *out, int opcode, const uint8_t *payload, size_t n, const uint8_t *mask, int rsv1)
    int lg_inflates_to(const uint8_t *z, size_t zn, const uint8_t *expect, size_t n)


# What the engine does with each whole message (set_mode).
HOLD = 0  # count it (and answer pings): idle connections, draining
ECHO = 1  # throughput: send one pre-built frame per message back, one send() per read
PINGPONG = 2  # latency: time the round trip, send the next message
SUBSCRIBE = 3  # broadcast: read the publisher's timestamp out of the message
CYCLE = 4  # handshake: close as soon as open, open another

HISTOGRAMS = ("round_trip", "open", "delivery")

cdef enum:
    ST_FREE = 0
    ST_CONNECTING = 1
    ST_HANDSHAKE = 2
    ST_OPEN = 3
    ST_CLOSING = 4

cdef enum:
    F_FIN = 1  # the current frame is the last of its message
    F_IN_PAYLOAD = 2  # header parsed, payload bytes still to come
    F_CHECK = 4  # compare the next message with the payload sent
    F_CHECK_BAD = 8
    F_VERIFY = 16  # the next message answers a probe
    F_CLOSE_SENT = 32
    F_CLOSE_RCVD = 64
    F_WANT_OUT = 128  # EPOLLOUT is registered
    F_CLOSE_OURS = 256  # this side started the closing handshake
    F_COMPRESSED = 512  # the current message has RSV1 set (permessage-deflate)

cdef enum:
    PREFIX = 128  # bytes of a broadcast message kept to find its timestamp
    STASH_SIZE = 256  # [0, PREFIX): message prefix; [PREFIX, 256): a control frame split over reads
    RESPONSE_MAX = 16384  # a handshake response longer than this is refused
    EVENTS = 256
    DISCARD_MIN = 8192  # payload bytes worth dropping in the kernel (recv MSG_TRUNC: not copied to us)
    BIG_MESSAGE = 16384  # from this size on, read headers in small reads and drop the payloads
    HEADER_READ = 4096

cdef enum:
    FAIL_ERRNO = 1
    FAIL_TIMEOUT = 2
    FAIL_CLOSED = 3  # EOF before the handshake completed
    FAIL_HTTP = 4
    FAIL_INVALID = 5  # not a valid 101 response
    FAIL_NO_DEFLATE = 6  # a 101 without permessage-deflate (or with a client window too small for our frame)

cdef enum:
    STOP_NONE = 0
    STOP_TARGET = 1
    STOP_TIMEOUT = 2
    STOP_FAILURES = 3
    STOP_ASKED = 4

STOP_REASONS = {STOP_NONE: "", STOP_TARGET: "target reached", STOP_TIMEOUT: "ramp timeout",
                STOP_FAILURES: "failures", STOP_ASKED: "stopped"}

ctypedef struct Conn:
    int fd
    uint16_t flags
    uint8_t state
    uint8_t opcode  # of the current frame
    uint8_t hdr_have  # bytes of a frame header split over reads, in hdr
    uint8_t ctl_have  # bytes of a control payload split over reads, in stash[PREFIX:]
    uint8_t hdr[14]
    uint32_t serial  # connection number: derives the handshake key
    uint32_t stash_len  # handshake response bytes in stash
    int64_t remaining  # payload bytes of the current frame still to come
    int64_t msg_off  # bytes of the current message seen (raw mode: bytes towards the next message)
    int64_t t0  # ns: connect start, then send time of the message in flight
    int64_t deadline  # ns: open or close timeout (0: none)
    int timed_slot  # 1 + its index in Engine.timed while it has a deadline, else 0
    uint8_t *stash  # allocated only while needed
    uint8_t *out  # bytes the kernel did not take yet
    uint8_t *zcheck  # a compressed message being checked, gathered to inflate once whole (msg_off bytes)
    uint32_t out_len
    uint32_t out_cap
    uint32_t out_frames  # pre-built frames still to send after out (from the shared block)
    uint32_t out_frame_off  # bytes of the first of them already sent

ctypedef struct Hist:
    int64_t total
    int64_t vmin
    int64_t vmax
    int64_t vsum
    int64_t *counts


cdef inline void hist_record(Hist *h, int64_t v) noexcept:
    if v < 0:
        v = 0
    h.counts[lg_hist_index(<uint64_t>v)] += 1
    if h.total == 0 or v < h.vmin:
        h.vmin = v
    if v > h.vmax:
        h.vmax = v
    h.total += 1
    h.vsum += v


cdef inline int header_len(uint8_t b1) noexcept:
    cdef int n = b1 & 0x7F
    return 4 if n == 126 else (10 if n == 127 else 2)


cdef inline int64_t parse_uint(const uint8_t *p, Py_ssize_t n, Py_ssize_t *pos) noexcept:
    """Decimal digits at p[pos...]; -1 if none or if they run to the end (maybe cut)."""
    cdef int64_t v = 0
    cdef Py_ssize_t i = pos[0]
    cdef Py_ssize_t start = i
    while i < n and 48 <= p[i] <= 57:
        v = v * 10 + (p[i] - 48)
        i += 1
    if i == start or i >= n:
        return -1
    pos[0] = i
    return v


def accept_for(key):
    """Sec-WebSocket-Accept for a key, by this module's SHA-1 and base64 (tests compare it with the wire core's)."""
    cdef bytes k = key.encode() if isinstance(key, str) else bytes(key)
    cdef bytes data = k + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    cdef uint8_t digest[20]
    cdef char out[28]
    if len(data) > 119:
        raise ValueError("key too long")
    lg_sha1(<const uint8_t *>(<char *>data), len(data), digest)
    lg_base64(digest, 20, out)
    return out[:28].decode()


def build_frame(int opcode, payload, bytes mask, bint rsv1=False):
    """One masked client frame (FIN set; RSV1 for a compressed payload): the frames the engine pre-builds,
    for Python and the tests."""
    cdef bytes data = payload.encode() if isinstance(payload, str) else bytes(payload)
    cdef Py_ssize_t n = len(data)
    cdef bytearray out = bytearray(n + 14)
    cdef uint8_t *o = <uint8_t *>(<char *>out)
    if len(mask) != 4:
        raise ValueError("mask must be 4 bytes")
    cdef size_t flen = lg_frame(o, opcode, <const uint8_t *>(<char *>data), n,
                                <const uint8_t *>(<char *>mask), rsv1)
    return bytes(out[:flen])


cdef class Engine:
    """All client connections of one process; see the module docstring."""

    cdef int epfd
    cdef Conn *conns
    cdef int cap  # size of conns: the open-file limit
    cdef int max_fd  # highest fd used so far (bounds the scans of send_all, verify, close_all...)
    cdef int *timed  # fds of the connections with a deadline (connecting, handshaking, closing)
    cdef int n_timed
    cdef uint8_t *rbuf
    cdef Py_ssize_t rbuf_size
    cdef sockaddr_storage target
    cdef socklen_t target_len
    cdef int family
    cdef sockaddr_storage *sources
    cdef socklen_t *source_lens
    cdef int n_sources
    cdef uint64_t source_next
    cdef readonly bint raw
    cdef bytes request  # upgrade request with a placeholder key at key_offset
    cdef Py_ssize_t key_offset
    cdef uint8_t *req_buf
    cdef uint64_t seed
    cdef uint8_t mask[4]
    # The data plan: one pre-built frame repeated block_frames times, its unmasked payload.
    cdef uint8_t *block
    cdef Py_ssize_t frame_len
    cdef int64_t block_frames
    cdef uint8_t *payload
    cdef Py_ssize_t payload_len
    cdef bint big_messages  # payload_len >= BIG_MESSAGE: small reads for headers, payloads dropped
    cdef readonly int deflate_bits  # > 0: permessage-deflate required; frame compressed (RSV1) in such a window
    cdef uint8_t *probe
    cdef Py_ssize_t probe_len
    cdef readonly int mode
    cdef readonly bint refill  # ECHO / PINGPONG: answer each message with the next one
    cdef int64_t measure_from  # PINGPONG: round trips ending before this (ns) are not recorded
    cdef int64_t round_trip_limit
    # Broadcast
    cdef bytes run_mark  # b"fastws-bench <run id> "
    cdef int64_t *seq_count
    cdef int64_t *seq_max
    cdef int64_t seq_cap
    cdef uint8_t *pub_payload
    cdef uint8_t *pub_frame
    cdef Py_ssize_t pub_size
    cdef readonly int64_t published
    # Ramp
    cdef readonly bint ramping
    cdef int64_t ramp_target
    cdef int64_t ramp_opened
    cdef readonly int64_t attempts
    cdef int64_t concurrency
    cdef double rate
    cdef int64_t ramp_t0
    cdef int64_t ramp_deadline
    cdef int64_t cycle_deadline
    cdef int64_t max_failures
    cdef int64_t ramp_failed0  # failures before this ramp
    cdef int64_t open_timeout
    cdef int64_t close_timeout
    cdef int stop_reason
    cdef uint32_t next_serial
    cdef bint need_ramp
    cdef int64_t last_expire
    # Counters (read by Python between phases)
    cdef readonly int64_t in_progress  # connecting or handshaking
    cdef readonly int64_t live  # open or closing
    cdef readonly int64_t closing
    cdef readonly int64_t opened
    cdef readonly int64_t failed
    cdef readonly int64_t received  # whole data messages
    cdef readonly int64_t sent  # data messages sent
    cdef readonly int64_t bytes_received
    cdef readonly int64_t reads  # recv() calls that returned data
    cdef readonly int64_t writes  # send() calls
    cdef readonly int64_t round_trips
    cdef readonly int64_t deliveries
    cdef readonly int64_t foreign  # SUBSCRIBE: messages without this run's mark
    cdef readonly int64_t first_delivery
    cdef readonly int64_t last_delivery
    cdef readonly int64_t pings
    cdef readonly int64_t pongs
    cdef readonly int64_t dropped  # open connections the server (or the network) ended
    cdef readonly int64_t closed_clean  # closing handshakes completed
    cdef readonly int64_t closed_unclean  # ended without the server's close frame
    cdef readonly int64_t close_timeouts  # closing handshakes aborted at the deadline
    cdef readonly int64_t cycles  # CYCLE: connect + upgrade + close completed
    cdef readonly int64_t checks_good
    cdef readonly int64_t checks_bad
    cdef readonly int64_t verify_sent
    cdef readonly int64_t verified
    cdef readonly int64_t protocol_errors
    cdef readonly int64_t write_errors
    cdef int64_t fail_errno[256]
    cdef int64_t fail_http[600]
    cdef int64_t fail_kind[8]
    cdef int first_fail_kind
    cdef int first_fail_code
    cdef int64_t first_fail_t
    cdef int64_t first_fail_opened
    cdef Hist hists[3]

    def __cinit__(self):
        self.epfd = -1

    def __init__(self, str host_ip, int port, *, bytes request=None, sources=(), int source_offset=0,
                 bytes mask=None, bytes frame=b"", bytes payload=b"", int inflight=1, bytes probe=b"",
                 int max_fds=0, int deflate_bits=0,
                 Py_ssize_t read_buffer=1 << 20, double open_timeout=10.0, double close_timeout=5.0):
        """Connect to host_ip:port; ``request`` is the upgrade request (None: raw TCP) with the key
        written as 24 'K's.  ``mask``: the masking key of every frame (default: random);
        ``frame``: the data message, masked with it (raw: the bytes to send); ``payload``: what its
        echo must contain; ``probe``: a small message for verify().  ``deflate_bits`` > 0: the request
        offers permessage-deflate and ``frame`` is compressed with a window of that many bits; a
        response without the extension, or one that limits the client's window to fewer bits, fails
        the connection, and the checked echo is inflated before it is compared (echoes otherwise are
        counted, never inflated: the client's work stays per frame)."""
        cdef int i
        cdef bytes ip
        cdef bytes seed
        self.family = lg_make_addr(host_ip.encode(), port, &self.target, &self.target_len)
        if self.family < 0:
            raise ValueError(f"not an IP address: {host_ip!r}")
        self.cap = max_fds or 1024
        self.conns = <Conn *>calloc(self.cap, sizeof(Conn))
        self.timed = <int *>calloc(self.cap, sizeof(int))
        self.rbuf_size = read_buffer
        self.rbuf = <uint8_t *>malloc(read_buffer)
        if self.conns == NULL or self.timed == NULL or self.rbuf == NULL:
            raise MemoryError()
        memset(self.rbuf, 0, read_buffer)  # resident now: memory measured later is per connection
        for i in range(3):
            self.hists[i].counts = <int64_t *>calloc(LG_HIST_BUCKETS, sizeof(int64_t))
            if self.hists[i].counts == NULL:
                raise MemoryError()
            memset(self.hists[i].counts, 0, LG_HIST_BUCKETS * sizeof(int64_t))
        self.n_sources = len(sources)
        if self.n_sources:
            self.sources = <sockaddr_storage *>calloc(self.n_sources, sizeof(sockaddr_storage))
            self.source_lens = <socklen_t *>calloc(self.n_sources, sizeof(socklen_t))
            if self.sources == NULL or self.source_lens == NULL:
                raise MemoryError()
            for i, src in enumerate(sources):
                ip = src.encode()
                if lg_make_addr(ip, 0, &self.sources[i], &self.source_lens[i]) != self.family:
                    raise ValueError(f"source address {src!r} is not of the server's address family")
        self.source_next = source_offset
        self.raw = request is None
        if not self.raw:
            self.key_offset = request.find(b"K" * 24)
            if self.key_offset < 0:
                raise ValueError("the request has no key placeholder")
            self.request = request
            self.req_buf = <uint8_t *>malloc(len(request))
            if self.req_buf == NULL:
                raise MemoryError()
        seed = _os.urandom(12)
        self.seed = int.from_bytes(seed[:8], "little")
        if mask is None:
            mask = seed[8:]
        if len(mask) != 4:
            raise ValueError("mask must be 4 bytes")
        memcpy(self.mask, <char *>mask, 4)
        self.deflate_bits = 0 if self.raw else deflate_bits
        self._set_plan(frame, payload, inflight)
        if probe:
            self.probe_len = len(probe)
            self.probe = <uint8_t *>malloc(self.probe_len)
            memcpy(self.probe, <char *>probe, self.probe_len)
        self.open_timeout = <int64_t>(open_timeout * 1e9)
        self.close_timeout = <int64_t>(close_timeout * 1e9)
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, _os.strerror(errno))

    cdef _set_plan(self, bytes frame, bytes payload, int inflight):
        cdef int64_t i
        self.frame_len = len(frame)
        if self.frame_len:
            # Enough copies for one read's worth of echoes in one send(), up to ~1 MiB.
            self.block_frames = max(1, min(max(1, inflight), (1 << 20) // self.frame_len))
            self.block = <uint8_t *>malloc(self.block_frames * self.frame_len)
            if self.block == NULL:
                raise MemoryError()
            for i in range(self.block_frames):
                memcpy(self.block + i * self.frame_len, <char *>frame, self.frame_len)
        self.payload_len = len(payload)
        self.big_messages = self.payload_len >= BIG_MESSAGE
        if self.payload_len:
            self.payload = <uint8_t *>malloc(self.payload_len)
            if self.payload == NULL:
                raise MemoryError()
            memcpy(self.payload, <char *>payload, self.payload_len)

    def __dealloc__(self):
        cdef int fd
        if self.conns != NULL:
            for fd in range(self.max_fd + 1):
                if self.conns[fd].state != ST_FREE:
                    close(fd)
                    free(self.conns[fd].stash)
                    free(self.conns[fd].out)
                    free(self.conns[fd].zcheck)
            free(self.conns)
        if self.epfd >= 0:
            close(self.epfd)
        for i in range(3):
            free(self.hists[i].counts)
        free(self.timed)
        free(self.rbuf)
        free(self.sources)
        free(self.source_lens)
        free(self.req_buf)
        free(self.block)
        free(self.payload)
        free(self.probe)
        free(self.seq_count)
        free(self.seq_max)
        free(self.pub_payload)
        free(self.pub_frame)

    # ------------------------------------------------------------------ Python API

    def fileno(self):
        """The epoll descriptor: readable when any connection has an event."""
        return self.epfd

    @property
    def mask_key(self):
        return bytes(self.mask[:4])

    @property
    def ramp_done(self):
        return not self.ramping and self.in_progress == 0

    @property
    def stopped_by(self):
        return STOP_REASONS[self.stop_reason]

    def set_mode(self, int mode, bint refill=False):
        self.mode = mode
        self.refill = refill

    def set_measure_from(self, int64_t t_ns, int64_t round_trip_limit=0):
        """PINGPONG: record round trips that end at or after t_ns (CLOCK_MONOTONIC), at most the limit."""
        self.measure_from = t_ns
        self.round_trip_limit = round_trip_limit

    def poll(self, int timeout_ms=0):
        """Handle the events ready now (or within timeout_ms); returns how many there were."""
        cdef int n = self._poll(timeout_ms)
        self._after_events()
        return n

    def run_until(self, double deadline, int64_t max_received=0, int64_t max_round_trips=0,
                  int64_t max_cycles=0):
        """Handle events until time.monotonic() reaches deadline (or a count is reached)."""
        cdef int64_t end = <int64_t>(deadline * 1e9)
        cdef int64_t now = lg_now_ns()
        cdef int64_t wait
        while now < end:
            if max_received and self.received >= max_received:
                break
            if max_round_trips and self.round_trips >= max_round_trips:
                break
            if max_cycles and self.cycles >= max_cycles:
                break
            wait = (end - now) // 1000000
            self._poll(<int>min(max(wait, 0), 50))
            self._after_events()
            now = lg_now_ns()

    def tick(self):
        """Timeouts and paced connection starts: call every few tens of milliseconds (cheap when idle)."""
        if self.in_progress or self.closing:
            self._expire(lg_now_ns())
        self._after_events()

    def ramp(self, int64_t target, int64_t concurrency=100, double rate=0.0, double timeout=0.0,
             int64_t max_failures=1000):
        """Open ``target`` more connections, ``concurrency`` at a time (``rate`` per second if set),
        giving up after ``timeout`` seconds or ``max_failures`` failed attempts."""
        cdef int64_t now = lg_now_ns()
        self.ramping = target > 0
        self.ramp_target = target
        self.ramp_opened = 0
        self.concurrency = max(1, concurrency)
        self.rate = rate
        self.ramp_t0 = now
        self.attempts = 0
        self.ramp_deadline = now + <int64_t>(timeout * 1e9) if timeout > 0 else 0
        self.max_failures = max_failures
        self.ramp_failed0 = self.failed
        self.stop_reason = STOP_NONE if target > 0 else STOP_TARGET
        self._ramp_more(now)

    def cycle(self, int64_t concurrency, double deadline, int64_t limit=0, int64_t max_failures=1000):
        """CYCLE mode: keep ``concurrency`` connect + upgrade + close loops going until deadline
        (time.monotonic()) or ``limit`` cycles."""
        self.mode = CYCLE
        self.cycle_deadline = <int64_t>(deadline * 1e9)
        self.ramp(limit if limit else (1 << 62), concurrency, 0.0, 0.0, max_failures)

    def stop_ramp(self):
        if self.ramping:
            self.ramping = False
            self.stop_reason = STOP_ASKED

    def send_all(self, int64_t count):
        """Write ``count`` data messages on every open connection (one send each)."""
        cdef int fd
        for fd in range(self.max_fd + 1):
            if self.conns[fd].state == ST_OPEN:
                self.sent += count
                if self.mode == PINGPONG:
                    self.conns[fd].t0 = lg_now_ns()
                self._write_frames(&self.conns[fd], count)
        self._after_events()

    def start_check(self):
        """Send one message on every open connection and compare its echo with the payload."""
        cdef int fd
        for fd in range(self.max_fd + 1):
            if self.conns[fd].state == ST_OPEN:
                self.conns[fd].flags = (self.conns[fd].flags | F_CHECK) & ~F_CHECK_BAD
                self.sent += 1
                self._write_frames(&self.conns[fd], 1)
        self._after_events()

    def verify(self, int64_t max_conns=-1):
        """Send the probe on (up to max_conns) open connections; ``verified`` counts the answers."""
        cdef int fd
        cdef int64_t n = 0
        for fd in range(self.max_fd + 1):
            if max_conns >= 0 and n >= max_conns:
                break
            if self.conns[fd].state == ST_OPEN and not (self.conns[fd].flags & F_VERIFY):
                self.conns[fd].flags |= F_VERIFY
                if self.raw:
                    self.conns[fd].msg_off = 0  # count the probe's bytes coming back
                self.verify_sent += 1
                self.sent += 1
                n += 1
                self._write_bytes(&self.conns[fd], self.probe, self.probe_len)
        self._after_events()
        return n

    def close_all(self):
        """Start the closing handshake on every connection (raw: close); ``live`` drops to 0 as they end."""
        cdef int fd
        cdef int64_t now = lg_now_ns()
        self.ramping = False
        for fd in range(self.max_fd + 1):
            if self.conns[fd].state in (ST_CONNECTING, ST_HANDSHAKE):
                self._release(&self.conns[fd])
            elif self.conns[fd].state == ST_OPEN:
                if self.raw:
                    self.closed_clean += 1
                    self._release(&self.conns[fd])
                else:
                    self._start_close(&self.conns[fd], 1000, now)
        self._after_events()

    def abort_all(self):
        cdef int fd
        for fd in range(self.max_fd + 1):
            if self.conns[fd].state != ST_FREE:
                self._release(&self.conns[fd])

    def set_broadcast(self, str run_id, Py_ssize_t size=0, int64_t seq_cap=0):
        """Subscribers: count deliveries of messages 0..seq_cap-1 marked with run_id.
        Publisher: publish() builds messages of ``size`` bytes with that mark."""
        self.run_mark = f"fastws-bench {run_id} ".encode()
        free(self.seq_count)
        free(self.seq_max)
        self.seq_cap = seq_cap
        self.seq_count = <int64_t *>calloc(max(1, seq_cap), sizeof(int64_t))
        self.seq_max = <int64_t *>calloc(max(1, seq_cap), sizeof(int64_t))
        self.pub_size = max(size, len(self.run_mark) + 48)
        free(self.pub_payload)
        free(self.pub_frame)
        self.pub_payload = <uint8_t *>malloc(self.pub_size)
        self.pub_frame = <uint8_t *>malloc(self.pub_size + 14)
        if self.seq_count == NULL or self.seq_max == NULL or self.pub_payload == NULL or self.pub_frame == NULL:
            raise MemoryError()
        memset(self.pub_payload, 120, self.pub_size)  # 'x'

    def publish(self, int64_t n):
        """Send n broadcast messages (text: "<mark><seq> <CLOCK_MONOTONIC ns> xxx...") on the first
        open connection; returns how many were sent."""
        cdef int fd
        cdef Conn *c = NULL
        cdef int64_t i
        cdef bytes head
        cdef Py_ssize_t hl
        cdef size_t flen
        for fd in range(self.max_fd + 1):
            if self.conns[fd].state == ST_OPEN:
                c = &self.conns[fd]
                break
        if c == NULL or self.pub_payload == NULL:
            return 0
        for i in range(n):
            head = self.run_mark + b"%d %d " % (self.published, lg_now_ns())
            hl = len(head)
            memcpy(self.pub_payload, <char *>head, hl)
            flen = lg_frame(self.pub_frame, 1, self.pub_payload, self.pub_size, self.mask, 0)
            memset(self.pub_payload, 120, hl)
            self._write_bytes(c, self.pub_frame, flen)
            self.published += 1
            self.sent += 1
            if c.state != ST_OPEN:
                return i + 1
        return n

    @property
    def pending_bytes(self):
        """Bytes written but not yet taken by the kernel, over all connections."""
        cdef int fd
        cdef int64_t total = 0
        for fd in range(self.max_fd + 1):
            if self.conns[fd].state != ST_FREE:
                total += self.conns[fd].out_len + <int64_t>self.conns[fd].out_frames * self.frame_len
        return total

    def histogram(self, str name):
        """{count, min, max, sum, buckets: [[index, count], ...]} of "round_trip", "open" or "delivery" (ns)."""
        cdef Hist *h = &self.hists[HISTOGRAMS.index(name)]
        cdef int i
        return {"count": h.total, "min": h.vmin, "max": h.vmax, "sum": h.vsum,
                "indexed": [[i, h.counts[i]] for i in range(LG_HIST_BUCKETS) if h.counts[i]]}

    def per_message(self):
        """SUBSCRIBE: [[seq, deliveries, max latency ns], ...] for every message seen."""
        cdef int64_t s
        return [[s, self.seq_count[s], self.seq_max[s]] for s in range(self.seq_cap) if self.seq_count[s]]

    def failures(self):
        """Failed connection attempts by cause: ECONNREFUSED, EADDRNOTAVAIL, timeout, HTTP 503..."""
        cdef int i
        out = {}
        for i in range(256):
            if self.fail_errno[i]:
                out[_errno.errorcode.get(i, f"errno {i}")] = self.fail_errno[i]
        for i in range(600):
            if self.fail_http[i]:
                out[f"HTTP {i}"] = self.fail_http[i]
        if self.fail_kind[FAIL_TIMEOUT]:
            out["timeout"] = self.fail_kind[FAIL_TIMEOUT]
        if self.fail_kind[FAIL_CLOSED]:
            out["closed during handshake"] = self.fail_kind[FAIL_CLOSED]
        if self.fail_kind[FAIL_INVALID]:
            out["invalid handshake response"] = self.fail_kind[FAIL_INVALID]
        if self.fail_kind[FAIL_NO_DEFLATE]:
            out[self._no_deflate_cause()] = self.fail_kind[FAIL_NO_DEFLATE]
        return out

    def first_failure(self):
        """The first failed attempt: cause, the connections open then, seconds into the ramp."""
        if not self.first_fail_kind:
            return None
        return {"cause": self._cause(self.first_fail_kind, self.first_fail_code),
                "open": self.first_fail_opened,
                "t": round((self.first_fail_t - self.ramp_t0) / 1e9, 3)}

    cdef str _cause(self, int kind, int code):
        if kind == FAIL_ERRNO:
            return _errno.errorcode.get(code, f"errno {code}")
        if kind == FAIL_HTTP:
            return f"HTTP {code}"
        return {FAIL_TIMEOUT: "timeout", FAIL_CLOSED: "closed during handshake",
                FAIL_INVALID: "invalid handshake response",
                FAIL_NO_DEFLATE: self._no_deflate_cause()}[kind]

    cdef str _no_deflate_cause(self):
        return f"server declined permessage-deflate or limited the client's window below {self.deflate_bits} bits"

    # ------------------------------------------------------------------ event loop

    cdef int _poll(self, int timeout_ms) noexcept:
        cdef epoll_event events[EVENTS]
        cdef int n = epoll_wait(self.epfd, events, EVENTS, timeout_ms)
        cdef int i
        cdef Conn *c
        cdef uint32_t ev
        for i in range(n):
            c = &self.conns[events[i].data.fd]
            ev = events[i].events
            if c.state == ST_FREE:
                continue
            if c.state == ST_CONNECTING:
                self._on_connect(c)
                continue
            if ev & EPOLLOUT:
                self._flush(c)
                if c.state == ST_FREE:
                    continue
            if ev & (EPOLLIN | EPOLLERR | EPOLLHUP):
                self._on_readable(c)
        return n if n > 0 else 0

    cdef void _after_events(self) noexcept:
        cdef int64_t now
        if self.need_ramp or (self.ramping and self.rate > 0):
            self.need_ramp = False
            now = lg_now_ns()
            self._ramp_more(now)
        if self.in_progress or self.closing:  # something has a deadline
            now = lg_now_ns()
            if now - self.last_expire > 20000000:
                self._expire(now)

    cdef void _expire(self, int64_t now) noexcept:
        """End what passed its deadline: only the connections in ``timed`` (at most the handshakes and
        closes under way), not every connection, are looked at."""
        cdef int i
        cdef Conn *c
        self.last_expire = now
        for i in range(self.n_timed - 1, -1, -1):  # removal moves the last entry here: already seen
            if i >= self.n_timed:
                continue
            c = &self.conns[self.timed[i]]
            if now < c.deadline:
                continue
            if c.state < ST_OPEN:
                self._fail(c, FAIL_TIMEOUT, 0)
            else:
                self.close_timeouts += 1
                if not (c.flags & F_CLOSE_RCVD):
                    self.closed_unclean += 1
                else:
                    self.closed_clean += 1
                self._finish_cycle(c)
                self._release(c)
        self._ramp_more(now)

    cdef void _set_deadline(self, Conn *c, int64_t deadline) noexcept:
        cdef int i
        c.deadline = deadline
        if deadline and not c.timed_slot:
            self.timed[self.n_timed] = c.fd
            self.n_timed += 1
            c.timed_slot = self.n_timed
        elif not deadline and c.timed_slot:
            i = c.timed_slot - 1
            self.n_timed -= 1
            if i != self.n_timed:
                self.timed[i] = self.timed[self.n_timed]
                self.conns[self.timed[i]].timed_slot = i + 1
            c.timed_slot = 0

    # ------------------------------------------------------------------ connecting

    cdef void _ramp_more(self, int64_t now) noexcept:
        cdef int err
        cdef int64_t busy
        while self.ramping:
            if self.mode == CYCLE:
                busy = self.in_progress + self.live
                if self.cycle_deadline and now >= self.cycle_deadline:
                    self.ramping = False
                    self.stop_reason = STOP_TIMEOUT
                    return
                if self.attempts >= self.ramp_target:
                    self.ramping = False
                    self.stop_reason = STOP_TARGET
                    return
            else:
                busy = self.in_progress
                if self.ramp_opened + self.in_progress >= self.ramp_target:
                    return
            if busy >= self.concurrency:
                return
            if self.ramp_deadline and now >= self.ramp_deadline:
                self.ramping = False
                self.stop_reason = STOP_TIMEOUT
                return
            if self.rate > 0 and self.ramp_t0 + <int64_t>(self.attempts * 1e9 / self.rate) > now:
                return
            err = self._start_connect(now)
            if err:
                self._record_failure(FAIL_ERRNO, err, now)

    cdef int _start_connect(self, int64_t now) noexcept:
        """Start one non-blocking connect; 0, or the errno of a failure found right away."""
        cdef int one = 1
        cdef int err
        cdef int k
        cdef epoll_event ev
        cdef int fd = socket(self.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        self.attempts += 1
        if fd < 0:
            return errno
        if fd >= self.cap:
            close(fd)
            return EMFILE
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        if self.n_sources:
            # The port is picked at connect() time, per destination: each source address has its own range.
            setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one))
            k = self.source_next % self.n_sources
            self.source_next += 1
            if bind(fd, <sockaddr *>&self.sources[k], self.source_lens[k]) < 0:
                err = errno
                close(fd)
                return err
        if connect(fd, <sockaddr *>&self.target, self.target_len) < 0 and errno != EINPROGRESS:
            err = errno
            close(fd)
            return err
        ev.events = EPOLLIN | EPOLLOUT
        ev.data.u64 = 0
        ev.data.fd = fd
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            err = errno
            close(fd)
            return err
        cdef Conn *c = &self.conns[fd]
        memset(c, 0, sizeof(Conn))
        c.fd = fd
        c.state = ST_CONNECTING
        c.flags = F_WANT_OUT
        self.next_serial += 1
        c.serial = self.next_serial
        c.t0 = now
        self._set_deadline(c, now + self.open_timeout if self.open_timeout else 0)
        if fd > self.max_fd:
            self.max_fd = fd
        self.in_progress += 1
        return 0

    cdef void _on_connect(self, Conn *c) noexcept:
        cdef int err = 0
        cdef socklen_t elen = sizeof(err)
        cdef char key[24]
        cdef Py_ssize_t rlen
        if getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0:
            err = errno
        if err:
            self._fail(c, FAIL_ERRNO, err)
            return
        if self.raw:
            self._opened(c, lg_now_ns())
            self._update_events(c)
            return
        c.state = ST_HANDSHAKE
        self._make_key(c.serial, key)
        rlen = len(self.request)
        memcpy(self.req_buf, <char *>self.request, rlen)
        memcpy(self.req_buf + self.key_offset, key, 24)
        self._write_bytes(c, self.req_buf, rlen)
        if c.state == ST_HANDSHAKE:
            self._update_events(c)

    cdef void _make_key(self, uint32_t serial, char *out) noexcept:
        cdef uint8_t nonce[16]
        cdef uint64_t a = lg_splitmix(self.seed ^ (<uint64_t>serial * 0x9E3779B97F4A7C15ULL))
        cdef uint64_t b = lg_splitmix(a ^ self.seed)
        memcpy(nonce, &a, 8)
        memcpy(nonce + 8, &b, 8)
        lg_base64(nonce, 16, out)

    cdef void _handshake_data(self, Conn *c, uint8_t *p, Py_ssize_t n) noexcept:
        cdef uint8_t *head
        cdef Py_ssize_t head_len
        cdef uint8_t *end
        if c.stash == NULL:
            end = <uint8_t *>memmem(p, n, b"\r\n\r\n", 4)
            if end != NULL:
                head = p
                head_len = end + 4 - p
                self._handshake_done(c, head, head_len, p + head_len, n - head_len)
                return
            c.stash = <uint8_t *>malloc(RESPONSE_MAX)
            if c.stash == NULL:
                self._fail(c, FAIL_ERRNO, 12)  # ENOMEM
                return
        if c.stash_len + n > RESPONSE_MAX:
            self._fail(c, FAIL_INVALID, 0)
            return
        memcpy(c.stash + c.stash_len, p, n)
        c.stash_len += n
        end = <uint8_t *>memmem(c.stash, c.stash_len, b"\r\n\r\n", 4)
        if end == NULL:
            return
        head_len = end + 4 - c.stash
        # Frames that came with the head move to the read buffer (free again: their bytes are in the stash).
        memcpy(self.rbuf, c.stash + head_len, c.stash_len - head_len)
        self._handshake_done(c, c.stash, head_len, self.rbuf, c.stash_len - head_len)

    cdef void _handshake_done(self, Conn *c, const uint8_t *head, Py_ssize_t n, uint8_t *rest,
                              Py_ssize_t rest_len) noexcept:
        cdef int status
        cdef int err = self._check_response(c, head, n, &status)
        if err:
            self._fail(c, err, status)
            return
        free(c.stash)
        c.stash = NULL
        c.stash_len = 0
        self._opened(c, lg_now_ns())
        if rest_len > 0 and c.state >= ST_OPEN:
            self._frames(c, rest, rest_len)

    cdef int _check_response(self, Conn *c, const uint8_t *h, Py_ssize_t n, int *status) noexcept:
        """0 if h[:n] is a 101 response with the right Sec-WebSocket-Accept, else a FAIL_ kind."""
        cdef char key[24]
        cdef uint8_t data[60]
        cdef uint8_t digest[20]
        cdef char accept[28]
        cdef Py_ssize_t i, j, line
        status[0] = 0
        if n < 12 or memcmp(h, b"HTTP/1.", 7) != 0 or h[8] != 32:
            return FAIL_INVALID
        for i in range(9, 12):
            if not 48 <= h[i] <= 57:
                return FAIL_INVALID
            status[0] = status[0] * 10 + h[i] - 48
        if status[0] != 101:
            return FAIL_HTTP if status[0] < 600 else FAIL_INVALID
        self._make_key(c.serial, key)
        memcpy(data, key, 24)
        memcpy(data + 24, b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11", 36)
        lg_sha1(data, 60, digest)
        lg_base64(digest, 20, accept)
        cdef bint accepted = False
        cdef bint deflate = False
        cdef int64_t window = 15
        cdef const uint8_t *bits
        line = 0
        while line < n:
            i = line
            while i + 1 < n and not (h[i] == 13 and h[i + 1] == 10):
                i += 1
            if i - line > 21 + 28 and strncasecmp(<const char *>h + line, "sec-websocket-accept:", 21) == 0:
                j = line + 21
                while j < i and (h[j] == 32 or h[j] == 9):
                    j += 1
                if j + 28 > i or memcmp(h + j, accept, 28) != 0:
                    return FAIL_INVALID
                accepted = True
            elif i - line > 25 and strncasecmp(<const char *>h + line, "sec-websocket-extensions:", 25) == 0:
                if memmem(h + line, i - line, b"permessage-deflate", 18) != NULL:
                    deflate = True  # (a second Sec-WebSocket-Extensions line does not undo it)
                bits = <const uint8_t *>memmem(h + line, i - line, b"client_max_window_bits=", 23)
                if bits != NULL:
                    j = bits - h + 23
                    if j < i and h[j] == 34:  # a quoted value
                        j += 1
                    window = parse_uint(h, i + 1, &j)  # (h[i] is the line's CR: the digits end before it)
            line = i + 2
        if not accepted:
            return FAIL_INVALID
        if self.deflate_bits and (not deflate or window < self.deflate_bits):
            return FAIL_NO_DEFLATE  # (a window too small for the pre-built frame: declined as good as)
        return 0

    cdef void _opened(self, Conn *c, int64_t now) noexcept:
        self.in_progress -= 1
        self.live += 1
        self.opened += 1
        self.ramp_opened += 1
        hist_record(&self.hists[1], now - c.t0)
        c.state = ST_OPEN
        self._set_deadline(c, 0)
        c.msg_off = 0
        if self.ramping and self.mode != CYCLE and self.ramp_opened >= self.ramp_target:
            self.ramping = False
            self.stop_reason = STOP_TARGET
        if self.mode == CYCLE and not self.raw:
            self._start_close(c, 1000, now)
        self.need_ramp = True

    cdef void _record_failure(self, int kind, int code, int64_t now) noexcept:
        self.failed += 1
        if kind == FAIL_ERRNO:
            self.fail_errno[code if 0 <= code < 256 else 0] += 1
        elif kind == FAIL_HTTP:
            self.fail_http[code] += 1
        else:
            self.fail_kind[kind] += 1
        if not self.first_fail_kind:
            self.first_fail_kind = kind
            self.first_fail_code = code
            self.first_fail_t = now
            self.first_fail_opened = self.opened
        if self.ramping and self.max_failures and self.failed - self.ramp_failed0 >= self.max_failures:
            self.ramping = False
            self.stop_reason = STOP_FAILURES

    cdef void _fail(self, Conn *c, int kind, int code) noexcept:
        """A connection attempt failed: count it by cause, free the slot, let the ramp go on."""
        self._record_failure(kind, code, lg_now_ns())
        self._release(c)
        self.need_ramp = True

    cdef void _release(self, Conn *c) noexcept:
        if c.state == ST_CONNECTING or c.state == ST_HANDSHAKE:
            self.in_progress -= 1
        elif c.state == ST_OPEN or c.state == ST_CLOSING:
            self.live -= 1
            if c.state == ST_CLOSING:
                self.closing -= 1
        self._set_deadline(c, 0)
        close(c.fd)  # also leaves the epoll set
        free(c.stash)
        free(c.out)
        free(c.zcheck)
        memset(c, 0, sizeof(Conn))

    # ------------------------------------------------------------------ reading

    cdef void _on_readable(self, Conn *c) noexcept:
        """Read what the socket has.  Bytes nobody looks at (raw TCP; the payload of a big message once its
        header is parsed) are dropped by the kernel (MSG_TRUNC): the client's only per-byte work is gone."""
        cdef Py_ssize_t r, want
        cdef int attempt
        cdef bint drop
        for attempt in range(8):
            drop = False
            want = self.rbuf_size
            if c.state >= ST_OPEN:
                if self.raw:
                    drop = True
                elif c.flags & F_IN_PAYLOAD and c.remaining >= DISCARD_MIN and self._payload_unneeded(c):
                    drop = True
                    want = <Py_ssize_t>min(c.remaining, 1 << 30)
                elif self.big_messages:
                    want = HEADER_READ
            if drop:
                r = recv(c.fd, NULL, want, MSG_TRUNC)
            else:
                r = recv(c.fd, self.rbuf, want, 0)
            if r > 0:
                self.reads += 1
                self.bytes_received += r
                if c.state == ST_HANDSHAKE:
                    self._handshake_data(c, self.rbuf, r)
                elif self.raw:
                    self._raw_data(c, r)
                elif drop:
                    c.remaining -= r
                    c.msg_off += r
                    if c.remaining == 0:
                        self._frames(c, NULL, 0)  # completes the frame: counts, answers
                else:
                    self._frames(c, self.rbuf, r)
                if c.state == ST_FREE or r < want:
                    return
            elif r == 0:
                self._lost(c, 0)
                return
            else:
                if errno == EAGAIN or errno == EWOULDBLOCK or errno == EINTR:
                    return
                self._lost(c, errno)
                return

    cdef inline bint _payload_unneeded(self, Conn *c) noexcept:
        """Nothing reads the rest of this frame's payload: not a control frame, not a message being compared,
        not the prefix of a broadcast message."""
        return c.opcode < 8 and not (c.flags & F_CHECK) and not (self.mode == SUBSCRIBE and c.msg_off < PREFIX)

    cdef void _lost(self, Conn *c, int err) noexcept:
        """EOF or a socket error."""
        if c.state < ST_OPEN:
            self._fail(c, FAIL_ERRNO if err else FAIL_CLOSED, err)
            return
        if c.state == ST_OPEN:
            self.dropped += 1
        elif c.flags & F_CLOSE_RCVD:
            self.closed_clean += 1
        else:
            self.closed_unclean += 1
        self._finish_cycle(c)
        self._release(c)

    cdef inline void _finish_cycle(self, Conn *c) noexcept:
        if self.mode == CYCLE and c.flags & F_CLOSE_OURS:
            self.cycles += 1
            self.need_ramp = True

    cdef void _raw_data(self, Conn *c, Py_ssize_t n) noexcept:
        """Raw TCP: every ``frame_len`` bytes back are one message."""
        cdef int64_t whole
        if c.state != ST_OPEN:
            return
        c.msg_off += n
        if c.flags & F_VERIFY:
            if c.msg_off >= self.probe_len:
                c.msg_off -= self.probe_len
                c.flags &= ~F_VERIFY
                self.verified += 1
            return
        if self.frame_len == 0:
            return
        whole = c.msg_off // self.frame_len
        c.msg_off -= whole * self.frame_len
        if whole == 0:
            return
        self.received += whole
        if self.mode == ECHO and self.refill:
            self.sent += whole
            self._write_frames(c, whole)
        elif self.mode == PINGPONG:
            self._round_trip(c)

    cdef void _frames(self, Conn *c, const uint8_t *p, Py_ssize_t n) noexcept:
        """Parse server frames in p[:n] (payloads are not copied); answer the echoes with one write."""
        cdef int64_t echoes = 0
        cdef const uint8_t *hp
        cdef int hl
        cdef Py_ssize_t take
        cdef const uint8_t *whole_msg
        cdef const uint8_t *ctl
        while c.state >= ST_OPEN:
            if not (c.flags & F_IN_PAYLOAD):
                if n == 0:
                    break
                if c.hdr_have == 0 and n >= 2 and n >= header_len(p[1]):
                    hp = p
                    hl = header_len(p[1])
                    p += hl
                    n -= hl
                else:
                    while n > 0 and (c.hdr_have < 2 or c.hdr_have < header_len(c.hdr[1])):
                        c.hdr[c.hdr_have] = p[0]
                        c.hdr_have += 1
                        p += 1
                        n -= 1
                    if c.hdr_have < 2 or c.hdr_have < header_len(c.hdr[1]):
                        break
                    hp = c.hdr
                    c.hdr_have = 0
                if self._header(c, hp) < 0:
                    self.protocol_errors += 1
                    self._lost(c, 0)
                    return
            take = n if n < c.remaining else <Py_ssize_t>c.remaining
            whole_msg = NULL
            ctl = NULL
            if c.opcode >= 8:
                if c.ctl_have == 0 and take == c.remaining:
                    ctl = p
                elif take:
                    if not self._stash(c):
                        return
                    memcpy(c.stash + PREFIX + c.ctl_have, p, take)
                    c.ctl_have += take
            else:
                if c.flags & F_CHECK and take:
                    if c.flags & F_COMPRESSED:
                        self._gather_check(c, p, take)  # (before msg_off counts these bytes)
                    elif (c.msg_off + take > self.payload_len
                            or memcmp(p, self.payload + c.msg_off, take) != 0):
                        c.flags |= F_CHECK_BAD
                if self.mode == SUBSCRIBE:
                    if c.msg_off == 0 and take == c.remaining and c.flags & F_FIN:
                        whole_msg = p  # the whole message is in this read: no copy
                    elif c.msg_off < PREFIX and take:
                        if not self._stash(c):
                            return
                        memcpy(c.stash + c.msg_off, p, min(take, PREFIX - c.msg_off))
                c.msg_off += take
            p += take
            n -= take
            c.remaining -= take
            if c.remaining:
                break
            c.flags &= ~F_IN_PAYLOAD
            if c.opcode >= 8:
                if ctl == NULL:
                    ctl = c.stash + PREFIX  # ctl_have > 0: it was stashed
                self._control(c, ctl, c.ctl_have if c.ctl_have else take)
                c.ctl_have = 0
                if c.flags & F_CLOSE_RCVD:
                    break  # nothing after a close frame counts
            elif c.flags & F_FIN:
                echoes += self._message(c, whole_msg)
        if echoes and c.state == ST_OPEN and self.refill:
            self.sent += echoes
            self._write_frames(c, echoes)

    cdef int _header(self, Conn *c, const uint8_t *h) noexcept:
        cdef uint8_t b0 = h[0]
        cdef uint8_t b1 = h[1]
        cdef int opcode = b0 & 0x0F
        cdef uint64_t n = b1 & 0x7F
        cdef int i
        if b1 & 0x80 or b0 & (0x30 if self.deflate_bits else 0x70):  # masked, or RSV bits no extension gives
            return -1
        if b0 & 0x40 and (opcode == 0 or opcode >= 8):  # RSV1 marks a message's first frame only
            return -1
        if n == 126:
            n = (<uint64_t>h[2] << 8) | h[3]
        elif n == 127:
            n = 0
            for i in range(2, 10):
                n = (n << 8) | h[i]
            if n >> 63:
                return -1
        if opcode >= 8:
            if not (b0 & 0x80) or n > 125 or opcode > 10:
                return -1
        elif opcode > 2:
            return -1
        elif opcode != 0:
            c.msg_off = 0  # a new message
            c.flags = (c.flags | F_COMPRESSED) if b0 & 0x40 else (c.flags & ~F_COMPRESSED)
        c.opcode = <uint8_t>opcode
        c.remaining = <int64_t>n
        c.flags = (c.flags | F_IN_PAYLOAD | F_FIN) if b0 & 0x80 else ((c.flags | F_IN_PAYLOAD) & ~F_FIN)
        return 0

    cdef void _gather_check(self, Conn *c, const uint8_t *p, Py_ssize_t n) noexcept:
        """Keep this part of a compressed message being checked at zcheck[msg_off:] (inflated once
        whole, in _message)."""
        cdef Py_ssize_t cap = self.payload_len + self.payload_len // 4 + 1024  # deflate's worst case, and more
        if c.flags & F_CHECK_BAD:
            return
        if c.msg_off + n > cap:
            c.flags |= F_CHECK_BAD  # bigger than any deflate of the payload: not its echo
            return
        if c.zcheck == NULL:
            c.zcheck = <uint8_t *>malloc(cap)
            if c.zcheck == NULL:
                c.flags |= F_CHECK_BAD
                return
        memcpy(c.zcheck + c.msg_off, p, n)

    cdef bint _stash(self, Conn *c) noexcept:
        if c.stash == NULL:
            c.stash = <uint8_t *>malloc(STASH_SIZE)
            if c.stash == NULL:
                self._lost(c, 12)
                return False
        return True

    cdef void _control(self, Conn *c, const uint8_t *p, Py_ssize_t n) noexcept:
        cdef uint8_t frame[140]
        cdef size_t flen
        cdef int code
        if c.opcode == 9:  # ping: pong with the same payload
            self.pings += 1
            if not (c.flags & F_CLOSE_SENT):
                flen = lg_frame(frame, 10, p, n, self.mask, 0)
                self._write_bytes(c, frame, flen)
        elif c.opcode == 10:
            self.pongs += 1
        else:  # close
            code = (p[0] << 8 | p[1]) if n >= 2 else 1000
            c.flags |= F_CLOSE_RCVD
            if c.state == ST_OPEN:
                self.dropped += 1  # the server ended an open connection
                self._start_close(c, code if 1000 <= code < 5000 else 1000, lg_now_ns())
            self._free_stash(c)

    cdef void _start_close(self, Conn *c, int code, int64_t now) noexcept:
        cdef uint8_t frame[16]
        cdef uint8_t body[2]
        cdef size_t flen
        if c.state != ST_OPEN:
            return
        c.state = ST_CLOSING
        self.closing += 1
        self._set_deadline(c, now + self.close_timeout if self.close_timeout else 0)
        if not (c.flags & F_CLOSE_RCVD):
            c.flags |= F_CLOSE_OURS
        body[0] = <uint8_t>(code >> 8)
        body[1] = <uint8_t>code
        flen = lg_frame(frame, 8, body, 2, self.mask, 0)
        c.flags |= F_CLOSE_SENT
        self._write_bytes(c, frame, flen)

    cdef inline void _free_stash(self, Conn *c) noexcept:
        free(c.stash)
        c.stash = NULL

    cdef int64_t _message(self, Conn *c, const uint8_t *whole_msg) noexcept:
        """A whole data message arrived: 1 if it is to be answered by an echo frame."""
        self.received += 1
        if c.flags & F_CHECK:
            if c.flags & F_COMPRESSED:
                if c.zcheck == NULL or not lg_inflates_to(c.zcheck, c.msg_off, self.payload, self.payload_len):
                    c.flags |= F_CHECK_BAD
                free(c.zcheck)
                c.zcheck = NULL
                c.msg_off = self.payload_len  # compared: the length test below is the inflater's
            if c.flags & F_CHECK_BAD or c.msg_off != self.payload_len:
                self.checks_bad += 1
            else:
                self.checks_good += 1
            c.flags &= ~(F_CHECK | F_CHECK_BAD)
            return 0
        if c.flags & F_VERIFY:
            c.flags &= ~F_VERIFY
            self.verified += 1
            return 0
        if self.mode == ECHO:
            return 1
        if self.mode == PINGPONG:
            self._round_trip(c)
        elif self.mode == SUBSCRIBE:
            if whole_msg != NULL:
                self._delivery(whole_msg, min(c.msg_off, PREFIX))
            elif c.stash != NULL:
                self._delivery(c.stash, min(c.msg_off, PREFIX))
                self._free_stash(c)
        return 0

    cdef void _round_trip(self, Conn *c) noexcept:
        cdef int64_t now = lg_now_ns()
        if c.t0 and now >= self.measure_from and (
                self.round_trip_limit == 0 or self.round_trips < self.round_trip_limit):
            hist_record(&self.hists[0], now - c.t0)
            self.round_trips += 1
        if self.refill and c.state == ST_OPEN and (
                self.round_trip_limit == 0 or self.round_trips < self.round_trip_limit):
            self.sent += 1
            c.t0 = lg_now_ns()
            self._write_frames(c, 1)
        else:
            c.t0 = 0

    cdef void _delivery(self, const uint8_t *p, Py_ssize_t n) noexcept:
        """A broadcast message: find "<mark><seq> <sent ns> " and record its delivery latency."""
        cdef int64_t now = lg_now_ns()
        cdef Py_ssize_t mlen = len(self.run_mark)
        cdef const uint8_t *q = <const uint8_t *>memmem(p, n, <char *>self.run_mark, mlen)
        cdef Py_ssize_t pos
        cdef int64_t seq, sent, lat
        if q == NULL:
            self.foreign += 1
            return
        pos = (q - p) + mlen
        seq = parse_uint(p, n, &pos)
        if seq < 0 or p[pos] != 32:
            self.foreign += 1
            return
        pos += 1
        sent = parse_uint(p, n, &pos)
        if sent < 0:
            self.foreign += 1
            return
        lat = now - sent
        hist_record(&self.hists[2], lat)
        self.deliveries += 1
        if seq < self.seq_cap:
            self.seq_count[seq] += 1
            if lat > self.seq_max[seq]:
                self.seq_max[seq] = lat
        if self.first_delivery == 0:
            self.first_delivery = now
        self.last_delivery = now

    # ------------------------------------------------------------------ writing

    cdef inline Py_ssize_t _send(self, Conn *c, const uint8_t *p, Py_ssize_t n) noexcept:
        """Bytes the kernel took (0 if none), or -1 if the connection is broken."""
        cdef Py_ssize_t r = send(c.fd, p, n, MSG_NOSIGNAL)
        self.writes += 1
        if r >= 0:
            return r
        if errno == EAGAIN or errno == EWOULDBLOCK or errno == EINTR:
            return 0
        self.write_errors += 1
        return -1

    cdef void _write_frames(self, Conn *c, int64_t k) noexcept:
        """k copies of the pre-built frame, straight from the shared block (never copied)."""
        cdef int64_t m
        cdef Py_ssize_t length, r
        if k <= 0 or self.frame_len == 0:
            return
        if c.out_len or c.out_frames:
            c.out_frames += <uint32_t>k
            self._update_events(c)
            return
        while k > 0:
            m = min(k, self.block_frames)
            length = m * self.frame_len
            r = self._send(c, self.block, length)
            if r < 0:
                return  # the read side sees the error and ends the connection
            if r < length:
                c.out_frames = <uint32_t>(k - r // self.frame_len)
                c.out_frame_off = <uint32_t>(r % self.frame_len)
                self._update_events(c)
                return
            k -= m

    cdef void _write_bytes(self, Conn *c, const uint8_t *p, Py_ssize_t n) noexcept:
        """Any other bytes (handshake, pong, close, probe, published message): copied only if the kernel
        does not take them at once."""
        cdef Py_ssize_t r
        if c.out_frames:
            self._frames_to_out(c)
        if c.out_len == 0:
            r = self._send(c, p, n)
            if r < 0 or r == n:
                return
            p += r
            n -= r
        if not self._out_reserve(c, n):
            return
        memcpy(c.out + c.out_len, p, n)
        c.out_len += <uint32_t>n
        self._update_events(c)

    cdef bint _out_reserve(self, Conn *c, Py_ssize_t n) noexcept:
        cdef Py_ssize_t want = c.out_len + n
        cdef Py_ssize_t cap
        cdef uint8_t *grown
        if want <= c.out_cap:
            return True
        cap = max(want, 2 * <Py_ssize_t>c.out_cap, 4096)
        grown = <uint8_t *>realloc(c.out, cap)
        if grown == NULL:
            self.write_errors += 1
            return False
        c.out = grown
        c.out_cap = <uint32_t>cap
        return True

    cdef void _frames_to_out(self, Conn *c) noexcept:
        """Copy the pending pre-built frames into out, so that other bytes can queue behind them (rare)."""
        cdef int64_t left = <int64_t>c.out_frames * self.frame_len - c.out_frame_off
        cdef int64_t off = c.out_frame_off
        cdef int64_t chunk
        if not self._out_reserve(c, left):
            return
        while left > 0:
            chunk = min(left, self.block_frames * self.frame_len - off)
            memcpy(c.out + c.out_len, self.block + off, chunk)
            c.out_len += <uint32_t>chunk
            left -= chunk
            off = 0
        c.out_frames = 0
        c.out_frame_off = 0

    cdef void _flush(self, Conn *c) noexcept:
        cdef Py_ssize_t r
        cdef int64_t avail, total, pos
        if c.out_len:
            r = self._send(c, c.out, c.out_len)
            if r < 0:
                return
            if r < c.out_len:
                memmove(c.out, c.out + r, c.out_len - r)
                c.out_len -= <uint32_t>r
                return
            c.out_len = 0
            if c.out_cap > 65536:
                free(c.out)
                c.out = NULL
                c.out_cap = 0
        while c.out_frames:
            total = <int64_t>c.out_frames * self.frame_len - c.out_frame_off
            avail = self.block_frames * self.frame_len - c.out_frame_off
            r = self._send(c, self.block + c.out_frame_off, min(total, avail))
            if r < 0:
                return
            pos = c.out_frame_off + r
            c.out_frames -= <uint32_t>(pos // self.frame_len)
            c.out_frame_off = <uint32_t>(pos % self.frame_len)
            if r < min(total, avail):
                return
        self._update_events(c)

    cdef void _update_events(self, Conn *c) noexcept:
        """EPOLLOUT while there is something to flush (or while connecting), not otherwise."""
        cdef bint want = c.out_len > 0 or c.out_frames > 0 or c.state == ST_CONNECTING
        cdef epoll_event ev
        if want == ((c.flags & F_WANT_OUT) != 0):
            return
        ev.events = EPOLLIN | (EPOLLOUT if want else 0)
        ev.data.u64 = 0
        ev.data.fd = c.fd
        epoll_ctl(self.epfd, EPOLL_CTL_MOD, c.fd, &ev)
        if want:
            c.flags |= F_WANT_OUT
        else:
            c.flags &= ~F_WANT_OUT
