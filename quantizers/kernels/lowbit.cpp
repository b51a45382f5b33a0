// Weight-only low-bit matmuls for few activation rows (decode), bf16 in and out.
//
// torch's CPU kernels for these layouts are tuned per CPU family and stream
// weights well on some CPUs only; these fuse dequantisation into a float32
// dot product, one output channel's sums in the same order whatever the row
// count, the output blocking or the thread count (a row's result does not
// depend on its batch). Compiled for a generic x86-64/ARM target: the AVX-512
// and AVX2 paths carry their own target attributes and are chosen at run time
// from the CPU's features, so one build serves every CPU.
#include "lowbit.h"

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>


namespace qs {
namespace {

Isa detect_isa() {
#ifdef QS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return __builtin_cpu_supports("avx512bf16") ? Isa::avx512bf16 : Isa::avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Isa::avx2;
  }
#endif
  return Isa::scalar;
}

const Isa kIsa = detect_isa();

// ---------------------------------------------------------------- int8
// out[m, n] = scale[n] * sum_k x[m, k] * w[n, k]; w int8 [N, K] row-major.
constexpr int kRows8 = 4;  // output channels per register block

void int8_scalar(const float* x, int64_t M, int64_t K, const int8_t* w, const bf16* scale,
                 bf16* out, int64_t ldo, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += xm[k] * static_cast<float>(row[k]);
      out[m * ldo + n] = bf16(acc * static_cast<float>(scale[n]));
    }
  }
}

#ifdef QS_X86
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
void int8_avx512(const float* x, int64_t M, int64_t K, const int8_t* w, const bf16* scale,
                 bf16* out, int64_t ldo, int64_t n0, int64_t n1) {
  const int64_t tail = K % 16;
  const __mmask16 tail_mask = static_cast<__mmask16>((1u << tail) - 1);
  for (int64_t n = n0; n < n1; n += kRows8) {
    const int rows = static_cast<int>(n1 - n < kRows8 ? n1 - n : kRows8);
    const int8_t* wr[kRows8];
    for (int r = 0; r < kRows8; ++r) wr[r] = w + (n + (r < rows ? r : 0)) * K;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int mt = static_cast<int>(M - m0 < 4 ? M - m0 : 4);
      __m512 acc[4][kRows8];
      for (int i = 0; i < 4; ++i)
        for (int r = 0; r < kRows8; ++r) acc[i][r] = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        __m512 wv[kRows8];
        if (m0 == 0 && (k & 63) == 0) {
          // The rows two blocks ahead: more loads in flight than the hardware
          // prefetcher keeps for four interleaved row streams (one block
          // ahead streamed a SmolLM2-sized pass 15% slower at one row).
          for (int r = 0; r < kRows8; ++r)
            _mm_prefetch(reinterpret_cast<const char*>(wr[r] + k + 2 * kRows8 * K), _MM_HINT_T0);
        }
        for (int r = 0; r < kRows8; ++r)
          wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[r] + k))));
        for (int i = 0; i < mt; ++i) {
          const __m512 xv = _mm512_loadu_ps(x + (m0 + i) * K + k);
          for (int r = 0; r < kRows8; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
        }
      }
      if (tail) {
        __m512 wv[kRows8];
        for (int r = 0; r < kRows8; ++r)
          wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
              _mm_maskz_loadu_epi8(tail_mask, wr[r] + k)));
        for (int i = 0; i < mt; ++i) {
          const __m512 xv = _mm512_maskz_loadu_ps(tail_mask, x + (m0 + i) * K + k);
          for (int r = 0; r < kRows8; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
        }
      }
      for (int i = 0; i < mt; ++i)
        for (int r = 0; r < rows; ++r)
          out[(m0 + i) * ldo + n + r] =
              bf16(_mm512_reduce_add_ps(acc[i][r]) * static_cast<float>(scale[n + r]));
    }
  }
}

