/*
 * openloop: a small open-loop HTTP/1.1 load generator (single thread, epoll).
 *
 * Request i is scheduled at t0 + i/rate (CLOCK_MONOTONIC). At its scheduled time it goes out
 * on an idle keep-alive connection; with none idle a new connection is opened (up to
 * --max-connections) and the request waits in a FIFO queue. Latency always counts from the
 * scheduled time, so a slow server or a full pool shows up in the numbers (no coordinated
 * omission). Lateness = actual send time - scheduled time.
 *
 * Requests are pre-rendered raw HTTP/1.1 messages read from --requests FILE, separated by
 * NUL bytes; request i uses message i % n.
 *
 * Output: on stdout the line "RESULT sent=<n> done=<n> errors=<n>" and a "DETAIL ..." line;
 * --latency-out and --lateness-out get one uint32 little-endian microsecond value per
 * complete response (any status) / per sent request.
 *
 * Errors: non-2xx responses, connection failures and resets, protocol errors and requests
 * not complete --timeout seconds after their scheduled time (queued or in flight). A request
 * whose reused keep-alive connection closes before any response byte was never handled by
 * the server: it is sent again on another connection (counted in DETAIL retries=).
 *
 * Build: cc -O2 -Wall -Wextra -o openloop openloop.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

/* -DOPENLOOP_NO_PWAIT2 forces the timerfd fallback (for testing it). */
#if defined(__GLIBC__) && defined(__GLIBC_PREREQ) && !defined(OPENLOOP_NO_PWAIT2)
#if __GLIBC_PREREQ(2, 35)
#define HAVE_EPOLL_PWAIT2 1
#endif
#endif

typedef uint64_t u64;

#define NS_PER_S 1000000000ULL
#define SCAN_INTERVAL_NS 10000000ULL /* timeout checks every 10 ms */
#define LINE_CAP 8192                /* longest status/header/chunk-size line */
#define READ_CAP 65536
#define MAX_EVENTS 256
#define TIMER_TOKEN UINT32_MAX

enum { C_FREE, C_CONNECTING, C_IDLE, C_BUSY };
enum { P_STATUS, P_HEADER, P_BODY_CL, P_CHUNK_SIZE, P_CHUNK_DATA, P_CHUNK_END, P_TRAILER,
       P_BODY_EOF };
enum { LINE_MORE = 0, LINE_DONE = 1, LINE_BAD = -1 };

/* per-request flags */
#define F_SENT 1u

struct blob {
    const char *data;
    size_t len;
    int is_head;
};

struct conn {
    int fd;
    int state;
    int in_ring; /* has an entry in the idle ring (possibly stale) */
    int want_out;
    u64 since;   /* connect start, for connect timeouts */
    u64 uses;    /* responses completed on this connection */
    /* the request in flight */
    u64 req;
    u64 sched;
    const struct blob *blob;
    size_t woff;
    int got_bytes;
    int got_body;
    u64 t_body;
    /* response parser */
    int ps;
    int status;
    int minor;
    int chunked;
    int has_cl;
    int tok_close;
    int tok_keepalive;
    int close_after;
    u64 remaining;
    size_t llen;
    char line[LINE_CAP];
};

/* --- configuration ------------------------------------------------------------------------ */

static const char *opt_host = "127.0.0.1";
static const char *opt_port;
static const char *opt_requests;
static const char *opt_latency_out;
static const char *opt_lateness_out;
static double opt_rate;
static double opt_duration = -1;
static long long opt_count = -1;
static int opt_ttfb;
static int opt_connections = 32;
static int opt_max_connections = 256;
static double opt_timeout_s = 10.0;

/* --- state -------------------------------------------------------------------------------- */

static struct blob *blobs;
static size_t nblobs;
static struct sockaddr_storage addr;
static socklen_t addrlen;

static int epfd = -1;
static int tfd = -1; /* timerfd, when epoll_pwait2 is not available */
static u64 tfd_armed;
static int use_pwait2;

