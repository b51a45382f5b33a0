// Shared by the matmul ops (lowbit.cpp) and the native decode step (decoder.cpp).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QS_X86 1
#endif

namespace qs {

using bf16 = c10::BFloat16;

enum class Isa { scalar, avx2, avx512, avx512bf16 };

// The instruction set the kernels run on this CPU (detected once).
Isa isa();

// Each computes out[m, n] (row stride ldo) = x[m, :] . W[n, :] for M rows and
// N output channels, in parallel over blocks of channels. Every channel's sum
// runs in the same order whatever M, the blocking or the thread count.

// W int8 [N, K] row-major with a bf16 scale per channel; x bf16 [M, K] with
// row stride lda, each row quantised to int16 with one scale (see lowbit.cpp).
void int8_matmul(const bf16* x, int64_t lda, int64_t M, int64_t K, const int8_t* w,
                 const bf16* scale, bf16* out, int64_t ldo, int64_t N);

// One int4 weight over inputs offset .. offset + k of x: torch's CPU int4
// packing (N a multiple of 64), groups of group_size inputs with bf16
// (scale, offset) pairs [k / group_size, N, 2].
struct Int4Part {
  const uint8_t* packed;
  const bf16* scales_and_zeros;
  int64_t offset, k, group_size;
};

// Whether this CPU runs int4_matmul (AVX512-VNNI).
bool int4_runs();

// The sum of `count` parts' products (each rounded to bf16 before it is
// added), in one pass over the output blocks; x bf16 with row stride lda,
// each part's columns quantised per row as int8_matmul's. Needs AVX512-VNNI.
void int4_matmul(const bf16* x, int64_t lda, int64_t M, const Int4Part* parts, int count,
                 bf16* out, int64_t ldo, int64_t N);

// W bf16 [N, K] row-major; x bf16 [M, K]; bias bf16 [N] or null, added
// before the result's rounding.
void bf16_matmul(const bf16* x, int64_t M, int64_t K, const bf16* w, const bf16* bias,
                 bf16* out, int64_t ldo, int64_t N);

#ifdef QS_X86
#define QS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// 16 bf16 values as float32 (exact: bf16 is float32's upper half).
QS_AVX512 inline __m512 widen16(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Each lane rounded to bf16 as c10::BFloat16's constructor rounds (to nearest
// even, NaN to 0x7FC0), left in float32.
QS_AVX512 inline __m512 round16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  up = _mm512_and_si512(up, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_castsi512_ps(_mm512_mask_mov_epi32(up, nan, _mm512_set1_epi32(0x7FC00000)));
}

// bf16(v) for 16 lanes into p.
QS_AVX512 inline void store16(bf16* p, __m512 v) {
  const __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(round16(v)), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bits));
}

// e^x to ~2e-7 relative error: x = n ln2 + r with |r| <= ln2 / 2, a degree-6
// Taylor polynomial for e^r, scaled by 2^n.
QS_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

}  // namespace qs