__attribute__((target("avx2,fma")))
float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma")))
void int8_avx2(const float* x, int64_t M, int64_t K, const int8_t* w, const bf16* scale,
               bf16* out, int64_t ldo, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += kRows8) {
    const int rows = static_cast<int>(n1 - n < kRows8 ? n1 - n : kRows8);
    const int8_t* wr[kRows8];
    for (int r = 0; r < kRows8; ++r) wr[r] = w + (n + (r < rows ? r : 0)) * K;
    for (int64_t m0 = 0; m0 < M; m0 += 2) {
      const int mt = static_cast<int>(M - m0 < 2 ? M - m0 : 2);
      __m256 acc[2][kRows8];
      for (int i = 0; i < 2; ++i)
        for (int r = 0; r < kRows8; ++r) acc[i][r] = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) {
        __m256 wv[kRows8];
        for (int r = 0; r < kRows8; ++r)
          wv[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr[r] + k))));
        for (int i = 0; i < mt; ++i) {
          const __m256 xv = _mm256_loadu_ps(x + (m0 + i) * K + k);
          for (int r = 0; r < kRows8; ++r) acc[i][r] = _mm256_fmadd_ps(xv, wv[r], acc[i][r]);
        }
      }
      for (int i = 0; i < mt; ++i)
        for (int r = 0; r < rows; ++r) {
          float s = hsum256(acc[i][r]);
          for (int64_t kk = k; kk < K; ++kk)
            s += x[(m0 + i) * K + kk] * static_cast<float>(wr[r][kk]);
          out[(m0 + i) * ldo + n + r] = bf16(s * static_cast<float>(scale[n + r]));
        }
    }
  }
}
#endif

// ---------------------------------------------------------------- int4
// torch's CPU int4 layout (`_convert_weight_to_int4pack_for_cpu`): blocks of
// 64 output channels; in a block, for each k, 32 bytes whose low nibble is
// channel j's code and high nibble channel j + 32's. scales_and_zeros
// [K / g, N, 2] holds (scale, offset): w = (q - 8) * scale + offset, so
// sum_k x w = scale * sum_k x q + (offset - 8 scale) * sum_k x per group.
constexpr int64_t kBlock4 = 64;

#ifdef QS_X86
// With AVX512-BF16: a code q becomes the bf16 number 128 + q by OR-ing its
// nibble into 0x4300's mantissa (exact), and `vdpbf16ps` multiplies two k's
// at once in float32; sum_k x (128 + q) - 128 sum_k x is folded into the
// group's offset term. The unpack interleaves k and k + 1 per channel, which
// leaves the 64 channels of a block in lane order kLaneChannel.
#define QS_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

// Rows m0 .. m0 + MT - 1 of one 64-channel block, written to dst (bf16).
// Compile-time MT keeps the accumulators in registers. Every row's sums run
// in the same order whatever MT, so a row's result does not depend on M.
template <int MT>
QS_AVX512BF16 void int4_block(const bf16* x, int64_t lda, const float* xsum, int64_t m0,
                              int64_t K, const uint8_t* blk, int64_t gs, const bf16* sz,
                              int64_t N, int64_t nb, bf16* dst, int64_t ldo) {
  const int64_t groups = K / gs;
  const __m512i nibble = _mm512_set1_epi16(15);
  const __m512i bias_bits = _mm512_set1_epi16(0x4300);
  __m512 total[MT][4];
  for (int i = 0; i < MT; ++i)
    for (int c = 0; c < 4; ++c) total[i][c] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[MT][4];
    for (int i = 0; i < MT; ++i)
      for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 2) {
      const uint8_t* row = blk + k * 32;
      if (m0 == 0 && (k & 3) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(row + 1024), _MM_HINT_T0);
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
      const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32));
      const __m512i lo = _mm512_cvtepu8_epi16(_mm256_unpacklo_epi8(a, c1));
      const __m512i hi = _mm512_cvtepu8_epi16(_mm256_unpackhi_epi8(a, c1));
      // (v & 15) | 0x4300 in one ternary-logic op: imm 0xEA = (A & B) | C.
      __m512bh wv[4];
      wv[0] = (__m512bh)_mm512_ternarylogic_epi32(lo, nibble, bias_bits, 0xEA);
      wv[1] = (__m512bh)_mm512_ternarylogic_epi32(hi, nibble, bias_bits, 0xEA);
      wv[2] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(lo, 4), nibble,
                                                  bias_bits, 0xEA);
      wv[3] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(hi, 4), nibble,
                                                  bias_bits, 0xEA);
      for (int i = 0; i < MT; ++i) {
        uint32_t pair;
        std::memcpy(&pair, x + (m0 + i) * lda + k, sizeof(pair));
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
        for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], wv[c], xv);
      }
    }
    for (int i = 0; i < MT; ++i) {
      // Lane order -> channel order: each accumulator's halves hold 8
      // channels 16 apart (unpack works within 128-bit lanes).
      alignas(64) float natural[64];
      for (int c = 0; c < 4; ++c) {
        const __m512 sum = acc[i][c];
        const int base = (c >> 1) * 32 + (c & 1) * 8;
        _mm256_store_ps(natural + base, _mm512_castps512_ps256(sum));
        _mm256_store_ps(natural + base + 16, _mm512_extractf32x8_ps(sum, 1));
      }
      const __m512 xs = _mm512_set1_ps(xsum[(m0 + i) * groups + g]);
      for (int c = 0; c < 4; ++c) {
        const __m512i pairs = _mm512_loadu_si512(sz + (g * N + nb + c * 16) * 2);
        const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
        const __m512 o = _mm512_castsi512_ps(
            _mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
        const __m512 bias = _mm512_fnmadd_ps(_mm512_set1_ps(136.f), s, o);
        total[i][c] = _mm512_fmadd_ps(s, _mm512_load_ps(natural + c * 16), total[i][c]);
        total[i][c] = _mm512_fmadd_ps(bias, xs, total[i][c]);
      }
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int c = 0; c < 4; ++c) {
      alignas(64) float buf[16];
      _mm512_store_ps(buf, total[i][c]);
      for (int l = 0; l < 16; ++l) dst[(m0 + i) * ldo + c * 16 + l] = bf16(buf[l]);
    }
}