static struct conn *conns;
static int *free_slots;
static int nfree;
static int *ring; /* idle connections, FIFO (spreads load over the pool) */
static int ring_head, ring_len;
static int nconnecting, nbusy, nopen, peak_open;

static u64 total;
static u64 t0;
static u64 timeout_ns;
static u64 next_due;  /* first request whose scheduled time has not come */
static u64 next_disp; /* first due request not yet handed to a connection */
static u64 *retry;    /* requests to send again (connection closed before any response byte) */
static int retry_head, retry_len, retry_cap;
static unsigned char *rflags;

static uint32_t *lat;
static u64 nlat;
static uint32_t *late;
static u64 nlate;

static u64 n_sent, n_done, n_errors, n_status_err, n_conn_err, n_timeouts, n_proto_err,
    n_retries, n_connects;

static char rbuf[READ_CAP];

/* --- helpers ------------------------------------------------------------------------------ */

static u64 now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (u64)ts.tv_sec * NS_PER_S + (u64)ts.tv_nsec;
}

static u64 sched_ns(u64 i) { return t0 + (u64)((double)i * 1e9 / opt_rate); }

static uint32_t to_us(u64 ns)
{
    u64 us = (ns + 500) / 1000;
    return us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
}

static void die(const char *what)
{
    fprintf(stderr, "openloop: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size);
    if (!p) {
        fprintf(stderr, "openloop: out of memory\n");
        exit(1);
    }
    return p;
}

static int lower(int ch) { return ch >= 'A' && ch <= 'Z' ? ch + 32 : ch; }

static int ieq(const char *a, size_t alen, const char *b)
{
    size_t blen = strlen(b);
    if (alen != blen)
        return 0;
    for (size_t i = 0; i < alen; i++)
        if (lower((unsigned char)a[i]) != b[i])
            return 0;
    return 1;
}

/* Whether a comma-separated header value holds token (case-insensitive). */
static int has_token(const char *v, size_t len, const char *token)
{
    size_t i = 0;
    while (i < len) {
        while (i < len && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
            i++;
        size_t start = i;
        while (i < len && v[i] != ',' && v[i] != ';')
            i++;
        size_t end = i;
        while (end > start && (v[end - 1] == ' ' || v[end - 1] == '\t'))
            end--;
        if (ieq(v + start, end - start, token))
            return 1;
        while (i < len && v[i] != ',')
            i++; /* skip parameters */
    }
    return 0;
}

/* --- epoll -------------------------------------------------------------------------------- */

static void ep_set(struct conn *c, int op, int out)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN | EPOLLRDHUP | (out ? EPOLLOUT : 0);
    ev.data.u32 = (uint32_t)(c - conns);
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0)
        die("epoll_ctl");
    c->want_out = out;
}

/* Wait for events until deadline (absolute, ns); returns the number of events. */
static int wait_until(u64 deadline, struct epoll_event *events)
{
    for (;;) {
        u64 now = now_ns();
        u64 left = deadline > now ? deadline - now : 0;
        int n;
#ifdef HAVE_EPOLL_PWAIT2
        if (use_pwait2) {
            struct timespec ts = {(time_t)(left / NS_PER_S), (long)(left % NS_PER_S)};
            n = epoll_pwait2(epfd, events, MAX_EVENTS, &ts, NULL);
            if (n < 0 && (errno == ENOSYS || errno == EPERM)) {
                use_pwait2 = 0;
                continue;
            }
            if (n < 0 && errno == EINTR)
                return 0;
            if (n < 0)
                die("epoll_pwait2");
            return n;
        }
#endif
        if (tfd < 0) {
            tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
            if (tfd < 0)
                die("timerfd_create");
            struct epoll_event ev;
            memset(&ev, 0, sizeof ev);
            ev.events = EPOLLIN;
            ev.data.u32 = TIMER_TOKEN;
            if (epoll_ctl(epfd, EPOLL_CTL_ADD, tfd, &ev) < 0)
                die("epoll_ctl timerfd");
        }
        if (left == 0) {
            n = epoll_wait(epfd, events, MAX_EVENTS, 0);
        } else {
            if (deadline != tfd_armed) {
                struct itimerspec its;
                memset(&its, 0, sizeof its);
                its.it_value.tv_sec = (time_t)(deadline / NS_PER_S);
                its.it_value.tv_nsec = (long)(deadline % NS_PER_S);
                if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0)
                    die("timerfd_settime");
                tfd_armed = deadline;
            }
            n = epoll_wait(epfd, events, MAX_EVENTS, -1);
        }
        if (n < 0 && errno == EINTR)
            return 0;
        if (n < 0)
            die("epoll_wait");
        return n;
    }
}

