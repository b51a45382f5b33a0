// Weight-only low-bit matmuls for few activation rows (decode), bf16 in and out.
//
// torch's CPU kernels for these layouts are tuned per CPU family and stream
// weights well on some CPUs only; these fuse dequantisation into the dot
// product (exact integer sums for int8, float32 for int4 and bf16), one output
// channel's sums in the same order whatever the row count, the output
// blocking or the thread count (a row's result does not depend on its batch).
// Compiled for a generic x86-64/ARM target: the AMX, AVX-512 and AVX2 paths
// carry their own target attributes and are chosen at run time from the CPU's
// features, so one build serves every CPU.
#include "lowbit.h"

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif


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

// The int8 kernels by preference; int8_paths() says which this CPU runs.
enum class Int8Path : int64_t { scalar = 0, avx2 = 1, vnni = 2, amx = 3 };

// ---------------------------------------------------------------- int8
// out[m, n] = scale[n] * sum_k x[m, k] * w[n, k]; w int8 [N, K] row-major.
//
// Each row of x is quantised to 15-bit integer codes with one float scale
// (int8_qmax), so the products are exact integer multiply-adds: AMX's
// `tdpbssd` multiplies a 16-channel x 64-k weight tile straight from memory
// against the codes' two int8 halves; `vpdpwssd` (AVX512-VNNI) and `vpmaddwd`
// (AVX2) take the codes whole. The rounding of x stays below the bf16
// rounding it already carries unless a row's peak is over ~64x its RMS.
// Integer sums are exact: a result depends on neither the row count, the
// blocking, the thread count nor the instruction set.
constexpr int kRows8 = 4;   // output channels per register block
constexpr int kStep8 = 32;   // k per VNNI step
constexpr int64_t kPadK = 64;  // rows of x are zero-padded to a multiple (an AMX tile)

// x's rows as int16 codes (row stride Kp) and their float scales.
struct Int8Input {
  std::vector<int16_t> q;
  std::vector<float> scale;
  int64_t Kp = 0;
};

// The largest code: 127 * 128, so a code splits into int8 halves 128 h + l
// (AMX); and sums of K products of |code| <= qmax and |w| <= 128 must fit an
// int32 accumulator lane, of which the 8-lane AVX2 kernel puts K / 8 in one.
int32_t int8_qmax(int64_t K) {
  const int64_t per_lane = (K + 7) / 8;
  return static_cast<int32_t>(std::min<int64_t>(127 * 128, ((int64_t{1} << 31) - 1) / (128 * per_lane)));
}

#ifdef QS_X86
// x[k .. k + 16) as float32, zeros past K.
QS_AVX512 inline __m512 widen_upto(const bf16* row, int64_t k, int64_t K) {
  const __mmask16 live = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
  const __m256i raw = _mm256_maskz_loadu_epi16(live, row + k);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// One row's codes, as the scalar loop below rounds them (to nearest even).
QS_AVX512 void quantize_row_avx512(const bf16* row, int64_t K, float qmax, int16_t* q,
                                   float* scale) {
  __m512 peak = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) peak = _mm512_max_ps(peak, _mm512_abs_ps(widen_upto(row, k, K)));
  const float amax = _mm512_reduce_max_ps(peak);
  if (amax == 0.f) return;
  const __m512 inv = _mm512_set1_ps(qmax / amax);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 live = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512i codes = _mm512_cvtps_epi32(_mm512_mul_ps(widen_upto(row, k, K), inv));
    _mm256_mask_storeu_epi16(q + k, live, _mm512_cvtsepi32_epi16(codes));
  }
  *scale = amax / qmax;
}
#endif

Int8Input quantize_rows(const bf16* x, int64_t lda, int64_t M, int64_t K) {
  Int8Input in;
  in.Kp = (K + kPadK - 1) / kPadK * kPadK;
  in.q.assign(M * in.Kp, 0);
  in.scale.assign(M, 0.f);
  const float qmax = static_cast<float>(int8_qmax(K));
  for (int64_t m = 0; m < M; ++m) {
    const bf16* row = x + m * lda;
    int16_t* q = in.q.data() + m * in.Kp;
#ifdef QS_X86
    if (kIsa >= Isa::avx512) {
      quantize_row_avx512(row, K, qmax, q, &in.scale[m]);
      continue;
    }
#endif
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(static_cast<float>(row[k])));
    if (amax == 0.f) continue;
    const float inv = qmax / amax;
    for (int64_t k = 0; k < K; ++k)
      q[k] = static_cast<int16_t>(std::nearbyint(static_cast<float>(row[k]) * inv));
    in.scale[m] = amax / qmax;
  }
  return in;
}

inline bf16 int8_result(int64_t total, float x_scale, bf16 w_scale) {
  return bf16(static_cast<float>(total) * x_scale * static_cast<float>(w_scale));
}

