/* A non-blocking send() for the wire core's fan-out, where the platform has one; a fine clock. */
#ifndef FASTWS_SOCK_H
#define FASTWS_SOCK_H

#include <stddef.h>
#include <errno.h>

#ifdef _WIN32
/* Windows: fan-out always goes through the transport. */
static inline long fastws_send(int fd, const void *buf, size_t n) { (void)fd; (void)buf; (void)n; errno = EINVAL; return -1; }
#else
#include <sys/types.h>
#include <sys/socket.h>
#ifndef MSG_NOSIGNAL  /* macOS: Python ignores SIGPIPE, EPIPE comes back instead */
#define MSG_NOSIGNAL 0
#endif
static inline long fastws_send(int fd, const void *buf, size_t n) {
    return (long)send(fd, buf, n, MSG_DONTWAIT | MSG_NOSIGNAL);
}
#endif

/* A monotonic clock in seconds, fine-grained (the loop's time has 1 ms steps): ping round trips. */
#ifdef _WIN32
#include <windows.h>
static inline double fastws_monotonic(void) {
    LARGE_INTEGER count, freq;
    QueryPerformanceCounter(&count);
    QueryPerformanceFrequency(&freq);
    return (double)count.QuadPart / (double)freq.QuadPart;
}
#else
#include <time.h>
static inline double fastws_monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
#endif

static inline int fastws_would_block(void) { return errno == EAGAIN || errno == EINTR
#ifdef EWOULDBLOCK
    || errno == EWOULDBLOCK
#endif
    ; }

#endif