/* --- connections -------------------------------------------------------------------------- */

static void ring_push(struct conn *c)
{
    if (c->in_ring)
        return;
    int cap = opt_max_connections;
    ring[(ring_head + ring_len) % cap] = (int)(c - conns);
    ring_len++;
    c->in_ring = 1;
}

static struct conn *pop_idle(void)
{
    while (ring_len > 0) {
        struct conn *c = &conns[ring[ring_head]];
        ring_head = (ring_head + 1) % opt_max_connections;
        ring_len--;
        c->in_ring = 0;
        if (c->state == C_IDLE)
            return c;
    }
    return NULL;
}

static void make_idle(struct conn *c)
{
    if (c->state == C_BUSY)
        nbusy--;
    c->state = C_IDLE;
    if (c->want_out)
        ep_set(c, EPOLL_CTL_MOD, 0);
    ring_push(c);
}

static void close_conn(struct conn *c)
{
    if (c->state == C_FREE)
        return;
    if (c->state == C_CONNECTING)
        nconnecting--;
    else if (c->state == C_BUSY)
        nbusy--;
    close(c->fd); /* also drops it from the epoll set */
    c->fd = -1;
    c->state = C_FREE;
    nopen--;
    free_slots[nfree++] = (int)(c - conns);
}

/* Start a non-blocking connect; returns 0, or -1 when it failed at once. */
static int open_conn(u64 now)
{
    if (nfree == 0)
        return -1;
    int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    n_connects++;
    if (connect(fd, (struct sockaddr *)&addr, addrlen) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    struct conn *c = &conns[free_slots[--nfree]];
    c->fd = fd;
    c->state = C_CONNECTING;
    c->since = now;
    c->uses = 0;
    nconnecting++;
    nopen++;
    if (nopen > peak_open)
        peak_open = nopen;
    ep_set(c, EPOLL_CTL_ADD, 1);
    return 0;
}

/* --- requests ----------------------------------------------------------------------------- */

static u64 queued(void) { return (u64)retry_len + (next_due - next_disp); }

static void retry_push(u64 req)
{
    if (retry_len == retry_cap) {
        /* cannot happen (one retry per busy connection), but never overflow */
        n_errors++;
        n_conn_err++;
        return;
    }
    retry[(retry_head + retry_len) % retry_cap] = req;
    retry_len++;
}

/* Fail the oldest queued request (its connection attempt failed). */
static void fail_queue_head(void)
{
    if (retry_len > 0) {
        retry_head = (retry_head + 1) % retry_cap;
        retry_len--;
    } else if (next_disp < next_due) {
        next_disp++;
    } else {
        return;
    }
    n_errors++;
    n_conn_err++;
}

static void request_failed(struct conn *c, int timed_out)
{
    if (!timed_out && !c->got_bytes && c->uses > 0) {
        /* A reused keep-alive connection closed before answering: the server dropped it
         * while idle, so the request was never handled. Send it again. (Bounded: every
         * retry closes one reused connection, and fresh ones are never retried.) */
        n_retries++;
        retry_push(c->req);
    } else {
        n_errors++;
        if (timed_out)
            n_timeouts++;
        else
            n_conn_err++;
    }
    close_conn(c);
}

static void connect_failed(struct conn *c)
{
    close_conn(c);
    /* The queue still waits for more connections than are being opened: the failure costs
     * one queued request, so a refused port cannot make us reconnect forever. */
    if (queued() > (u64)nconnecting)
        fail_queue_head();
}

static void try_write(struct conn *c)
{
    const struct blob *b = c->blob;
    while (c->woff < b->len) {
        ssize_t n = send(c->fd, b->data + c->woff, b->len - c->woff, MSG_NOSIGNAL);
        if (n > 0) {
            c->woff += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!c->want_out)
                ep_set(c, EPOLL_CTL_MOD, 1);
            return;
        }
        request_failed(c, 0);
        return;
    }
    if (c->want_out)
        ep_set(c, EPOLL_CTL_MOD, 0);
}