void int8_scalar(const Int8Input& in, int64_t M, int64_t K, const int8_t* w, const bf16* scale,
                 bf16* out, int64_t ldo, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* q = in.q.data() + m * in.Kp;
      int64_t total = 0;
      for (int64_t k = 0; k < K; ++k) total += int32_t{q[k]} * int32_t{row[k]};
      out[m * ldo + n] = int8_result(total, in.scale[m], scale[n]);
    }
  }
}

#ifdef QS_X86
#define QS_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

// Rows m0 .. m0 + MT - 1 against channels n .. n + rows - 1 (rows <= kRows8).
template <int MT>
QS_VNNI void int8_vnni_block(const Int8Input& in, int64_t m0, int64_t K, const int8_t* const* wr,
                             int rows, const bf16* scale, bf16* out, int64_t ldo, int64_t n) {
  __m512i acc[MT][kRows8];
  for (int i = 0; i < MT; ++i)
    for (int r = 0; r < kRows8; ++r) acc[i][r] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += kStep8) {
    // Past K the weights read as zeros (and x is zero-padded).
    const __mmask32 mask = K - k >= kStep8 ? ~__mmask32{0} : (__mmask32{1} << (K - k)) - 1;
    if (m0 == 0 && (k & 63) == 0) {
      // The rows two blocks ahead: more loads in flight than the hardware
      // prefetcher keeps for four interleaved row streams. Into L2: into
      // L1 the prefetches wait on its few fill buffers.
      for (int r = 0; r < kRows8; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(wr[r] + k + 2 * kRows8 * K), _MM_HINT_T1);
    }
    __m512i wv[kRows8];
    for (int r = 0; r < kRows8; ++r)
      wv[r] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, wr[r] + k));
    for (int i = 0; i < MT; ++i) {
      const __m512i xv = _mm512_loadu_si512(in.q.data() + (m0 + i) * in.Kp + k);
      for (int r = 0; r < kRows8; ++r) acc[i][r] = _mm512_dpwssd_epi32(acc[i][r], xv, wv[r]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int r = 0; r < rows; ++r) {
      const __m512i wide = _mm512_add_epi64(
          _mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc[i][r])),
          _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc[i][r], 1)));
      out[(m0 + i) * ldo + n + r] =
          int8_result(_mm512_reduce_add_epi64(wide), in.scale[m0 + i], scale[n + r]);
    }
}

QS_VNNI void int8_vnni(const Int8Input& in, int64_t M, int64_t K, const int8_t* w,
                       const bf16* scale, bf16* out, int64_t ldo, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += kRows8) {
    const int rows = static_cast<int>(n1 - n < kRows8 ? n1 - n : kRows8);
    const int8_t* wr[kRows8];
    for (int r = 0; r < kRows8; ++r) wr[r] = w + (n + (r < rows ? r : 0)) * K;
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) int8_vnni_block<4>(in, m0, K, wr, rows, scale, out, ldo, n);
    switch (M - m0) {
      case 3: int8_vnni_block<3>(in, m0, K, wr, rows, scale, out, ldo, n); break;
      case 2: int8_vnni_block<2>(in, m0, K, wr, rows, scale, out, ldo, n); break;
      case 1: int8_vnni_block<1>(in, m0, K, wr, rows, scale, out, ldo, n); break;
      default: break;
    }
  }
}

// ---- AMX: x's codes as B tiles, the int8 weights as A tiles read in place.
#define QS_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-int8")))
constexpr int64_t kTileK = 64;   // k per A tile row (bytes)
constexpr int64_t kTileN = 16;   // channels per A tile (rows)
constexpr int64_t kTileM = 16;   // rows of x per B tile (columns of 4 bytes)
constexpr int64_t kAmxMinRows = 4;   // int8: from here AMX beats VNNI
constexpr int64_t kAmxMinRows4 = 8;  // int4 (its B tiles are unpacked per call)

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Codes q = 128 h + l split into int8 h and l, laid out as B tiles: for each
// 16-row m-tile and 64-k chunk, 16 tile rows of 4 consecutive k's per x row.
struct AmxInput {
  std::vector<int8_t> hi, lo;
  int64_t chunks = 0;
  const int8_t* tile(const std::vector<int8_t>& half, int64_t t, int64_t c) const {
    return half.data() + (t * chunks + c) * kTileN * 64;
  }
};

