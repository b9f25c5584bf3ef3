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
/* The widest steps this CPU has: 0 the table loop only, 1 SSSE3, 2 AVX-512 VBMI. */
enum { B64_SCALAR, B64_SSSE3, B64_AVX512VBMI };
static int b64_level;
static const char *const B64_LEVEL_NAMES[] = {"", "ssse3", "avx512vbmi"};

/* QTAP_B64_SIMD=none or =ssse3 caps the steps used: the paths other CPUs take, for tests. */
static void b64enc_init(void) {
    __builtin_cpu_init();
    const char *cap = getenv("QTAP_B64_SIMD");
    int most = cap == NULL || !*cap ? B64_AVX512VBMI : strcmp(cap, "ssse3") == 0 ? B64_SSSE3 : B64_SCALAR;
    b64_level = B64_SCALAR;
    if (most >= B64_SSSE3 && __builtin_cpu_supports("ssse3"))
        b64_level = B64_SSSE3;
    if (most >= B64_AVX512VBMI && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vbmi"))
        b64_level = B64_AVX512VBMI;
    for (int j = 0; j < 4096; j++) {
        b64_pairs[j][0] = B64_ALPHABET[j >> 6];
        b64_pairs[j][1] = B64_ALPHABET[j & 63];
    }
}

/* 48 bytes -> 64 characters per step, AVX-512 VBMI (W. Mula and D. Lemire,
 * "Base64 encoding and decoding at almost the speed of a memory copy", 2019):
 * a byte permute spreads each 3 bytes over a 32-bit lane as bytes 1,0,2,1,
 * a multishift pulls each 6-bit index into a byte, and a byte permute of the
 * 64-character alphabet by those indices (their low 6 bits) is the text.
 * ~0.1 instructions a byte against SSSE3's ~1.  Each step loads 64 bytes and
 * uses 48, so it stops while 64 remain.  Returns the input bytes consumed. */
__attribute__((target("avx512f,avx512bw,avx512vbmi")))
static Py_ssize_t b64_encode_avx512vbmi(const unsigned char *s, Py_ssize_t n, unsigned char *d) {
    const __m512i spread = _mm512_setr_epi32(
        0x01020001, 0x04050304, 0x07080607, 0x0a0b090a, 0x0d0e0c0d, 0x10110f10, 0x13141213, 0x16171516,
        0x191a1819, 0x1c1d1b1c, 0x1f201e1f, 0x22232122, 0x25262425, 0x28292728, 0x2b2c2a2b, 0x2e2f2d2e);
    /* per 64-bit lane, the bit offsets of its eight 6-bit indices (in the order they are written) */
    const __m512i shifts = _mm512_set1_epi64(0x3036242a1016040a);
    const __m512i alphabet = _mm512_loadu_si512((const void *)B64_ALPHABET);
    Py_ssize_t i = 0;
    for (; i + 64 <= n; i += 48, d += 64) {
        __m512i in = _mm512_permutexvar_epi8(spread, _mm512_loadu_si512((const void *)(s + i)));
        __m512i idx = _mm512_multishift_epi64_epi8(shifts, in);
        _mm512_storeu_si512((void *)d, _mm512_permutexvar_epi8(idx, alphabet));
    }
    return i;
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
    Py_ssize_t i = 0;
    if (b64_level >= B64_AVX512VBMI) { /* whole 3-byte groups: its output ends on a character boundary */
        i = b64_encode_avx512vbmi(s, n, d);
        d += i / 3 * 4;
    }
    if (b64_level >= B64_SSSE3) {
        Py_ssize_t k = b64_encode_ssse3(s + i, n - i, d);
        i += k;
        d += k / 3 * 4;
    }
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