static void start_request(struct conn *c, u64 req)
{
    c->state = C_BUSY;
    nbusy++;
    c->req = req;
    c->sched = sched_ns(req);
    c->blob = &blobs[req % nblobs];
    c->woff = 0;
    c->got_bytes = 0;
    c->got_body = 0;
    c->ps = P_STATUS;
    c->llen = 0;
    if (!(rflags[req] & F_SENT)) {
        u64 now = now_ns();
        rflags[req] |= F_SENT;
        n_sent++;
        late[nlate++] = to_us(now > c->sched ? now - c->sched : 0);
    }
    try_write(c);
}

static void dispatch(u64 now)
{
    for (;;) {
        int from_retry = retry_len > 0;
        if (!from_retry && next_disp >= next_due)
            break;
        struct conn *c = pop_idle();
        if (!c)
            break;
        u64 req;
        if (from_retry) {
            req = retry[retry_head];
            retry_head = (retry_head + 1) % retry_cap;
            retry_len--;
        } else {
            req = next_disp++;
        }
        start_request(c, req);
    }
    while (queued() > (u64)nconnecting && nopen < opt_max_connections) {
        if (open_conn(now) < 0)
            fail_queue_head();
    }
}

/* Requests still queued timeout after their scheduled time are errors. */
static void expire_queued(u64 now)
{
    while (next_disp < next_due && sched_ns(next_disp) + timeout_ns <= now) {
        next_disp++;
        n_errors++;
        n_timeouts++;
    }
    while (retry_len > 0 && sched_ns(retry[retry_head]) + timeout_ns <= now) {
        retry_head = (retry_head + 1) % retry_cap;
        retry_len--;
        n_errors++;
        n_timeouts++;
    }
}

static void scan_timeouts(u64 now)
{
    for (int i = 0; i < opt_max_connections; i++) {
        struct conn *c = &conns[i];
        if (c->state == C_BUSY && c->sched + timeout_ns <= now)
            request_failed(c, 1);
        else if (c->state == C_CONNECTING && c->since + timeout_ns <= now)
            connect_failed(c);
    }
}

/* --- response parsing --------------------------------------------------------------------- */

static void complete(struct conn *c, u64 now)
{
    u64 end = opt_ttfb && c->got_body ? c->t_body : now;
    lat[nlat++] = to_us(end > c->sched ? end - c->sched : 0);
    n_done++;
    c->uses++;
    if (c->status < 200 || c->status > 299) {
        n_errors++;
        n_status_err++;
    }
}

static int parse_status(struct conn *c, const char *s, size_t len)
{
    if (len < 12 || memcmp(s, "HTTP/1.", 7) != 0 || s[7] < '0' || s[7] > '9' || s[8] != ' ')
        return LINE_BAD;
    int status = 0;
    for (int i = 9; i < 12; i++) {
        if (s[i] < '0' || s[i] > '9')
            return LINE_BAD;
        status = status * 10 + (s[i] - '0');
    }
    if (len > 12 && s[12] != ' ')
        return LINE_BAD;
    c->status = status;
    c->minor = s[7] - '0';
    c->chunked = c->has_cl = c->tok_close = c->tok_keepalive = 0;
    c->remaining = 0;
    c->ps = P_HEADER;
    return LINE_MORE;
}