QS_AMX AmxInput amx_input(const Int8Input& in, int64_t M, int64_t K) {
  AmxInput a;
  a.chunks = (K + kTileK - 1) / kTileK;
  const int64_t tiles = (M + kTileM - 1) / kTileM;
  a.hi.assign(tiles * a.chunks * kTileN * 64, 0);
  a.lo.assign(a.hi.size(), 0);
  // Dword j of a row's 64 codes (k = 4j .. 4j + 3) goes to tile row j.
  const __m512i rows = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(kTileM));
  for (int64_t m = 0; m < M; ++m) {
    const __m512i index = _mm512_add_epi32(rows, _mm512_set1_epi32(static_cast<int>(m % kTileM)));
    for (int64_t c = 0; c < a.chunks; ++c) {
      __m256i half[2][2];
      for (int part = 0; part < 2; ++part) {
        const __m512i q = _mm512_loadu_si512(in.q.data() + m * in.Kp + c * kTileK + part * 32);
        const __m512i h = _mm512_srai_epi16(_mm512_add_epi16(q, _mm512_set1_epi16(64)), 7);
        half[0][part] = _mm512_cvtepi16_epi8(h);
        half[1][part] = _mm512_cvtepi16_epi8(_mm512_sub_epi16(q, _mm512_slli_epi16(h, 7)));
      }
      int8_t* dst[2] = {a.hi.data(), a.lo.data()};
      for (int which = 0; which < 2; ++which)
        _mm512_i32scatter_epi32(dst[which] + ((m / kTileM) * a.chunks + c) * kTileN * 64, index,
                                _mm512_inserti64x4(_mm512_castsi256_si512(half[which][0]),
                                                   half[which][1], 1),
                                4);
    }
  }
  return a;
}

// float(128 h + l) for 8 of 16 lanes (exact in int64, then one rounding).
template <int Upper>
QS_AMX inline __m256 amx_total(__m512i h, __m512i l) {
  const __m512i h64 = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(h, Upper));
  const __m512i l64 = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(l, Upper));
  return _mm512_cvtepi64_ps(_mm512_add_epi64(_mm512_slli_epi64(h64, 7), l64));
}

// Channels n .. n + 31 (two A tiles; past N they read zeros) against the
// m-tile t of mt rows; tmm0-3 accumulate (h, l) x (tile 0, tile 1).
QS_AMX void int8_amx_pair(const Int8Input& in, const AmxInput& a, int64_t t, int64_t mt,
                          int64_t K, int64_t N, const int8_t* w, const bf16* scale, bf16* out,
                          int64_t ldo, int64_t n) {
  alignas(64) int8_t pad[2][kTileN * kTileK];
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t c = 0; c < a.chunks; ++c) {
    const int64_t k = c * kTileK;
    const int8_t* src[2];
    int64_t stride[2];
    for (int half = 0; half < 2; ++half) {
      const int64_t n0 = n + half * kTileN;
      if (n0 + kTileN <= N && k + kTileK <= K) {
        src[half] = w + n0 * K + k;
        stride[half] = K;
        continue;
      }
      // A partial tile: its rows and k's copied into zeros.
      std::memset(pad[half], 0, sizeof(pad[half]));
      for (int64_t r = 0; r < kTileN && n0 + r < N; ++r)
        std::memcpy(pad[half] + r * kTileK, w + (n0 + r) * K + k, std::min(kTileK, K - k));
      src[half] = pad[half];
      stride[half] = kTileK;
    }
    // The next pair's 32 rows at this k, into L2, on the m-tile that reads
    // the weights from memory: tile loads alone keep few lines in flight.
    for (int64_t r = n + 2 * kTileN; t == 0 && r < std::min(n + 4 * kTileN, N); ++r)
      _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k), _MM_HINT_T1);
    _tile_loadd(4, src[0], stride[0]);
    _tile_loadd(5, src[1], stride[1]);
    _tile_loadd(6, a.tile(a.hi, t, c), 64);
    _tile_loadd(7, a.tile(a.lo, t, c), 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  alignas(64) int32_t sums[4][kTileN * kTileM];
  _tile_stored(0, sums[0], 64);
  _tile_stored(1, sums[1], 64);
  _tile_stored(2, sums[2], 64);
  _tile_stored(3, sums[3], 64);
  // int8_result for 16 rows at once, rounding as it does.
  alignas(64) uint16_t staged[kTileM][2 * kTileN];
  const __mmask16 live = static_cast<__mmask16>((1u << mt) - 1);
  const __m512 x_scale = _mm512_maskz_loadu_ps(live, in.scale.data() + t * kTileM);
  for (int half = 0; half < 2; ++half)
    for (int64_t r = 0; r < kTileN && n + half * kTileN + r < N; ++r) {
      const int64_t ch = n + half * kTileN + r;
      const __m512i h = _mm512_loadu_si512(sums[2 * half] + r * kTileM);
      const __m512i l = _mm512_loadu_si512(sums[2 * half + 1] + r * kTileM);
      __m512 v = _mm512_insertf32x8(_mm512_castps256_ps512(amx_total<0>(h, l)),
                                    amx_total<1>(h, l), 1);
      v = _mm512_mul_ps(_mm512_mul_ps(v, x_scale),
                        _mm512_set1_ps(static_cast<float>(scale[ch])));
      const __m512i bits = _mm512_castps_si512(v);
      const __m512i bias = _mm512_add_epi32(
          _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)),
          _mm512_set1_epi32(0x7FFF));
      alignas(32) uint16_t rounded[kTileM];
      _mm256_store_si256(reinterpret_cast<__m256i*>(rounded),
                         _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16)));
      for (int64_t i = 0; i < mt; ++i) staged[i][half * kTileN + r] = rounded[i];
    }
  // Whole rows of the pair's 32 channels: a store per channel and row lands
  // each on its own page at a wide output (the head's) and costs a TLB miss.
  const int64_t width = std::min<int64_t>(2 * kTileN, N - n);
  for (int64_t i = 0; i < mt; ++i)
    std::memcpy(out + (t * kTileM + i) * ldo + n, staged[i], width * sizeof(uint16_t));
}