// One 64-channel block b of one packed part, every row, into dst (its
// column 0 being the block's first channel).
void int4_avx512bf16(const bf16* x, int64_t lda, const float* xsum, int64_t M, int64_t K,
                     const uint8_t* w, int64_t gs, const bf16* sz, int64_t N, int64_t b,
                     bf16* dst, int64_t ldo) {
  const uint8_t* blk = w + b * K * 32;
  const int64_t nb = b * kBlock4;
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) int4_block<4>(x, lda, xsum, m0, K, blk, gs, sz, N, nb, dst, ldo);
  switch (M - m0) {
    case 3: int4_block<3>(x, lda, xsum, m0, K, blk, gs, sz, N, nb, dst, ldo); break;
    case 2: int4_block<2>(x, lda, xsum, m0, K, blk, gs, sz, N, nb, dst, ldo); break;
    case 1: int4_block<1>(x, lda, xsum, m0, K, blk, gs, sz, N, nb, dst, ldo); break;
    default: break;
  }
}
#endif

// ---------------------------------------------------------------- bf16
// W bf16 [N, K] row-major: what a float model's projections are. With
// AVX512-BF16, `vdpbf16ps` multiplies 32 k's per instruction in float32;
// elsewhere bf16 widens to float32 by a shift.
constexpr int kRows16 = 4;  // output channels per register block

// The bias joins the float32 sum before its one rounding, as in F.linear.
inline float bias_at(const bf16* bias, int64_t n) {
  return bias == nullptr ? 0.f : static_cast<float>(bias[n]);
}

void bf16_scalar(const bf16* x, int64_t M, int64_t K, const bf16* w, const bf16* bias,
                 bf16* out, int64_t ldo, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k)
        acc += static_cast<float>(x[m * K + k]) * static_cast<float>(w[n * K + k]);
      out[m * ldo + n] = bf16(acc + bias_at(bias, n));
    }
}