static int parse_header(struct conn *c, const char *s, size_t len)
{
    const char *colon = memchr(s, ':', len);
    if (!colon || colon == s)
        return LINE_BAD;
    size_t nlen = (size_t)(colon - s);
    const char *v = colon + 1;
    size_t vlen = len - nlen - 1;
    while (vlen && (*v == ' ' || *v == '\t')) {
        v++;
        vlen--;
    }
    while (vlen && (v[vlen - 1] == ' ' || v[vlen - 1] == '\t'))
        vlen--;
    if (ieq(s, nlen, "content-length")) {
        u64 n = 0;
        if (vlen == 0)
            return LINE_BAD;
        for (size_t i = 0; i < vlen; i++) {
            if (v[i] < '0' || v[i] > '9' || n > (UINT64_MAX - 9) / 10)
                return LINE_BAD;
            n = n * 10 + (u64)(v[i] - '0');
        }
        if (c->has_cl && c->remaining != n)
            return LINE_BAD;
        c->has_cl = 1;
        c->remaining = n;
    } else if (ieq(s, nlen, "transfer-encoding")) {
        if (has_token(v, vlen, "chunked"))
            c->chunked = 1;
    } else if (ieq(s, nlen, "connection")) {
        if (has_token(v, vlen, "close"))
            c->tok_close = 1;
        if (has_token(v, vlen, "keep-alive"))
            c->tok_keepalive = 1;
    }
    return LINE_MORE;
}

static int end_of_head(struct conn *c)
{
    if (c->status >= 100 && c->status < 200) {
        if (c->status == 101)
            return LINE_BAD; /* no upgrades here */
        c->ps = P_STATUS;    /* interim response (100 Continue ...): the real one follows */
        return LINE_MORE;
    }
    c->close_after = c->tok_close || (c->minor == 0 && !c->tok_keepalive);
    if (c->blob->is_head || c->status == 204 || c->status == 304)
        return LINE_DONE;
    if (c->chunked) {
        c->ps = P_CHUNK_SIZE;
        return LINE_MORE;
    }
    if (c->has_cl) {
        if (c->remaining == 0)
            return LINE_DONE;
        c->ps = P_BODY_CL;
        return LINE_MORE;
    }
    c->ps = P_BODY_EOF; /* no framing: the body ends when the server closes */
    c->close_after = 1;
    return LINE_MORE;
}

static int parse_chunk_size(struct conn *c, const char *s, size_t len)
{
    size_t i = 0;
    u64 size = 0;
    while (i < len && (s[i] == ' ' || s[i] == '\t'))
        i++;
    size_t start = i;
    for (; i < len; i++) {
        int ch = lower((unsigned char)s[i]), d;
        if (ch >= '0' && ch <= '9')
            d = ch - '0';
        else if (ch >= 'a' && ch <= 'f')
            d = ch - 'a' + 10;
        else
            break;
        if (size >> 60)
            return LINE_BAD;
        size = size * 16 + (u64)d;
    }
    if (i == start)
        return LINE_BAD;
    while (i < len && (s[i] == ' ' || s[i] == '\t'))
        i++;
    if (i < len && s[i] != ';')
        return LINE_BAD; /* anything after the size must be an extension */
    if (size == 0) {
        c->ps = P_TRAILER;
    } else {
        c->ps = P_CHUNK_DATA;
        c->remaining = size;
    }
    return LINE_MORE;
}

static int on_line(struct conn *c, const char *s, size_t len)
{
    if (len && s[len - 1] == '\r')
        len--;
    switch (c->ps) {
    case P_STATUS:
        return len == 0 ? LINE_MORE : parse_status(c, s, len);
    case P_HEADER:
        return len == 0 ? end_of_head(c) : parse_header(c, s, len);
    case P_CHUNK_SIZE:
        return parse_chunk_size(c, s, len);
    case P_CHUNK_END:
        if (len != 0)
            return LINE_BAD;
        c->ps = P_CHUNK_SIZE;
        return LINE_MORE;
    case P_TRAILER:
        return len == 0 ? LINE_DONE : LINE_MORE;
    default:
        return LINE_BAD;
    }
}

