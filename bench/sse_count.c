/* The bench's SSE client: reads the agent's whole event stream, as `curl -N`
 * would, and counts it.
 *
 * It lives in C because it runs beside what it measures: the system-wide CPU
 * figure of a run includes it.  A Python reader doing the same cost ~4 µs an
 * event (~8 µs a request at rate10k, both ends traced), an eighth of the
 * figure, for work no user's `curl` does.  This one costs the socket reads and
 * a scan of each frame's last few hundred bytes.
 *
 * It counts `request.http_transaction` events per (request path, process id)
 * -- the wrk process is the client side, the nginx worker the server side --
 * and, for each, how long after the transaction ended it arrived:
 *
 *     delay = CLOCK_REALTIME when the bytes were read off the socket - the event's `ts`
 *
 * `ts` is the agent's wall-clock mapping of the kernel timestamp of the
 * transaction's last byte, so the delay covers the ring buffer, parsing,
 * reassembly, the broadcaster and the socket.  `ts` has millisecond resolution
 * (truncated): a delay is exact to within +1 ms.
 *
 *     sse_count PORT [PATH]
 *
 * Once the response's head has come, it writes one JSON line:
 * {"connected":true} or {"error":"..."}.  Then it answers commands read from
 * standard input, one a line, each with one JSON line on standard output:
 *
 *     s   {"events":N,"missed":N,"done":bool,"error":null|"...",
 *          "counts":[[path,pid,n],...],"last":[[path,CLOCK_MONOTONIC s],...]}
 *     d   {"delays":[[path,[ms,...]],...]}
 *
 * It exits when standard input closes.  A frame it cannot read stops the
 * reading and is reported as the error; the counts so far stay.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_KEYS 256          /* (path, pid) pairs counted */
#define MAX_PATHS 64          /* paths with delays and a last arrival */
#define MAX_PATH_BYTES 2048   /* a path as escaped in the JSON */
#define MAX_HEAD_BYTES 65536  /* the response's head */
#define MAX_FRAME_BYTES (256u << 20) /* a W2 frame is ~2 MB; a bigger one is a broken stream */
#define READ_BYTES (256u << 10)

static const char TX_HEAD[] = "event: request.http_transaction\ndata: ";
static const char DROPPED_HEAD[] = "event: system.dropped\ndata: ";
static const char PATH_KEY[] = "\"request_path\":\"";
static const char PATH_END[] = "\",\"request_url\":\"";
static const char PID_KEY[] = "\"process_pid\":";
static const char TS_KEY[] = ",\"ts\":\"";
static const char MISSED_KEY[] = "\"missed\":";
#define LIT(s) (s), (sizeof(s) - 1)

typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

typedef struct {
    char *path;
    size_t path_len;
    long long pid, n;
} key_t_;

typedef struct {
    char *path;
    size_t path_len;
    double last;   /* CLOCK_MONOTONIC seconds of its last transaction */
    double *ms;
    size_t n, cap;
} path_t;

static key_t_ keys[MAX_KEYS];
static size_t nkeys;
static path_t paths[MAX_PATHS];
static size_t npaths;
static long long events, missed;
static int done;
static char error[512];

/* ts seconds by their first 19 characters: consecutive events share them */
static char ts_head[19];
static int64_t ts_secs = -1;

static void fail(const char *fmt, const char *what, size_t n) {
    if (error[0])
        return;
    char shown[160];
    size_t k = 0;
    for (size_t i = 0; i < n && k < sizeof shown - 1; i++)
        shown[k++] = (what[i] >= 0x20 && what[i] < 0x7f) ? what[i] : '?';
    shown[k] = 0;
    snprintf(error, sizeof error, fmt, shown);
    done = 1;
}

static void reserve(buf_t *b, size_t more) {
    if (b->len + more <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 65536;
    while (cap < b->len + more)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        fprintf(stderr, "sse_count: out of memory\n");
        exit(3);
    }
    b->p = p;
    b->cap = cap;
}