#ifdef QS_X86
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
void bf16_avx512bf16(const bf16* x, int64_t M, int64_t K, const bf16* w, const bf16* bias,
                     bf16* out, int64_t ldo, int64_t n0, int64_t n1) {
  const int64_t tail = K % 32;
  const __mmask32 tail_mask = static_cast<__mmask32>((1ull << tail) - 1);
  for (int64_t n = n0; n < n1; n += kRows16) {
    const int rows = static_cast<int>(n1 - n < kRows16 ? n1 - n : kRows16);
    const bf16* wr[kRows16];
    for (int r = 0; r < kRows16; ++r) wr[r] = w + (n + (r < rows ? r : 0)) * K;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int mt = static_cast<int>(M - m0 < 4 ? M - m0 : 4);
      __m512 acc[4][kRows16];
      for (int i = 0; i < 4; ++i)
        for (int r = 0; r < kRows16; ++r) acc[i][r] = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
        if (m0 == 0 && (k & 31) == 0) {
          for (int r = 0; r < kRows16; ++r)
            _mm_prefetch(reinterpret_cast<const char*>(wr[r] + k + kRows16 * K), _MM_HINT_T0);
        }
        __m512bh wv[kRows16];
        for (int r = 0; r < kRows16; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(wr[r] + k);
        for (int i = 0; i < mt; ++i) {
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (m0 + i) * K + k);
          for (int r = 0; r < kRows16; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], wv[r], xv);
        }
      }
      if (tail) {
        __m512bh wv[kRows16];
        for (int r = 0; r < kRows16; ++r)
          wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(tail_mask, wr[r] + k);
        for (int i = 0; i < mt; ++i) {
          const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail_mask, x + (m0 + i) * K + k);
          for (int r = 0; r < kRows16; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], wv[r], xv);
        }
      }
      for (int i = 0; i < mt; ++i)
        for (int r = 0; r < rows; ++r)
          out[(m0 + i) * ldo + n + r] =
              bf16(_mm512_reduce_add_ps(acc[i][r]) + bias_at(bias, n + r));
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
void bf16_avx512(const bf16* x, int64_t M, int64_t K, const bf16* w, const bf16* bias,
                 bf16* out, int64_t ldo, int64_t n0, int64_t n1) {
  const int64_t body = K - K % 16;
  for (int64_t n = n0; n < n1; n += kRows16) {
    const int rows = static_cast<int>(n1 - n < kRows16 ? n1 - n : kRows16);
    for (int64_t m = 0; m < M; ++m) {
      __m512 acc[kRows16];
      for (int r = 0; r < kRows16; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t k = 0; k < body; k += 16) {
        const __m512 xv = widen16(x + m * K + k);
        for (int r = 0; r < rows; ++r)
          acc[r] = _mm512_fmadd_ps(xv, widen16(w + (n + r) * K + k), acc[r]);
      }
      for (int r = 0; r < rows; ++r) {
        float s = _mm512_reduce_add_ps(acc[r]);
        for (int64_t k = body; k < K; ++k)
          s += static_cast<float>(x[m * K + k]) * static_cast<float>(w[(n + r) * K + k]);
        out[m * ldo + n + r] = bf16(s + bias_at(bias, n + r));
      }
    }
  }
}

__attribute__((target("avx2,fma")))
__m256 widen8(const bf16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

__attribute__((target("avx2,fma")))
void bf16_avx2(const bf16* x, int64_t M, int64_t K, const bf16* w, const bf16* bias,
               bf16* out, int64_t ldo, int64_t n0, int64_t n1) {
  const int64_t body = K - K % 8;
  for (int64_t n = n0; n < n1; n += kRows16) {
    const int rows = static_cast<int>(n1 - n < kRows16 ? n1 - n : kRows16);
    for (int64_t m = 0; m < M; ++m) {
      __m256 acc[kRows16];
      for (int r = 0; r < kRows16; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t k = 0; k < body; k += 8) {
        const __m256 xv = widen8(x + m * K + k);
        for (int r = 0; r < rows; ++r)
          acc[r] = _mm256_fmadd_ps(xv, widen8(w + (n + r) * K + k), acc[r]);
      }
      for (int r = 0; r < rows; ++r) {
        float s = hsum256(acc[r]);
        for (int64_t k = body; k < K; ++k)
          s += static_cast<float>(x[m * K + k]) * static_cast<float>(w[(n + r) * K + k]);
        out[m * ldo + n + r] = bf16(s + bias_at(bias, n + r));
      }
    }
  }
}
#endif

}  // namespace

Isa isa() { return kIsa; }

void int8_matmul(const float* x, int64_t M, int64_t K, const int8_t* w, const bf16* scale,
                 bf16* out, int64_t ldo, int64_t N) {
  auto kernel = int8_scalar;
#ifdef QS_X86
  if (kIsa >= Isa::avx512) kernel = int8_avx512;
  else if (kIsa == Isa::avx2) kernel = int8_avx2;
#endif
  // Blocks of whole register blocks; ~16 KiB of weights per task at K = 576.
  const int64_t blocks = (N + kRows8 - 1) / kRows8;
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    kernel(x, M, K, w, scale, out, ldo, b0 * kRows8, std::min(N, b1 * kRows8));
  });
}