static void mark_body(struct conn *c, u64 now)
{
    if (!c->got_body) {
        c->got_body = 1;
        c->t_body = now;
    }
}

static void protocol_error(struct conn *c)
{
    n_errors++;
    n_proto_err++;
    close_conn(c);
}

/* The connection is done with a response: reuse it, or close it. */
static void finish(struct conn *c, size_t leftover)
{
    if (leftover || c->close_after || c->woff < c->blob->len)
        close_conn(c); /* unsolicited bytes, server asked to close, or request half sent */
    else
        make_idle(c);
}

static void feed(struct conn *c, const char *p, size_t n, u64 now)
{
    c->got_bytes = 1;
    while (n > 0) {
        size_t take;
        switch (c->ps) {
        case P_BODY_CL:
        case P_CHUNK_DATA:
            mark_body(c, now);
            take = n < c->remaining ? n : (size_t)c->remaining;
            p += take;
            n -= take;
            c->remaining -= take;
            if (c->remaining == 0) {
                if (c->ps == P_BODY_CL) {
                    complete(c, now);
                    finish(c, n);
                    return;
                }
                c->ps = P_CHUNK_END;
            }
            break;
        case P_BODY_EOF:
            mark_body(c, now);
            return;
        default: {
            const char *nl = memchr(p, '\n', n);
            size_t seg = nl ? (size_t)(nl - p) + 1 : n;
            if (c->llen + seg > LINE_CAP) {
                protocol_error(c);
                return;
            }
            if (!nl) {
                memcpy(c->line + c->llen, p, seg);
                c->llen += seg;
                return;
            }
            int r;
            if (c->llen == 0) {
                r = on_line(c, p, seg - 1);
            } else {
                memcpy(c->line + c->llen, p, seg - 1);
                r = on_line(c, c->line, c->llen + seg - 1);
                c->llen = 0;
            }
            p += seg;
            n -= seg;
            if (r == LINE_BAD) {
                protocol_error(c);
                return;
            }
            if (r == LINE_DONE) {
                complete(c, now);
                finish(c, n);
                return;
            }
        }
        }
    }
}

static void on_readable(struct conn *c)
{
    ssize_t n = read(c->fd, rbuf, sizeof rbuf);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (c->state == C_IDLE) {
        close_conn(c); /* the server closed an idle connection (or sent stray bytes) */
        return;
    }
    if (n > 0) {
        feed(c, rbuf, (size_t)n, now_ns());
        return;
    }
    if (n == 0 && c->ps == P_BODY_EOF) {
        complete(c, now_ns());
        close_conn(c);
        return;
    }
    request_failed(c, 0);
}

static void on_event(struct conn *c, uint32_t ev)
{
    if (c->state == C_FREE)
        return; /* closed earlier in this batch */
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        if (err || (ev & (EPOLLERR | EPOLLHUP))) {
            connect_failed(c);
            return;
        }
        if (ev & EPOLLOUT) {
            nconnecting--;
            make_idle(c);
        }
        return;
    }
    if ((ev & EPOLLOUT) && c->state == C_BUSY && c->woff < c->blob->len) {
        try_write(c);
        if (c->state == C_FREE)
            return;
    }
    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        on_readable(c);
}

/* --- setup and output --------------------------------------------------------------------- */

static void load_requests(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        die(path);
    struct stat st;
    if (fstat(fileno(f), &st) < 0)
        die(path);
    size_t size = (size_t)st.st_size;
    char *data = xcalloc(size + 1, 1);
    if (size && fread(data, 1, size, f) != size)
        die(path);
    fclose(f);
    size_t cap = 16;
    blobs = xcalloc(cap, sizeof *blobs);
    size_t i = 0;
    while (i < size) {
        char *end = memchr(data + i, '\0', size - i);
        size_t len = end ? (size_t)(end - (data + i)) : size - i;
        if (len) {
            if (nblobs == cap) {
                cap *= 2;
                blobs = realloc(blobs, cap * sizeof *blobs);
                if (!blobs)
                    die("realloc");
            }
            blobs[nblobs].data = data + i;
            blobs[nblobs].len = len;
            blobs[nblobs].is_head = len >= 5 && memcmp(data + i, "HEAD ", 5) == 0;
            nblobs++;
        }
        i += len + 1;
    }
    if (nblobs == 0) {
        fprintf(stderr, "openloop: %s holds no requests\n", path);
        exit(2);
    }
}