// Channels n0 .. n1 (n0 a multiple of 32), every row: each pair's weights
// are read from memory once, for the first m-tile, and from cache after.
QS_AMX void int8_amx(const Int8Input& in, const AmxInput& a, int64_t M, int64_t K, int64_t N,
                     const int8_t* w, const bf16* scale, bf16* out, int64_t ldo, int64_t n0,
                     int64_t n1) {
  // Every B and C tile 16 columns wide: columns past M are zeros in B.
  TileConfig config;
  for (int i = 0; i < 8; ++i) {
    config.rows[i] = kTileN;
    config.colsb[i] = 64;
  }
  _tile_loadconfig(&config);
  for (int64_t n = n0; n < n1; n += 2 * kTileN)
    for (int64_t t = 0; t * kTileM < M; ++t)
      int8_amx_pair(in, a, t, std::min(kTileM, M - t * kTileM), K, N, w, scale, out, ldo, n);
  _tile_release();
}

// Linux hands a process AMX's tile state only on request.
bool request_amx() {
#ifdef __linux__
  if (!__builtin_cpu_supports("amx-int8") || !__builtin_cpu_supports("avx512bw")) return false;
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
#else
  return false;
#endif
}

bool amx_permitted() {
  static const bool permitted = request_amx();
  return permitted;
}

__attribute__((target("avx2,fma")))
float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// `vpmaddwd` + `vpaddd` over 16 k's: the same integer sums without VNNI.
__attribute__((target("avx2,fma")))
void int8_avx2(const Int8Input& in, int64_t M, int64_t K, const int8_t* w, const bf16* scale,
               bf16* out, int64_t ldo, int64_t n0, int64_t n1) {
  const int64_t body = K - K % 16;
  for (int64_t n = n0; n < n1; n += kRows8) {
    const int rows = static_cast<int>(n1 - n < kRows8 ? n1 - n : kRows8);
    const int8_t* wr[kRows8];
    for (int r = 0; r < kRows8; ++r) wr[r] = w + (n + (r < rows ? r : 0)) * K;
    for (int64_t m0 = 0; m0 < M; m0 += 2) {
      const int mt = static_cast<int>(M - m0 < 2 ? M - m0 : 2);
      __m256i acc[2][kRows8];
      for (int i = 0; i < 2; ++i)
        for (int r = 0; r < kRows8; ++r) acc[i][r] = _mm256_setzero_si256();
      for (int64_t k = 0; k < body; k += 16) {
        __m256i wv[kRows8];
        for (int r = 0; r < kRows8; ++r)
          wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[r] + k)));
        for (int i = 0; i < mt; ++i) {
          const __m256i xv = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(in.q.data() + (m0 + i) * in.Kp + k));
          for (int r = 0; r < kRows8; ++r)
            acc[i][r] = _mm256_add_epi32(acc[i][r], _mm256_madd_epi16(xv, wv[r]));
        }
      }
      for (int i = 0; i < mt; ++i)
        for (int r = 0; r < rows; ++r) {
          alignas(32) int32_t lanes[8];
          _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[i][r]);
          const int16_t* q = in.q.data() + (m0 + i) * in.Kp;
          int64_t total = 0;
          for (int l = 0; l < 8; ++l) total += lanes[l];
          for (int64_t k = body; k < K; ++k) total += int32_t{q[k]} * int32_t{wr[r][k]};
          out[(m0 + i) * ldo + n + r] = int8_result(total, in.scale[m0 + i], scale[n + r]);
        }
    }
  }
}
#endif

