/*
 * simd.h — what the CPU kernels (linear.c, attn.c) share on x86-64 with GCC
 * or Clang: the target attributes of their AVX-512 and AVX2 clones (picked
 * at run time; nothing here needs -march) and the one reduction order of a
 * 16-lane sum.  Private to engine/cpu/.
 */
#ifndef MKAD_ENGINE_CPU_SIMD_H
#define MKAD_ENGINE_CPU_SIMD_H

#if defined(__x86_64__) && defined(__GNUC__)
#define ENG_X86 1
#include <immintrin.h>
#define T512 __attribute__((target("avx512f,avx512vl,avx2,fma")))
#define T256 __attribute__((target("avx2,fma")))
/* the non-reference bf16 dot-product kernels (cpu_math fast, linear.c) */
#define TBF16 __attribute__((target("avx512f,avx512vl,avx512bw,avx512bf16,avx2,fma")))
#define INL __attribute__((always_inline)) inline

/* The sum of v's 16 lanes as reduce16_c (linear.c) adds them: lanes l+8,
 * then l+4, l+2, l+1 folded in. */
T512 static INL float reduce16_512(__m512 v)
{
    __m256 lo = _mm512_castps512_ps256(v);
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    __m256 s8 = _mm256_add_ps(lo, hi);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    return _mm_cvtss_f32(s1);
}
#endif

#endif /* MKAD_ENGINE_CPU_SIMD_H */