void int4_matmul(const bf16* x, int64_t lda, int64_t M, const Int4Part* parts, int count,
                 bf16* out, int64_t ldo, int64_t N) {
  TORCH_CHECK(kIsa == Isa::avx512bf16, "quantserve's int4 kernel needs AVX512-BF16");
  std::vector<std::vector<float>> xsums(count);
  for (int p = 0; p < count; ++p) {
    const Int4Part& part = parts[p];
    const int64_t groups = part.k / part.group_size;
    xsums[p].assign(M * groups, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < groups; ++g) {
        float s = 0.f;
        const bf16* row = x + m * lda + part.offset + g * part.group_size;
        for (int64_t k = 0; k < part.group_size; ++k) s += static_cast<float>(row[k]);
        xsums[p][m * groups + g] = s;
      }
  }
#ifdef QS_X86
  // Each block's parts in one task: the first part's output in place, each
  // later one's rounded to bf16 and added (as the module adds its two outputs).
  at::parallel_for(0, N / kBlock4, 1, [&](int64_t b0, int64_t b1) {
    std::vector<bf16> later(count > 1 ? M * kBlock4 : 0);
    for (int64_t b = b0; b < b1; ++b) {
      bf16* dst = out + b * kBlock4;
      for (int p = 0; p < count; ++p) {
        const Int4Part& part = parts[p];
        const bool first = p == 0;
        int4_avx512bf16(x + part.offset, lda, xsums[p].data(), M, part.k, part.packed,
                        part.group_size, part.scales_and_zeros, N, b,
                        first ? dst : later.data(), first ? ldo : kBlock4);
        if (first) continue;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t c = 0; c < kBlock4; ++c)
            dst[m * ldo + c] = bf16(static_cast<float>(dst[m * ldo + c]) +
                                    static_cast<float>(later[m * kBlock4 + c]));
      }
    }
  });
#endif
}

void bf16_matmul(const bf16* x, int64_t M, int64_t K, const bf16* w, const bf16* bias,
                 bf16* out, int64_t ldo, int64_t N) {
  auto kernel = bf16_scalar;
#ifdef QS_X86
  if (kIsa == Isa::avx512bf16) kernel = bf16_avx512bf16;
  else if (kIsa == Isa::avx512) kernel = bf16_avx512;
  else if (kIsa == Isa::avx2) kernel = bf16_avx2;
#endif
  const int64_t blocks = (N + kRows16 - 1) / kRows16;
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    kernel(x, M, K, w, bias, out, ldo, b0 * kRows16, std::min(N, b1 * kRows16));
  });
}

namespace {

std::vector<float> to_float(const at::Tensor& x) {
  const int64_t count = x.numel();
  std::vector<float> xf(count);
  const bf16* src = x.data_ptr<bf16>();
  for (int64_t i = 0; i < count; ++i) xf[i] = static_cast<float>(src[i]);
  return xf;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kChar &&
                  scale.scalar_type() == at::kBFloat16 && scale.numel() == w.size(0),
              "bf16 x, int8 w, bf16 scale [N]");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && scale.is_contiguous(), "contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const std::vector<float> xf = to_float(x);
  int8_matmul(xf.data(), M, K, w.data_ptr<int8_t>(), scale.data_ptr<bf16>(),
              out.data_ptr<bf16>(), N, N);
  return out;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, int64_t group_size,
                       const at::Tensor& scales_and_zeros) {
  // Rows may be strided (a column slice of a wider input), columns not.
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 &&
                  (x.stride(1) == 1 || x.size(1) <= 1) && x.stride(0) >= x.size(1),
              "x bf16 [M, K] with unit column stride");
  const int64_t M = x.size(0), K = x.size(1), lda = x.stride(0);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.dim() == 2 && packed.size(1) * 2 == K,
              "packed uint8 [N, K / 2] in the CPU int4 layout");
  const int64_t N = packed.size(0);
  TORCH_CHECK(N % kBlock4 == 0, "N must be a multiple of 64");
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && K % group_size == 0,
              "K must be a multiple of group_size");
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 &&
                  scales_and_zeros.is_contiguous() &&
                  scales_and_zeros.sizes() == at::IntArrayRef({K / group_size, N, 2}),
              "scales_and_zeros bf16 [K / g, N, 2]");
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const Int4Part part{packed.data_ptr<uint8_t>(), scales_and_zeros.data_ptr<bf16>(), 0, K,
                      group_size};
  int4_matmul(x.data_ptr<bf16>(), lda, M, &part, 1, out.data_ptr<bf16>(), N, N);
  return out;
}

int64_t isa_level() { return static_cast<int64_t>(kIsa); }

}  // namespace
}  // namespace qs

TORCH_LIBRARY(quantserve, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor packed, int group_size, Tensor scales_and_zeros) -> Tensor");
  m.def("isa_level() -> int", &qs::isa_level);
}

TORCH_LIBRARY_IMPL(quantserve, CPU, m) {
  m.impl("int8_linear", qs::int8_linear);
  m.impl("int4_linear", qs::int4_linear);
}