// ---------------------------------------------------------------- int4
// torch's CPU int4 layout (`_convert_weight_to_int4pack_for_cpu`): blocks of
// 64 output channels; in a block, for each k, 32 bytes whose low nibble is
// channel j's code and high nibble channel j + 32's. scales_and_zeros
// [K / g, N, 2] holds (scale, offset): w = (q - 8) * scale + offset.
//
// As for int8, each row of x becomes integer codes c (quantize_rows) and a
// group's sums are exact: I = sum c (q - 8) and S = sum c. Per group and
// channel, t = fma(scale, I, t) then t = fma(offset, S, t), in that order on
// every path; the result is bf16(t * x_scale). AVX512-VNNI `vpdpwssd` takes
// the nibbles as int16 pairs (k, k + 1) per channel; AMX `tdpbssd` takes them
// as int8 B tiles built by interleaving four k's per channel. Both give the
// same bits, so a row's result depends neither on its batch nor on the path.
constexpr int64_t kBlock4 = 64;
constexpr int64_t kAhead4 = 4096;  // bytes the VNNI int4 kernel prefetches ahead

// x's rows for one part: codes, per-group code sums, and for AMX the codes'
// int8 halves (128 h + l) in rows padded to whole 16-row tiles.
struct Int4Input {
  Int8Input codes;
  std::vector<int32_t> sums;  // [M, groups]
  std::vector<int8_t> hi, lo;  // [tiles * 16, Kp], AMX only
  int64_t groups = 0;
};

Int4Input int4_input(const bf16* x, int64_t lda, int64_t M, int64_t K, int64_t gs, bool halves) {
  Int4Input in;
  in.codes = quantize_rows(x, lda, M, K);
  in.groups = K / gs;
  in.sums.assign(M * in.groups, 0);
  const int64_t Kp = in.codes.Kp;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < in.groups; ++g) {
      const int16_t* q = in.codes.q.data() + m * Kp + g * gs;
      in.sums[m * in.groups + g] = std::accumulate(q, q + gs, int32_t{0});
    }
  if (halves) {
    const int64_t rows = (M + 15) / 16 * 16;
    in.hi.assign(rows * Kp, 0);
    in.lo.assign(rows * Kp, 0);
    for (int64_t i = 0; i < M * Kp; ++i) {
      const int h = (in.codes.q[i] + 64) >> 7;
      in.hi[i] = static_cast<int8_t>(h);
      in.lo[i] = static_cast<int8_t>(in.codes.q[i] - 128 * h);
    }
  }
  return in;
}

#ifdef QS_X86
// The group's sums into the float totals of 16 channels (natural order):
// t = fma(scale, I, t); t = fma(offset, S, t).
QS_AVX512 inline __m512 int4_flush(__m512 total, __m512i sums, int32_t code_sum,
                                   const bf16* sz) {
  const __m512i pairs = _mm512_loadu_si512(sz);
  const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
  const __m512 offset = _mm512_castsi512_ps(
      _mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  const __m512i centred = _mm512_sub_epi32(sums, _mm512_set1_epi32(8 * code_sum));
  total = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(centred), total);
  return _mm512_fmadd_ps(offset, _mm512_set1_ps(static_cast<float>(code_sum)), total);
}

// bf16(total * x_scale) for 16 channels into dst.
QS_AVX512 inline void int4_store(__m512 total, float x_scale, bf16* dst) {
  store16(dst, _mm512_mul_ps(total, _mm512_set1_ps(x_scale)));
}

// The (scale, offset) pairs of channels nb .. nb + 63 in each of `groups`
// groups: 4 lines per group.
inline void prefetch_scales(const bf16* sz, int64_t groups, int64_t N, int64_t nb) {
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t l = 0; l < kBlock4 * 4; l += 64)
      _mm_prefetch(reinterpret_cast<const char*>(sz + (g * N + nb) * 2) + l, _MM_HINT_T0);
}

