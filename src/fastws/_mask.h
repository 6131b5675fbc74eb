/* XOR masking (RFC 6455 section 5.3) at memory speed.
 *
 * fastws_mask(buf, n, key, phase) XORs buf[0..n) in place with the 4-byte key,
 * starting at key byte `phase` (0..3), so a frame can be unmasked in pieces as
 * its bytes arrive; fastws_mask_copy(dst, src, n, key) writes src ^ key to dst
 * in the same single pass.  x86-64: SSE2 baseline (every x86-64 CPU), AVX2
 * chosen at run time; elsewhere a 64-bit word loop the compiler vectorises. */
#ifndef FASTWS_MASK_H
#define FASTWS_MASK_H

#include <stdint.h>
#include <string.h>
#include <stddef.h>

static inline void fastws_xor_tail(uint8_t *dst, const uint8_t *src, size_t n, const uint8_t *pattern)
{
    for (size_t i = 0; i < n; i++) dst[i] = src[i] ^ pattern[i & 3];
}

static void fastws_xor_words(uint8_t *dst, const uint8_t *src, size_t n, const uint8_t *pattern)
{
    uint64_t m;
    memcpy(&m, pattern, 4);
    memcpy(((uint8_t *)&m) + 4, pattern, 4);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t a;
        memcpy(&a, src + i, 8);
        a ^= m;
        memcpy(dst + i, &a, 8);
    }
    fastws_xor_tail(dst + i, src + i, n - i, pattern);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTWS_HAVE_X86 1

__attribute__((target("avx2")))
static void fastws_xor_avx2(uint8_t *dst, const uint8_t *src, size_t n, const uint8_t *pattern)
{
    uint32_t k;
    memcpy(&k, pattern, 4);
    const __m256i m = _mm256_set1_epi32((int)k);
    size_t i = 0;
    for (; i + 128 <= n; i += 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(src + i + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(src + i + 64));
        __m256i d = _mm256_loadu_si256((const __m256i *)(src + i + 96));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_xor_si256(a, m));
        _mm256_storeu_si256((__m256i *)(dst + i + 32), _mm256_xor_si256(b, m));
        _mm256_storeu_si256((__m256i *)(dst + i + 64), _mm256_xor_si256(c, m));
        _mm256_storeu_si256((__m256i *)(dst + i + 96), _mm256_xor_si256(d, m));
    }
    for (; i + 32 <= n; i += 32) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(src + i));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_xor_si256(a, m));
    }
    fastws_xor_words(dst + i, src + i, n - i, pattern);
}

static void fastws_xor_sse2(uint8_t *dst, const uint8_t *src, size_t n, const uint8_t *pattern)
{
    uint32_t k;
    memcpy(&k, pattern, 4);
    const __m128i m = _mm_set1_epi32((int)k);
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_storeu_si128((__m128i *)(dst + i), _mm_xor_si128(a, m));
        _mm_storeu_si128((__m128i *)(dst + i + 16), _mm_xor_si128(b, m));
        _mm_storeu_si128((__m128i *)(dst + i + 32), _mm_xor_si128(c, m));
        _mm_storeu_si128((__m128i *)(dst + i + 48), _mm_xor_si128(d, m));
    }
    for (; i + 16 <= n; i += 16) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        _mm_storeu_si128((__m128i *)(dst + i), _mm_xor_si128(a, m));
    }
    fastws_xor_words(dst + i, src + i, n - i, pattern);
}

static int fastws_cpu_avx2 = -1; /* -1: not probed yet */

static inline int fastws_have_avx2(void)
{
    if (fastws_cpu_avx2 < 0) {
        __builtin_cpu_init();
        fastws_cpu_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return fastws_cpu_avx2;
}
#endif

static inline void fastws_xor(uint8_t *dst, const uint8_t *src, size_t n, const uint8_t *key, unsigned phase)
{
    uint8_t pattern[4];
    for (int j = 0; j < 4; j++) pattern[j] = key[(phase + j) & 3];
    if (n < 16) { fastws_xor_tail(dst, src, n, pattern); return; }
#ifdef FASTWS_HAVE_X86
    if (n >= 256 && fastws_have_avx2()) fastws_xor_avx2(dst, src, n, pattern);
    else fastws_xor_sse2(dst, src, n, pattern);
#else
    fastws_xor_words(dst, src, n, pattern);
#endif
}

static inline void fastws_mask(uint8_t *p, size_t n, const uint8_t *key, unsigned phase)
{
    fastws_xor(p, p, n, key, phase);
}

static inline void fastws_mask_copy(uint8_t *dst, const uint8_t *src, size_t n, const uint8_t *key)
{
    fastws_xor(dst, src, n, key, 0);
}

#endif