static void append(buf_t *b, const char *s, size_t n) {
    reserve(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static double clock_s(clockid_t which) {
    struct timespec t;
    clock_gettime(which, &t);
    return (double)t.tv_sec + t.tv_nsec / 1e9;
}

static const char *rfind(const char *s, size_t n, const char *key, size_t k) {
    if (n < k)
        return NULL;
    for (const char *at = s + n - k;; at--) {
        if (*at == *key && memcmp(at, key, k) == 0)
            return at;
        if (at == s)
            return NULL;
    }
}

/* days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm) */
static int64_t days_from_civil(int64_t y, int m, int d) {
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static int digits(const char *s, int n, int *out) {
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return 0;
}

/* "2026-11-23T00:06:04.965Z" as ns since the epoch; -1 if not that shape */
static int64_t ts_ns(const char *s, size_t n) {
    if (n < 20 || s[n - 1] != 'Z')
        return -1;
    if (ts_secs < 0 || memcmp(ts_head, s, 19) != 0) {
        int y, mo, d, h, mi, se;
        if (s[4] != '-' || s[7] != '-' || s[10] != 'T' || s[13] != ':' || s[16] != ':' ||
            digits(s, 4, &y) || digits(s + 5, 2, &mo) || digits(s + 8, 2, &d) ||
            digits(s + 11, 2, &h) || digits(s + 14, 2, &mi) || digits(s + 17, 2, &se) ||
            mo < 1 || mo > 12 || d < 1 || d > 31)
            return -1;
        memcpy(ts_head, s, 19);
        ts_secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se;
    }
    int64_t frac = 0;
    size_t i = 19, places = 0;
    if (n > 20) {
        if (s[i++] != '.')
            return -1;
        for (; i < n - 1; i++, places++) {
            if (s[i] < '0' || s[i] > '9' || places >= 9)
                return -1;
            frac = frac * 10 + (s[i] - '0');
        }
    }
    for (; places < 9; places++)
        frac *= 10;
    return ts_secs * 1000000000 + frac;
}

static path_t *path_entry(const char *path, size_t n) {
    for (size_t i = 0; i < npaths; i++)
        if (paths[i].path_len == n && memcmp(paths[i].path, path, n) == 0)
            return &paths[i];
    if (npaths == MAX_PATHS)
        return NULL;
    path_t *e = &paths[npaths++];
    e->path = malloc(n ? n : 1);
    memcpy(e->path, path, n);
    e->path_len = n;
    return e;
}

static int count(const char *path, size_t n, long long pid) {
    for (size_t i = 0; i < nkeys; i++)
        if (keys[i].pid == pid && keys[i].path_len == n && memcmp(keys[i].path, path, n) == 0) {
            keys[i].n++;
            return 0;
        }
    if (nkeys == MAX_KEYS)
        return -1;
    key_t_ *k = &keys[nkeys++];
    k->path = malloc(n ? n : 1);
    memcpy(k->path, path, n);
    k->path_len = n;
    k->pid = pid;
    k->n = 1;
    return 0;
}

static void take_tx(const char *f, size_t n, int64_t now_ns, double now) {
    const char *ts = rfind(f, n, LIT(TS_KEY));
    const char *path = ts ? rfind(f, (size_t)(ts - f), LIT(PATH_KEY)) : NULL;
    const char *pid = path ? memmem(path, (size_t)(ts - path), LIT(PID_KEY)) : NULL;
    if (!pid) {
        fail("a transaction frame without request_path, process_pid or ts: %s", f, n < 200 ? n : 200);
        return;
    }
    path += sizeof PATH_KEY - 1;
    const char *path_end = memmem(path, (size_t)(f + n - path), LIT(PATH_END));
    if (!path_end || path_end - path > MAX_PATH_BYTES) {
        fail("a transaction frame whose request_path does not end as expected: %s", path, 120);
        return;
    }
    size_t path_len = (size_t)(path_end - path);
    long long pid_v = 0; /* not a number (null): 0 */
    for (const char *p = pid + sizeof PID_KEY - 1; p < ts && *p >= '0' && *p <= '9'; p++)
        pid_v = pid_v * 10 + (*p - '0');
    ts += sizeof TS_KEY - 1;
    const char *ts_end = memchr(ts, '"', (size_t)(f + n - ts));
    int64_t at = ts_end ? ts_ns(ts, (size_t)(ts_end - ts)) : -1;
    if (at < 0) {
        fail("a transaction frame whose ts is not an RFC 3339 UTC time: %s", ts, 40);
        return;
    }
    path_t *e = path_entry(path, path_len);
    if (!e || count(path, path_len, pid_v) < 0) {
        fail("more distinct paths or processes than this client counts: %s", path, path_len);
        return;
    }
    e->last = now;
    if (e->n == e->cap) {
        size_t cap = e->cap ? e->cap * 2 : 4096;
        double *ms = realloc(e->ms, cap * sizeof *ms);
        if (!ms) {
            fprintf(stderr, "sse_count: out of memory\n");
            exit(3);
        }
        e->ms = ms;
        e->cap = cap;
    }
    e->ms[e->n++] = (double)(now_ns - at) / 1e6;
}

static void take(const char *f, size_t n, int64_t now_ns, double now) {
    events++;
    if (n >= sizeof TX_HEAD - 1 && memcmp(f, LIT(TX_HEAD)) == 0) {
        take_tx(f, n, now_ns, now);
    } else if (n >= sizeof DROPPED_HEAD - 1 && memcmp(f, LIT(DROPPED_HEAD)) == 0) {
        const char *m = memmem(f, n, LIT(MISSED_KEY));
        if (!m) {
            fail("a system.dropped frame without missed: %s", f, n < 200 ? n : 200);
            return;
        }
        long long v = 0;
        for (const char *p = m + sizeof MISSED_KEY - 1; p < f + n && *p >= '0' && *p <= '9'; p++)
            v = v * 10 + (*p - '0');
        missed += v;
    }
}

/* -- the stream: the response's head, then chunked or plain bytes, then frames */

static buf_t head, frames;
static size_t scan;          /* where the next "\n\n" may start in frames */
static int in_body, chunked;
static long long chunk_left; /* > 0: data bytes to come; < 0: the CRLF after them; 0: a size line next */
static buf_t size_line;

/* The first "\n\n" in s[0:n].  Not memmem: glibc's, for a two-byte needle,
 * walks byte by byte, and was most of this client's time; a frame has a
 * few newlines, each found by a vectorized memchr. */
static char *blank_line(char *s, size_t n) {
    char *end = s + n;
    while (s < end) {
        char *nl = memchr(s, '\n', (size_t)(end - s));
        if (!nl || nl + 1 == end)
            return NULL;
        if (nl[1] == '\n')
            return nl;
        s = nl + 1;
    }
    return NULL;
}

static void frames_add(const char *p, size_t n, int64_t now_ns, double now) {
    append(&frames, p, n);
    size_t start = 0;
    for (;;) {
        char *end = blank_line(frames.p + scan, frames.len - scan);
        if (!end) {
            scan = frames.len ? frames.len - 1 : 0;
            if (scan < start)
                scan = start;
            break;
        }
        size_t at = (size_t)(end - frames.p);
        if (at > start)
            take(frames.p + start, at - start, now_ns, now);
        if (done)
            return;
        start = at + 2;
        scan = start;
    }
    if (start) {
        memmove(frames.p, frames.p + start, frames.len - start);
        frames.len -= start;
        scan -= start;
    }
    if (frames.len > MAX_FRAME_BYTES)
        fail("a frame over 256 MiB: %s", frames.p, 80);
}

static void dechunk(const char *p, size_t n, int64_t now_ns, double now) {
    while (n && !done) {
        if (chunk_left > 0) {
            size_t k = (size_t)chunk_left < n ? (size_t)chunk_left : n;
            frames_add(p, k, now_ns, now);
            p += k, n -= k, chunk_left -= (long long)k;
            if (chunk_left == 0)
                chunk_left = -2;
        } else if (chunk_left < 0) {
            size_t k = (size_t)-chunk_left < n ? (size_t)-chunk_left : n;
            p += k, n -= k, chunk_left += (long long)k;
        } else {
            const char *nl = memchr(p, '\n', n);
            size_t k = nl ? (size_t)(nl - p) + 1 : n;
            if (size_line.len + k > 1024) {
                fail("a chunk size line over 1 KiB: %s", size_line.p ? size_line.p : p, 40);
                return;
            }
            append(&size_line, p, k);
            p += k, n -= k;
            if (!nl)
                continue;
            char *endp;
            size_line.p[size_line.len - 1] = 0;
            long long size = strtoll(size_line.p, &endp, 16);
            size_line.len = 0;
            if (endp == size_line.p || size < 0) {
                fail("a chunk size that is not hexadecimal: %s", size_line.p, 40);
                return;
            }
            if (size == 0) {
                done = 1; /* the stream's last chunk */
                return;
            }
            chunk_left = size;
        }
    }
}

static void got(const char *p, size_t n) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    int64_t now_ns = (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
    double now = clock_s(CLOCK_MONOTONIC);
    if (in_body) {
        if (chunked)
            dechunk(p, n, now_ns, now);
        else
            frames_add(p, n, now_ns, now);
        return;
    }
    append(&head, p, n);
    char *end = memmem(head.p, head.len, "\r\n\r\n", 4);
    if (!end) {
        if (head.len > MAX_HEAD_BYTES)
            fail("a response head over 64 KiB: %s", head.p, 80);
        return;
    }
    size_t head_len = (size_t)(end - head.p) + 4;
    const char *eol = memmem(head.p, head_len, "\r\n", 2);
    if (!memmem(head.p, (size_t)(eol - head.p), " 200 ", 5) &&
        !(eol - head.p >= 4 && memcmp(eol - 4, " 200", 4) == 0)) {
        fail("SSE request refused: %s", head.p, (size_t)(eol - head.p));
        return;
    }
    for (char *c = head.p; c < head.p + head_len; c++)
        if (*c >= 'A' && *c <= 'Z')
            *c += 'a' - 'A';
    chunked = memmem(head.p, head_len, "transfer-encoding: chunked", 26) != NULL;
    in_body = 1;
    size_t rest = head.len - head_len;
    if (rest)
        got(head.p + head_len, rest);
}

/* -- answers */

static void out_str(const char *s, size_t n);

/* The first line: the harness waits for it before it starts a workload. */
static void announce(void) {
    static int said;
    if (said || !(in_body || done))
        return;
    said = 1;
    if (in_body) {
        printf("{\"connected\":true}\n");
    } else {
        printf("{\"error\":");
        out_str(error, strlen(error));
        printf("}\n");
    }
    fflush(stdout);
}

static void out_str(const char *s, size_t n) { /* as JSON: escape what a message may hold */
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

static void out_path(const char *p, size_t n) { /* already escaped as the agent wrote it */
    putchar('"');
    fwrite(p, 1, n, stdout);
    putchar('"');
}

static void status(void) {
    printf("{\"events\":%lld,\"missed\":%lld,\"done\":%s,\"error\":", events, missed, done ? "true" : "false");
    if (error[0])
        out_str(error, strlen(error));
    else
        printf("null");
    printf(",\"counts\":[");
    for (size_t i = 0; i < nkeys; i++) {
        printf(i ? ",[" : "[");
        out_path(keys[i].path, keys[i].path_len);
        printf(",%lld,%lld]", keys[i].pid, keys[i].n);
    }
    printf("],\"last\":[");
    for (size_t i = 0; i < npaths; i++) {
        printf(i ? ",[" : "[");
        out_path(paths[i].path, paths[i].path_len);
        printf(",%.6f]", paths[i].last);
    }
    printf("]}\n");
    fflush(stdout);
}

static void delays(void) {
    printf("{\"delays\":[");
    for (size_t i = 0; i < npaths; i++) {
        printf(i ? ",[" : "[");
        out_path(paths[i].path, paths[i].path_len);
        printf(",[");
        for (size_t j = 0; j < paths[i].n; j++)
            printf(j ? ",%.3f" : "%.3f", paths[i].ms[j]);
        printf("]]");
    }
    printf("]}\n");
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: sse_count PORT [PATH]\n");
        return 2;
    }
    const char *path = argc == 3 ? argv[2] : "/devtools/api/events?snapshot=false";
    int port = atoi(argv[1]);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    char req[4096];
    int len = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: text/event-stream\r\n\r\n",
                       path, port);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0 || len >= (int)sizeof req ||
        send(fd, req, (size_t)len, MSG_NOSIGNAL) != len) {
        snprintf(error, sizeof error, "cannot reach 127.0.0.1:%d: %s", port, strerror(errno));
        done = 1;
        announce();
    }
    static char in[READ_BYTES];
    char cmd[64];
    size_t cmd_len = 0;
    for (;;) {
        struct pollfd p[2] = {{.fd = 0, .events = POLLIN}, {.fd = done ? -1 : fd, .events = POLLIN}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        if (p[0].revents) { /* answered first: a busy stream must not starve the harness */
            ssize_t k = read(0, cmd + cmd_len, sizeof cmd - cmd_len);
            if (k <= 0)
                return 0;
            cmd_len += (size_t)k;
            char *nl;
            while ((nl = memchr(cmd, '\n', cmd_len))) {
                if (cmd[0] == 's')
                    status();
                else if (cmd[0] == 'd')
                    delays();
                cmd_len -= (size_t)(nl - cmd) + 1;
                memmove(cmd, nl + 1, cmd_len);
            }
            if (cmd_len == sizeof cmd)
                cmd_len = 0; /* a line too long for any command */
        }
        if (!done && p[1].revents) {
            ssize_t k = recv(fd, in, sizeof in, 0);
            if (k < 0 && errno == EINTR)
                continue;
            if (k <= 0) {
                if (!in_body)
                    fail("the connection closed before a response%s", "", 0);
                done = 1;
            } else {
                got(in, (size_t)k);
            }
            announce();
        }
    }
}
