/* Base64 (RFC 4648 §4: standard alphabet, padded) into a caller's buffer:
 * shared by _b64 (a str of it) and _jsonw (straight into a frame).  Each
 * including module has its own copy of the tables; b64enc_init fills them. */
#ifndef QTAP_B64ENC_H
#define QTAP_B64ENC_H
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

static const char B64_ALPHABET[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static char b64_pairs[4096][2]; /* 12 bits -> their two characters */
static int b64_have_ssse3;

/* QTAP_B64_SCALAR, or a CPU without SSSE3: the table loop only. */
static void b64enc_init(void) {
    __builtin_cpu_init();
    b64_have_ssse3 = getenv("QTAP_B64_SCALAR") == NULL && __builtin_cpu_supports("ssse3");
    for (int j = 0; j < 4096; j++) {
        b64_pairs[j][0] = B64_ALPHABET[j >> 6];
        b64_pairs[j][1] = B64_ALPHABET[j & 63];
    }
}

/* 12 bytes -> 16 characters per step, SSSE3 (W. Mula and D. Lemire, "Faster
 * Base64 Encoding and Decoding Using AVX2 Instructions", 2018, at 128 bits).
 * A transaction's JSON is ~2 KB: the table loop took ~4.5 instructions a
 * byte, this ~1.  Each step loads 16 bytes and uses 12, so it stops while 16
 * remain; the table loop does the rest.  Returns the input bytes consumed. */
__attribute__((target("ssse3")))
static Py_ssize_t b64_encode_ssse3(const unsigned char *s, Py_ssize_t n, unsigned char *d) {
    /* each 3 input bytes spread over a 32-bit lane as bytes 1,0,2,1 */
    const __m128i spread = _mm_setr_epi8(1, 0, 2, 1, 4, 3, 5, 4, 7, 6, 8, 7, 10, 9, 11, 10);
    /* '+' and '/' offsets sit at 11/12 of the table, A-Z at 13 */
    const __m128i offsets = _mm_setr_epi8('a' - 26, '0' - 52, '0' - 52, '0' - 52, '0' - 52, '0' - 52,
                                          '0' - 52, '0' - 52, '0' - 52, '0' - 52, '0' - 52, '+' - 62,
                                          '/' - 63, 'A', 0, 0);
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 12, d += 16) {
        __m128i in = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(s + i)), spread);
        /* the four 6-bit indices of each lane into its four bytes */
        __m128i hi = _mm_mulhi_epu16(_mm_and_si128(in, _mm_set1_epi32(0x0fc0fc00)), _mm_set1_epi32(0x04000040));
        __m128i lo = _mm_mullo_epi16(_mm_and_si128(in, _mm_set1_epi32(0x003f03f0)), _mm_set1_epi32(0x01000010));
        __m128i idx = _mm_or_si128(hi, lo);
        /* index -> which offset: 0-25 -> 13, 26-51 -> 0, 52-61 -> 1-10, 62 -> 11, 63 -> 12 */
        __m128i which = _mm_subs_epu8(idx, _mm_set1_epi8(51));
        which = _mm_or_si128(which, _mm_and_si128(_mm_cmpgt_epi8(_mm_set1_epi8(26), idx), _mm_set1_epi8(13)));
        _mm_storeu_si128((__m128i *)d, _mm_add_epi8(idx, _mm_shuffle_epi8(offsets, which)));
    }
    return i;
}

/* Writes exactly b64_size(n) characters to d. */
static inline Py_ssize_t b64_size(Py_ssize_t n) { return (n + 2) / 3 * 4; }

static void b64_encode(const unsigned char *s, Py_ssize_t n, unsigned char *d) {
    Py_ssize_t i = b64_have_ssse3 ? b64_encode_ssse3(s, n, d) : 0;
    d += i / 3 * 4;
    for (; i + 3 <= n; i += 3, d += 4) {
        unsigned v = (unsigned)s[i] << 16 | (unsigned)s[i + 1] << 8 | s[i + 2];
        memcpy(d, b64_pairs[v >> 12], 2);
        memcpy(d + 2, b64_pairs[v & 0xfff], 2);
    }
    if (i < n) {
        unsigned v = (unsigned)s[i] << 16 | (i + 1 < n ? (unsigned)s[i + 1] << 8 : 0);
        d[0] = B64_ALPHABET[v >> 18];
        d[1] = B64_ALPHABET[v >> 12 & 63];
        d[2] = i + 1 < n ? B64_ALPHABET[v >> 6 & 63] : '=';
        d[3] = '=';
    }
}
#endif