static void resolve(void)
{
    struct addrinfo hints, *res;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(opt_host, opt_port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "openloop: %s:%s: %s\n", opt_host, opt_port, gai_strerror(rc));
        exit(2);
    }
    memcpy(&addr, res->ai_addr, res->ai_addrlen);
    addrlen = res->ai_addrlen;
    freeaddrinfo(res);
}

static void write_u32s(const char *path, const uint32_t *v, u64 n)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        die(path);
    unsigned char buf[4096];
    size_t used = 0;
    for (u64 i = 0; i < n; i++) {
        buf[used++] = (unsigned char)(v[i]);
        buf[used++] = (unsigned char)(v[i] >> 8);
        buf[used++] = (unsigned char)(v[i] >> 16);
        buf[used++] = (unsigned char)(v[i] >> 24);
        if (used == sizeof buf) {
            if (fwrite(buf, 1, used, f) != used)
                die(path);
            used = 0;
        }
    }
    if ((used && fwrite(buf, 1, used, f) != used) || fclose(f) != 0)
        die(path);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: openloop --port P --requests FILE --rate R (--count N | --duration S)\n"
            "                [--host H] [--mode full|ttfb] [--connections N]\n"
            "                [--max-connections M] [--timeout S]\n"
            "                [--latency-out FILE] [--lateness-out FILE]\n");
    exit(2);
}

static double parse_double(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end)
        usage();
    return v;
}

static void parse_args(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"host", required_argument, 0, 'h'},
        {"port", required_argument, 0, 'p'},
        {"requests", required_argument, 0, 'r'},
        {"rate", required_argument, 0, 'R'},
        {"count", required_argument, 0, 'n'},
        {"duration", required_argument, 0, 'd'},
        {"mode", required_argument, 0, 'm'},
        {"connections", required_argument, 0, 'c'},
        {"max-connections", required_argument, 0, 'M'},
        {"timeout", required_argument, 0, 't'},
        {"latency-out", required_argument, 0, 'L'},
        {"lateness-out", required_argument, 0, 'l'},
        {0, 0, 0, 0},
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'h': opt_host = optarg; break;
        case 'p': opt_port = optarg; break;
        case 'r': opt_requests = optarg; break;
        case 'R': opt_rate = parse_double(optarg); break;
        case 'n': opt_count = (long long)parse_double(optarg); break;
        case 'd': opt_duration = parse_double(optarg); break;
        case 'm':
            if (strcmp(optarg, "ttfb") == 0)
                opt_ttfb = 1;
            else if (strcmp(optarg, "full") == 0)
                opt_ttfb = 0;
            else
                usage();
            break;
        case 'c': opt_connections = (int)parse_double(optarg); break;
        case 'M': opt_max_connections = (int)parse_double(optarg); break;
        case 't': opt_timeout_s = parse_double(optarg); break;
        case 'L': opt_latency_out = optarg; break;
        case 'l': opt_lateness_out = optarg; break;
        default: usage();
        }
    }
    if (optind != argc || !opt_port || !opt_requests || !(opt_rate > 0) ||
        (opt_count < 0 && !(opt_duration >= 0)) || opt_max_connections < 1 ||
        opt_connections < 0 || !(opt_timeout_s > 0))
        usage();
    if (opt_connections > opt_max_connections)
        opt_connections = opt_max_connections;
    total = opt_count >= 0 ? (u64)opt_count : (u64)(opt_rate * opt_duration + 1e-9);
}