// Rows m0 .. m0 + MT - 1 of one 64-channel block on VNNI, written to dst.
// The unpack interleaves k and k + 1 per channel, which leaves the block's
// channels in lane order: accumulator c's halves hold 8 channels 16 apart.
template <int MT>
QS_VNNI void int4_block(const Int4Input& in, int64_t m0, int64_t K, const uint8_t* blk,
                        int64_t gs, const bf16* sz, int64_t N, int64_t nb, bf16* dst,
                        int64_t ldo) {
  const __m512i nibble = _mm512_set1_epi16(15);
  __m512 total[MT][4];
  for (int i = 0; i < MT; ++i)
    for (int c = 0; c < 4; ++c) total[i][c] = _mm512_setzero_ps();
  // The next block's scales, one group's 4 lines N channels apart: the
  // hardware prefetcher does not follow that stride, and a group's flush
  // would wait on them.
  if (m0 == 0 && nb + kBlock4 < N) prefetch_scales(sz, in.groups, N, nb + kBlock4);
  for (int64_t g = 0; g < in.groups; ++g) {
    __m512i acc[MT][4];
    for (int i = 0; i < MT; ++i)
      for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_setzero_si512();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 2) {
      const uint8_t* row = blk + k * 32;
      // Every line 4 KiB ahead (64 k's of this block, or the next block's,
      // which this thread takes next), into L2: at 1 KiB, every other line,
      // or into L1 (whose few fill buffers the prefetches then wait on),
      // decode steps read the weights well below the memory's rate.
      if (m0 == 0) _mm_prefetch(reinterpret_cast<const char*>(row + kAhead4), _MM_HINT_T1);
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
      const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32));
      const __m512i lo = _mm512_cvtepu8_epi16(_mm256_unpacklo_epi8(a, c1));
      const __m512i hi = _mm512_cvtepu8_epi16(_mm256_unpackhi_epi8(a, c1));
      const __m512i wq[4] = {_mm512_and_si512(lo, nibble), _mm512_and_si512(hi, nibble),
                             _mm512_srli_epi16(lo, 4), _mm512_srli_epi16(hi, 4)};
      for (int i = 0; i < MT; ++i) {
        int32_t pair;
        std::memcpy(&pair, in.codes.q.data() + (m0 + i) * in.codes.Kp + k, sizeof(pair));
        const __m512i xv = _mm512_set1_epi32(pair);
        for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_dpwssd_epi32(acc[i][c], xv, wq[c]);
      }
    }
    for (int i = 0; i < MT; ++i) {
      const int32_t code_sum = in.sums[(m0 + i) * in.groups + g];
      // Channels 16 c .. 16 c + 15 are the low or high 256-bit halves of an
      // accumulator pair, joined in registers (through memory, the 512-bit
      // reload of two 256-bit stores stalls on store forwarding).
      const __m512i natural[4] = {_mm512_shuffle_i64x2(acc[i][0], acc[i][1], 0x44),
                                  _mm512_shuffle_i64x2(acc[i][0], acc[i][1], 0xEE),
                                  _mm512_shuffle_i64x2(acc[i][2], acc[i][3], 0x44),
                                  _mm512_shuffle_i64x2(acc[i][2], acc[i][3], 0xEE)};
      for (int c = 0; c < 4; ++c)
        total[i][c] = int4_flush(total[i][c], natural[c], code_sum,
                                 sz + (g * N + nb + 16 * c) * 2);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int c = 0; c < 4; ++c)
      int4_store(total[i][c], in.codes.scale[m0 + i], dst + (m0 + i) * ldo + 16 * c);
}

QS_VNNI void int4_vnni(const Int4Input& in, int64_t M, int64_t K, const uint8_t* w,
                       int64_t gs, const bf16* sz, int64_t N, int64_t b, bf16* dst,
                       int64_t ldo) {
  const uint8_t* blk = w + b * K * 32;
  const int64_t nb = b * kBlock4;
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) int4_block<4>(in, m0, K, blk, gs, sz, N, nb, dst, ldo);
  switch (M - m0) {
    case 3: int4_block<3>(in, m0, K, blk, gs, sz, N, nb, dst, ldo); break;
    case 2: int4_block<2>(in, m0, K, blk, gs, sz, N, nb, dst, ldo); break;
    case 1: int4_block<1>(in, m0, K, blk, gs, sz, N, nb, dst, ldo); break;
    default: break;
  }
}

// Two B tiles (16 channels x T k's each, 4 k's per channel in a 32-bit
// column) for the block's low nibbles (channels 0-31) or high ones (32-63),
// k0 .. k0 + T - 1.
QS_AVX512 void int4_b_tiles(const uint8_t* blk, int64_t k0, int64_t T, bool high, int8_t* b0,
                            int8_t* b1) {
  const __m256i nibble = _mm256_set1_epi8(15);
  for (int64_t j = 0; j < T / 4; ++j) {
    __m256i r[4];
    for (int i = 0; i < 4; ++i) {
      const __m256i raw =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + (k0 + 4 * j + i) * 32));
      r[i] = _mm256_and_si256(high ? _mm256_srli_epi16(raw, 4) : raw, nibble);
    }
    // Per 128-bit lane (channels 0-15 | 16-31 of the half): k0,k1 then k2,k3
    // interleaved by byte, then the pairs by 16 bits: 4 channels x 4 k's each.
    const __m256i t0 = _mm256_unpacklo_epi8(r[0], r[1]), t1 = _mm256_unpackhi_epi8(r[0], r[1]);
    const __m256i t2 = _mm256_unpacklo_epi8(r[2], r[3]), t3 = _mm256_unpackhi_epi8(r[2], r[3]);
    const __m256i u0 = _mm256_unpacklo_epi16(t0, t2), u1 = _mm256_unpackhi_epi16(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi16(t1, t3), u3 = _mm256_unpackhi_epi16(t1, t3);
    auto* d0 = reinterpret_cast<__m256i*>(b0 + j * 64);
    auto* d1 = reinterpret_cast<__m256i*>(b1 + j * 64);
    _mm256_store_si256(d0, _mm256_permute2x128_si256(u0, u1, 0x20));
    _mm256_store_si256(d0 + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
    _mm256_store_si256(d1, _mm256_permute2x128_si256(u0, u1, 0x31));
    _mm256_store_si256(d1 + 1, _mm256_permute2x128_si256(u2, u3, 0x31));
  }
}