static void raise_nofile(void)
{
    struct rlimit rl;
    rlim_t want = (rlim_t)opt_max_connections + 32;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < want) {
        rl.rlim_cur = rl.rlim_max < want ? rl.rlim_max : want;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0); /* wake up on time, not up to 50 us late */
    raise_nofile();
    load_requests(opt_requests);
    resolve();

    timeout_ns = (u64)(opt_timeout_s * 1e9);
    conns = xcalloc((size_t)opt_max_connections, sizeof *conns);
    free_slots = xcalloc((size_t)opt_max_connections, sizeof *free_slots);
    ring = xcalloc((size_t)opt_max_connections, sizeof *ring);
    for (int i = opt_max_connections - 1; i >= 0; i--) {
        conns[i].fd = -1;
        free_slots[nfree++] = i;
    }
    retry_cap = opt_max_connections + 1;
    retry = xcalloc((size_t)retry_cap, sizeof *retry);
    rflags = xcalloc((size_t)total, 1);
    lat = xcalloc((size_t)total, sizeof *lat);
    late = xcalloc((size_t)total, sizeof *late);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
#ifdef HAVE_EPOLL_PWAIT2
    use_pwait2 = 1;
#endif
    struct epoll_event events[MAX_EVENTS];
    u64 start = now_ns();

    /* The initial pool, connected before t0 so the first requests pay no connect cost. */
    for (int i = 0; i < opt_connections; i++)
        open_conn(start);
    u64 connect_deadline = start + (timeout_ns < 5 * NS_PER_S ? timeout_ns : 5 * NS_PER_S);
    while (nconnecting > 0 && now_ns() < connect_deadline) {
        int n = wait_until(connect_deadline, events);
        for (int i = 0; i < n; i++)
            if (events[i].data.u32 != TIMER_TOKEN)
                on_event(&conns[events[i].data.u32], events[i].events);
    }
    for (int i = 0; i < opt_max_connections; i++)
        if (conns[i].state == C_CONNECTING)
            close_conn(&conns[i]);

    t0 = now_ns() + 1000000; /* 1 ms to settle */
    u64 next_scan = t0;
    for (;;) {
        u64 now = now_ns();
        while (next_due < total && sched_ns(next_due) <= now)
            next_due++;
        expire_queued(now);
        if (now >= next_scan) {
            scan_timeouts(now);
            next_scan = now + SCAN_INTERVAL_NS;
        }
        dispatch(now);
        if (next_due == total && queued() == 0 && nbusy == 0)
            break;
        u64 deadline = next_scan;
        if (next_due < total && sched_ns(next_due) < deadline)
            deadline = sched_ns(next_due);
        int n = wait_until(deadline, events);
        for (int i = 0; i < n; i++) {
            if (events[i].data.u32 == TIMER_TOKEN) {
                u64 expirations;
                if (read(tfd, &expirations, sizeof expirations) < 0 && errno != EAGAIN)
                    die("read timerfd");
                tfd_armed = 0;
                continue;
            }
            on_event(&conns[events[i].data.u32], events[i].events);
        }
    }
    u64 wall = now_ns() - t0;

    if (opt_latency_out)
        write_u32s(opt_latency_out, lat, nlat);
    if (opt_lateness_out)
        write_u32s(opt_lateness_out, late, nlate);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("RESULT sent=%llu done=%llu errors=%llu\n", (unsigned long long)n_sent,
           (unsigned long long)n_done, (unsigned long long)n_errors);
    printf("DETAIL status_errors=%llu connection_errors=%llu timeouts=%llu "
           "protocol_errors=%llu retries=%llu connects=%llu peak_connections=%d "
           "cpu_user_us=%lld cpu_sys_us=%lld wall_us=%llu wait=%s\n",
           (unsigned long long)n_status_err, (unsigned long long)n_conn_err,
           (unsigned long long)n_timeouts, (unsigned long long)n_proto_err,
           (unsigned long long)n_retries, (unsigned long long)n_connects, peak_open,
           (long long)ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec,
           (long long)ru.ru_stime.tv_sec * 1000000 + ru.ru_stime.tv_usec,
           (unsigned long long)(wall / 1000), use_pwait2 ? "epoll_pwait2" : "timerfd");
    return 0;
}