// One 64-channel block on AMX, every row: per half (32 channels) and 16-row
// tile, tmm0-3 accumulate (h, l) x (channels 0-15, 16-31) over a group.
QS_AMX void int4_amx(const Int4Input& in, int64_t M, int64_t K, const uint8_t* w, int64_t gs,
                     const bf16* sz, int64_t N, int64_t b, bf16* dst, int64_t ldo) {
  const uint8_t* blk = w + b * K * 32;
  const int64_t nb = b * kBlock4;
  const int64_t T = gs % 64 == 0 ? 64 : 32;
  const int64_t Kp = in.codes.Kp;
  TileConfig config;
  for (int i = 0; i < 8; ++i) config.rows[i] = 16;
  for (int i = 0; i < 4; ++i) config.colsb[i] = 64;          // C: 16 rows x 16 channels
  config.colsb[4] = config.colsb[5] = static_cast<uint16_t>(T);  // A: 16 rows x T k's
  config.rows[6] = config.rows[7] = static_cast<uint8_t>(T / 4);  // B: T / 4 x 16 channels
  config.colsb[6] = config.colsb[7] = 64;
  _tile_loadconfig(&config);
  alignas(64) int8_t btile[2][16 * 64];
  alignas(64) int32_t sums[4][16 * 16];
  for (int64_t t = 0; t * 16 < M; ++t) {
    const int64_t mt = std::min<int64_t>(16, M - t * 16);
    for (int half = 0; half < 2; ++half) {
      __m512 total[16][2];
      for (int64_t i = 0; i < 16; ++i) total[i][0] = total[i][1] = _mm512_setzero_ps();
      for (int64_t g = 0; g < in.groups; ++g) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t k = g * gs; k < (g + 1) * gs; k += T) {
          int4_b_tiles(blk, k, T, half == 1, btile[0], btile[1]);
          _tile_loadd(4, in.hi.data() + t * 16 * Kp + k, Kp);
          _tile_loadd(5, in.lo.data() + t * 16 * Kp + k, Kp);
          _tile_loadd(6, btile[0], 64);
          _tile_loadd(7, btile[1], 64);
          _tile_dpbssd(0, 4, 6);
          _tile_dpbssd(1, 5, 6);
          _tile_dpbssd(2, 4, 7);
          _tile_dpbssd(3, 5, 7);
        }
        _tile_stored(0, sums[0], 64);
        _tile_stored(1, sums[1], 64);
        _tile_stored(2, sums[2], 64);
        _tile_stored(3, sums[3], 64);
        for (int64_t i = 0; i < mt; ++i) {
          const int32_t code_sum = in.sums[(t * 16 + i) * in.groups + g];
          for (int c = 0; c < 2; ++c) {
            const __m512i whole = _mm512_add_epi32(
                _mm512_slli_epi32(_mm512_load_si512(sums[2 * c] + i * 16), 7),
                _mm512_load_si512(sums[2 * c + 1] + i * 16));
            total[i][c] = int4_flush(total[i][c], whole, code_sum,
                                     sz + (g * N + nb + half * 32 + 16 * c) * 2);
          }
        }
      }
      for (int64_t i = 0; i < mt; ++i)
        for (int c = 0; c < 2; ++c)
          int4_store(total[i][c], in.codes.scale[t * 16 + i],
                     dst + (t * 16 + i) * ldo + half * 32 + 16 * c);
    }
  }
  _tile_release();
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

namespace {

bool int8_runs(Int8Path path) {
#ifdef QS_X86
  switch (path) {
    case Int8Path::amx: return amx_permitted();
    case Int8Path::vnni: return kIsa >= Isa::avx512 && __builtin_cpu_supports("avx512vnni");
    case Int8Path::avx2: return kIsa >= Isa::avx2;
    default: break;
  }
#endif
  return path == Int8Path::scalar;
}

Int8Path best_int8_path() {
  for (Int8Path path : {Int8Path::amx, Int8Path::vnni, Int8Path::avx2})
    if (int8_runs(path)) return path;
  return Int8Path::scalar;
}

// Lowered only to compare the paths (tests, benchmarks).
std::atomic<int64_t> int8_path{static_cast<int64_t>(best_int8_path())};

}  // namespace

bool int4_runs() { return int8_runs(Int8Path::vnni); }

void int8_matmul(const bf16* x, int64_t lda, int64_t M, int64_t K, const int8_t* w,
                 const bf16* scale, bf16* out, int64_t ldo, int64_t N) {
  const Int8Input in = quantize_rows(x, lda, M, K);
  auto path = static_cast<Int8Path>(int8_path.load());
#ifdef QS_X86
  // AMX streams weights at ~60% of VNNI's rate (tile loads wait on memory),
  // so it pays from a few rows on; both give the same bits.
  if (path == Int8Path::amx && M < kAmxMinRows) path = Int8Path::vnni;
  if (path == Int8Path::amx) {
    const AmxInput a = amx_input(in, M, K);
    const int64_t pairs = (N + 2 * kTileN - 1) / (2 * kTileN);
    at::parallel_for(0, pairs, 2, [&](int64_t p0, int64_t p1) {
      int8_amx(in, a, M, K, N, w, scale, out, ldo, p0 * 2 * kTileN, std::min(N, p1 * 2 * kTileN));
    });
    return;
  }
#endif
  auto kernel = int8_scalar;
#ifdef QS_X86
  if (path == Int8Path::vnni) kernel = int8_vnni;
  else if (path == Int8Path::avx2) kernel = int8_avx2;
#endif
  // Blocks of whole register blocks; ~16 KiB of weights per task at K = 576.
  const int64_t blocks = (N + kRows8 - 1) / kRows8;
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    kernel(in, M, K, w, scale, out, ldo, b0 * kRows8, std::min(N, b1 * kRows8));
  });
}

void int4_matmul(const bf16* x, int64_t lda, int64_t M, const Int4Part* parts, int count,
                 bf16* out, int64_t ldo, int64_t N) {
  TORCH_CHECK(int4_runs(), "quantserve's int4 kernel needs AVX512-VNNI");
#ifdef QS_X86
  const auto path = static_cast<Int8Path>(int8_path.load());
  std::vector<Int4Input> inputs;
  std::vector<bool> amx(count);
  for (int p = 0; p < count; ++p) {
    const Int4Part& part = parts[p];
    // AMX's k steps are 64 or 32 (a group's whole multiple).
    amx[p] = path == Int8Path::amx && M >= kAmxMinRows4 && part.group_size % 32 == 0;
    inputs.push_back(int4_input(x + part.offset, lda, M, part.k, part.group_size, amx[p]));
  }
  // Each block's parts in one task: the first part's output in place, each
  // later one's rounded to bf16 and added (as the module adds its two outputs).
  at::parallel_for(0, N / kBlock4, 1, [&](int64_t b0, int64_t b1) {
    std::vector<bf16> later(count > 1 ? M * kBlock4 : 0);
    // The first block's lines, which the kernel's own prefetches (for what
    // comes next) never ask for.
    for (int p = 0; p < count; ++p) {
      const Int4Part& part = parts[p];
      const auto* first = reinterpret_cast<const char*>(part.packed + b0 * part.k * 32);
      for (int64_t l = 0; l < std::min(kAhead4, part.k * 32); l += 64)
        _mm_prefetch(first + l, _MM_HINT_T0);
      prefetch_scales(part.scales_and_zeros, part.k / part.group_size, N, b0 * kBlock4);
    }
    for (int64_t b = b0; b < b1; ++b) {
      bf16* dst = out + b * kBlock4;
      for (int p = 0; p < count; ++p) {
        const Int4Part& part = parts[p];
        const bool first = p == 0;
        auto kernel = amx[p] ? int4_amx : int4_vnni;
        kernel(inputs[p], M, part.k, part.packed, part.group_size, part.scales_and_zeros, N, b,
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

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kChar &&
                  scale.scalar_type() == at::kBFloat16 && scale.numel() == w.size(0),
              "bf16 x, int8 w, bf16 scale [N]");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && scale.is_contiguous(), "contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  int8_matmul(x.data_ptr<bf16>(), K, M, K, w.data_ptr<int8_t>(), scale.data_ptr<bf16>(),
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

// Selects the int8 kernel (an Int8Path) if this CPU runs it; returns the one in
// effect before, or -1 (nothing changed) if it cannot.
int64_t set_int8_path(int64_t path) {
  if (path < 0 || path > static_cast<int64_t>(Int8Path::amx) ||
      !int8_runs(static_cast<Int8Path>(path)))
    return -1;
  return int8_path.exchange(path);
}

int64_t best_int8() { return static_cast<int64_t>(best_int8_path()); }

}  // namespace
}  // namespace qs

TORCH_LIBRARY(quantserve, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor packed, int group_size, Tensor scales_and_zeros) -> Tensor");
  m.def("isa_level() -> int", &qs::isa_level);
  m.def("set_int8_path(int path) -> int", &qs::set_int8_path);
  m.def("best_int8_path() -> int", &qs::best_int8);
}

TORCH_LIBRARY_IMPL(quantserve, CPU, m) {
  m.impl("int8_linear", qs::int8_linear);
  m.impl("int4_linear", qs::int4_linear);
}
