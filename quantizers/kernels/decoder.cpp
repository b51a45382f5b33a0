// One decode step of a Llama-family model as a single native call.
//
// At one row per sequence a step is ~30 small ops per layer around the
// matmuls; dispatched one by one from Python they cost more than the weights
// take to stream. `LlamaDecoder` holds the weights' tensors (no copies) and
// runs every layer of a step here: norms, rotary, the paged KV write,
// attention over each sequence's own keys, residuals and the head. Every
// elementwise step rounds to bf16 where the eager path's bf16 ops round, so
// the two agree closely (not bit for bit: matmul and attention sums run in
// other orders). Each row's numbers do not depend on the rest of its batch.
#include "lowbit.h"

#include <torch/custom_class.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace qs {
namespace {

enum Kind : int64_t { kBf16 = 0, kInt8 = 1, kInt4 = 2 };

inline bf16 round_bf16(float v) { return bf16(v); }
inline float f(bf16 v) { return static_cast<float>(v); }
// silu(g) = g / (1 + e^-g), in float32.
inline float silu_one(bf16 g) { return f(g) / (1.f + std::exp(-f(g))); }

// One projection: out columns [0, out_features) of what its kernel computes.
struct Linear {
  int64_t kind = kBf16;
  int64_t in_features = 0, out_features = 0;
  at::Tensor weight, scale;  // bf16 weight, or int8 codes and scales
  // int4: whole groups (main) and a partial last group (tail), see int4.py.
  at::Tensor packed, scales_and_zeros, tail_packed, tail_scales_and_zeros;
  int64_t group_size = 0, main_in = 0, tail_in = 0, padded_out = 0;
  at::Tensor bias;
};

// Several projections of one input whose outputs sit side by side, and the
// LoRA factors stacked over adapter slots (slot 0: none): a row of adapter s
// adds (x A[s]) B[s], A float32 [slots, K, R] and B [slots, R, width].
struct Slot {
  std::vector<Linear> parts;
  int64_t width = 0;
  at::Tensor lora_a, lora_b;
};

enum SlotId : int64_t { kQkv = 0, kO = 1, kGateUp = 2, kDown = 3, kSlots = 4 };

struct Layer {
  at::Tensor input_norm, post_norm;
  Slot slots[kSlots];
};

// Buffers of one step, reused by its layers' projections.
struct Scratch {
  std::vector<bf16> padded, main;
};

void rms_norm_scalar(const bf16* x, int64_t B, int64_t H, const bf16* weight, float eps,
                     bf16* out) {
  for (int64_t b = 0; b < B; ++b) {
    const bf16* row = x + b * H;
    float sq = 0.f;
    for (int64_t i = 0; i < H; ++i) sq += f(row[i]) * f(row[i]);
    const float inv = 1.f / std::sqrt(sq / static_cast<float>(H) + eps);
    for (int64_t i = 0; i < H; ++i)
      out[b * H + i] = round_bf16(f(round_bf16(f(row[i]) * inv)) * f(weight[i]));
  }
}

void run_linear(const Linear& lin, const bf16* x, int64_t B, bf16* out, int64_t ldo,
                Scratch& s) {
  const int64_t K = lin.in_features, N = lin.out_features;
  if (lin.kind == kBf16) {
    const bf16* bias = lin.bias.defined() ? lin.bias.data_ptr<bf16>() : nullptr;
    bf16_matmul(x, B, K, lin.weight.data_ptr<bf16>(), bias, out, ldo, N);
    return;
  }
  if (lin.kind == kInt8) {
    int8_matmul(x, K, B, K, lin.weight.data_ptr<int8_t>(), lin.scale.data_ptr<bf16>(),
                out, ldo, N);
  } else {
    // The int4 kernel reads whole kernel groups: a partial last group reads
    // zeros past the layer's inputs, as the module pads them.
    const int64_t width = lin.main_in + lin.tail_in;
    const bf16* xp = x;
    if (width != K) {
      s.padded.assign(B * width, bf16(0.f));
      for (int64_t b = 0; b < B; ++b)
        for (int64_t k = 0; k < K; ++k) s.padded[b * width + k] = x[b * K + k];
      xp = s.padded.data();
    }
    const int64_t P = lin.padded_out;
    Int4Part parts[2];
    int count = 0;
    if (lin.main_in)
      parts[count++] = {lin.packed.data_ptr<uint8_t>(), lin.scales_and_zeros.data_ptr<bf16>(), 0,
                        lin.main_in, lin.group_size};
    if (lin.tail_in)
      parts[count++] = {lin.tail_packed.data_ptr<uint8_t>(),
                        lin.tail_scales_and_zeros.data_ptr<bf16>(), lin.main_in, lin.tail_in,
                        lin.tail_in};
    if (P == N) {
      int4_matmul(xp, width, B, parts, count, out, ldo, N);
    } else {
      s.main.resize(B * P);
      int4_matmul(xp, width, B, parts, count, s.main.data(), P, P);
      for (int64_t b = 0; b < B; ++b)
        std::copy(s.main.data() + b * P, s.main.data() + b * P + N, out + b * ldo);
    }
  }
  // Low-bit modules add their bias to the rounded product (`_finish`).
  if (lin.bias.defined()) {
    const bf16* bias = lin.bias.data_ptr<bf16>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t n = 0; n < N; ++n)
        out[b * ldo + n] = round_bf16(f(out[b * ldo + n]) + f(bias[n]));
  }
}

// out[b] += bf16((x[b] A[s]) B[s]) for rows whose adapter slot s is not 0,
// rounded as the eager path's float32 delta cast to bf16 and added.
void add_lora(const Slot& slot, const bf16* x, int64_t B, const int64_t* row_slots, bf16* out) {
  const int64_t K = slot.lora_a.size(1), R = slot.lora_a.size(2), N = slot.width;
  const float* a = slot.lora_a.data_ptr<float>();
  const float* bm = slot.lora_b.data_ptr<float>();
  std::vector<float> low(R), delta(N);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = row_slots[b];
    if (s == 0) continue;
    TORCH_CHECK(s > 0 && s < slot.lora_a.size(0), "adapter slot out of range");
    std::fill(low.begin(), low.end(), 0.f);
    for (int64_t k = 0; k < K; ++k) {
      const float xk = f(x[b * K + k]);
      const float* ar = a + (s * K + k) * R;
      for (int64_t r = 0; r < R; ++r) low[r] += xk * ar[r];
    }
    std::fill(delta.begin(), delta.end(), 0.f);
    for (int64_t r = 0; r < R; ++r) {
      const float* br = bm + (s * R + r) * N;
      for (int64_t n = 0; n < N; ++n) delta[n] += low[r] * br[n];
    }
    for (int64_t n = 0; n < N; ++n)
      out[b * N + n] = round_bf16(f(out[b * N + n]) + f(round_bf16(delta[n])));
  }
}

void run_slot(const Slot& slot, const bf16* x, int64_t B, bf16* out, Scratch& s,
              const int64_t* row_slots) {
  int64_t column = 0;
  for (const Linear& lin : slot.parts) {
    run_linear(lin, x, B, out + column, slot.width, s);
    column += lin.out_features;
  }
  if (slot.lora_a.defined() && row_slots != nullptr) add_lora(slot, x, B, row_slots, out);
}

// softmax(q k^T * scale) v for one query head over the keys at `slots`;
// rows of k and v are kv_stride bf16 apart.
void attend_scalar(const bf16* q, int64_t hd, const bf16* k, const bf16* v, int64_t kv_stride,
                   const std::vector<int64_t>& slots, float scale, bf16* out,
                   std::vector<float>& scores) {
  const int64_t n = static_cast<int64_t>(slots.size());
  scores.resize(n);
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    const bf16* kr = k + slots[j] * kv_stride;
    float dot = 0.f;
    for (int64_t d = 0; d < hd; ++d) dot += f(q[d]) * scale * f(kr[d]);
    scores[j] = dot;
    top = dot > top ? dot : top;
  }
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = std::exp(scores[j] - top);
    sum += scores[j];
  }
  std::vector<float> acc(hd, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const bf16* vr = v + slots[j] * kv_stride;
    const float p = scores[j] / sum;
    for (int64_t d = 0; d < hd; ++d) acc[d] += p * f(vr[d]);
  }
  for (int64_t d = 0; d < hd; ++d) out[d] = round_bf16(acc[d]);
}

#ifdef QS_X86
constexpr int64_t kMaxChunks = 16;  // head_dim up to 256 in registers

QS_AVX512 void attend_avx512(const bf16* q, int64_t hd, const bf16* k, const bf16* v,
                             int64_t kv_stride, const std::vector<int64_t>& slots, float scale,
                             bf16* out, std::vector<float>& scores) {
  const int64_t n = static_cast<int64_t>(slots.size()), chunks = hd / 16;
  scores.resize(n);
  __m512 qv[kMaxChunks], acc[kMaxChunks];
  for (int64_t c = 0; c < chunks; ++c) {
    qv[c] = _mm512_mul_ps(widen16(q + 16 * c), _mm512_set1_ps(scale));
    acc[c] = _mm512_setzero_ps();
  }
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    const bf16* kr = k + slots[j] * kv_stride;
    __m512 dot = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) dot = _mm512_fmadd_ps(qv[c], widen16(kr + 16 * c), dot);
    scores[j] = _mm512_reduce_add_ps(dot);
    top = scores[j] > top ? scores[j] : top;
  }
  const __m512 peak = _mm512_set1_ps(top);
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 live = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, scores.data() + j), peak));
    _mm512_mask_storeu_ps(scores.data() + j, live, e);
    total = _mm512_mask_add_ps(total, live, total, e);
  }
  const float inv = 1.f / _mm512_reduce_add_ps(total);
  for (int64_t j = 0; j < n; ++j) {
    const bf16* vr = v + slots[j] * kv_stride;
    const __m512 p = _mm512_set1_ps(scores[j] * inv);
    for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(p, widen16(vr + 16 * c), acc[c]);
  }
  alignas(64) float buf[16];
  for (int64_t c = 0; c < chunks; ++c) {
    _mm512_store_ps(buf, acc[c]);
    for (int d = 0; d < 16; ++d) out[16 * c + d] = round_bf16(buf[d]);
  }
}

// Row `j` of a paged cache (base + slots[j] * stride) as float32, 16 C
// values; the row 32 keys ahead is fetched into L2 too: rows of a paged
// cache are strided, which the hardware prefetcher follows poorly, and 8
// keys ahead left batched steps waiting on them.
template <int C>
QS_AVX512 inline void cache_row(const bf16* base, int64_t stride,
                                const std::vector<int64_t>& slots, int64_t j, __m512* out) {
  constexpr int64_t ahead = 32;
  if (j + ahead < static_cast<int64_t>(slots.size()))
    for (int64_t b = 0; b < 32 * C; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(base + slots[j + ahead] * stride) + b,
                   _MM_HINT_T1);
  const bf16* row = base + slots[j] * stride;
  for (int c = 0; c < C; ++c) out[c] = widen16(row + 16 * c);
}

// attend_avx512 for G query heads sharing one KV head, head_dim 16 C: each
// key and value row is read and widened once for the G heads. Each head's
// arithmetic is attend_avx512's, in its order.
template <int G, int C>
QS_AVX512 void attend_group(const bf16* q, const bf16* k, const bf16* v, int64_t kv_stride,
                            const std::vector<int64_t>& slots, float scale, bf16* out,
                            std::vector<float>& scores) {
  constexpr int64_t hd = 16 * C;
  const int64_t n = static_cast<int64_t>(slots.size());
  scores.resize(G * n);
  __m512 qv[G][C], acc[G][C];
  float top[G];
  for (int g = 0; g < G; ++g) {
    top[g] = -std::numeric_limits<float>::infinity();
    for (int c = 0; c < C; ++c) {
      qv[g][c] = _mm512_mul_ps(widen16(q + g * hd + 16 * c), _mm512_set1_ps(scale));
      acc[g][c] = _mm512_setzero_ps();
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    __m512 kv[C];
    cache_row<C>(k, kv_stride, slots, j, kv);
    for (int g = 0; g < G; ++g) {
      __m512 dot = _mm512_setzero_ps();
      for (int c = 0; c < C; ++c) dot = _mm512_fmadd_ps(qv[g][c], kv[c], dot);
      const float score = _mm512_reduce_add_ps(dot);
      scores[g * n + j] = score;
      top[g] = score > top[g] ? score : top[g];
    }
  }
  float inv[G];
  for (int g = 0; g < G; ++g) {
    float* row = scores.data() + g * n;
    const __m512 peak = _mm512_set1_ps(top[g]);
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 live = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, row + j), peak));
      _mm512_mask_storeu_ps(row + j, live, e);
      total = _mm512_mask_add_ps(total, live, total, e);
    }
    inv[g] = 1.f / _mm512_reduce_add_ps(total);
  }
  for (int64_t j = 0; j < n; ++j) {
    __m512 vv[C];
    cache_row<C>(v, kv_stride, slots, j, vv);
    for (int g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * n + j] * inv[g]);
      for (int c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(p, vv[c], acc[g][c]);
    }
  }
  alignas(64) float buf[16];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) {
      _mm512_store_ps(buf, acc[g][c]);
      for (int d = 0; d < 16; ++d) out[g * hd + 16 * c + d] = round_bf16(buf[d]);
    }
}

// The widest attend_group that fits the registers for head_dim hd (0: none).
int group_width(int64_t hd) { return hd == 64 ? 4 : hd == 128 ? 2 : 0; }

#endif

// The elementwise steps between the matmuls, on 16 lanes where the CPU has
// AVX-512: every lane rounds as the scalar loops do (the norm's sum of squares
// runs in another order).
inline bf16 gated_one(bf16 gate, bf16 up) {
  return round_bf16(f(round_bf16(silu_one(gate))) * f(up));
}

#ifdef QS_X86
QS_AVX512 void rms_norm_avx512(const bf16* x, int64_t B, int64_t H, const bf16* weight,
                               float eps, bf16* out) {
  for (int64_t b = 0; b < B; ++b) {
    const bf16* row = x + b * H;
    __m512 sq = _mm512_setzero_ps();
    for (int64_t i = 0; i < H; i += 16) {
      const __m512 v = widen16(row + i);
      sq = _mm512_fmadd_ps(v, v, sq);
    }
    const __m512 inv = _mm512_set1_ps(
        1.f / std::sqrt(_mm512_reduce_add_ps(sq) / static_cast<float>(H) + eps));
    for (int64_t i = 0; i < H; i += 16)
      store16(out + b * H + i,
              _mm512_mul_ps(round16(_mm512_mul_ps(widen16(row + i), inv)), widen16(weight + i)));
  }
}

// Rotary embedding in place over `count` heads of hd = 32 j (a head's halves
// are whole 16-lane chunks).
QS_AVX512 void rotate_avx512(bf16* qk, int64_t count, int64_t hd, const bf16* cos,
                             const bf16* sin) {
  const int64_t chunks = hd / 16;
  for (int64_t head = 0; head < count; ++head) {
    bf16* x = qk + head * hd;
    __m512 v[kMaxChunks];
    for (int64_t c = 0; c < chunks; ++c) v[c] = widen16(x + 16 * c);
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512 a = round16(_mm512_mul_ps(v[c], widen16(cos + 16 * c)));
      const __m512 r = round16(_mm512_mul_ps(v[(c + chunks / 2) % chunks], widen16(sin + 16 * c)));
      store16(x + 16 * c, _mm512_add_ps(a, r));
    }
  }
}

// out = bf16(bf16(silu(gate)) * up).
QS_AVX512 void gated_avx512(const bf16* gate, const bf16* up, int64_t n, bf16* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 g = widen16(gate + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    const __m512 act = round16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
    store16(out + i, _mm512_mul_ps(act, widen16(up + i)));
  }
  for (; i < n; ++i) out[i] = gated_one(gate[i], up[i]);
}

// x = bf16(x + y).
QS_AVX512 void add_avx512(bf16* x, const bf16* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(x + i, _mm512_add_ps(widen16(x + i), widen16(y + i)));
  for (; i < n; ++i) x[i] = round_bf16(f(x[i]) + f(y[i]));
}
#endif

void rms_norm(const bf16* x, int64_t B, int64_t H, const bf16* weight, float eps, bf16* out) {
#ifdef QS_X86
  if (isa() >= Isa::avx512 && H % 16 == 0) return rms_norm_avx512(x, B, H, weight, eps, out);
#endif
  rms_norm_scalar(x, B, H, weight, eps, out);
}

// Rotary embedding in place: x = bf16(bf16(x cos) + bf16(rotate_half(x) sin)),
// sin carrying rotate_half's sign.
void rotate(bf16* qk, int64_t count, int64_t hd, const bf16* cos, const bf16* sin,
            std::vector<bf16>& row) {
#ifdef QS_X86
  if (isa() >= Isa::avx512 && hd % 32 == 0 && hd / 16 <= kMaxChunks)
    return rotate_avx512(qk, count, hd, cos, sin);
#endif
  const int64_t half = hd / 2;
  row.assign(qk, qk + count * hd);
  for (int64_t head = 0; head < count; ++head)
    for (int64_t d = 0; d < hd; ++d) {
      const int64_t i = head * hd + d;
      const float a = f(round_bf16(f(row[i]) * f(cos[d])));
      const float r = f(round_bf16(f(row[head * hd + (d + half) % hd]) * f(sin[d])));
      qk[i] = round_bf16(a + r);
    }
}

void gated(const bf16* gate, const bf16* up, int64_t n, bf16* out) {
#ifdef QS_X86
  if (isa() >= Isa::avx512) return gated_avx512(gate, up, n, out);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = gated_one(gate[i], up[i]);
}

void add_rounded(bf16* x, const bf16* y, int64_t n) {
#ifdef QS_X86
  if (isa() >= Isa::avx512) return add_avx512(x, y, n);
#endif
  for (int64_t i = 0; i < n; ++i) x[i] = round_bf16(f(x[i]) + f(y[i]));
}

void attend(const bf16* q, int64_t hd, const bf16* k, const bf16* v, int64_t kv_stride,
            const std::vector<int64_t>& slots, float scale, bf16* out,
            std::vector<float>& scores) {
#ifdef QS_X86
  if (isa() >= Isa::avx512 && hd % 16 == 0 && hd / 16 <= kMaxChunks)
    return attend_avx512(q, hd, k, v, kv_stride, slots, scale, out, scores);
#endif
  attend_scalar(q, hd, k, v, kv_stride, slots, scale, out, scores);
}

// `count` consecutive query heads (q and out hd apart) over one KV head.
void attend_heads(const bf16* q, int64_t count, int64_t hd, const bf16* k, const bf16* v,
                  int64_t kv_stride, const std::vector<int64_t>& slots, float scale, bf16* out,
                  std::vector<float>& scores) {
#ifdef QS_X86
  const int width = isa() >= Isa::avx512 ? group_width(hd) : 0;
  for (int64_t h = 0; width && h < count;) {
    const int64_t g = std::min<int64_t>(width, count - h);
    const bf16* qh = q + h * hd;
    bf16* oh = out + h * hd;
    if (hd == 64) {
      switch (g) {
        case 4: attend_group<4, 4>(qh, k, v, kv_stride, slots, scale, oh, scores); break;
        case 3: attend_group<3, 4>(qh, k, v, kv_stride, slots, scale, oh, scores); break;
        case 2: attend_group<2, 4>(qh, k, v, kv_stride, slots, scale, oh, scores); break;
        default: attend_group<1, 4>(qh, k, v, kv_stride, slots, scale, oh, scores); break;
      }
    } else if (g == 2) {
      attend_group<2, 8>(qh, k, v, kv_stride, slots, scale, oh, scores);
    } else {
      attend_group<1, 8>(qh, k, v, kv_stride, slots, scale, oh, scores);
    }
    h += g;
    if (h == count) return;
  }
#endif
  for (int64_t h = 0; h < count; ++h)
    attend(q + h * hd, hd, k, v, kv_stride, slots, scale, out + h * hd, scores);
}

Linear make_linear(int64_t kind, const std::vector<at::Tensor>& t,
                   const std::vector<int64_t>& meta) {
  // meta: in_features, out_features, has_bias, then for int4: group_size,
  // main_in, tail_in, padded_out.
  TORCH_CHECK(meta.size() >= 3, "linear meta: in_features, out_features, has_bias, ...");
  Linear lin;
  lin.kind = kind;
  lin.in_features = meta[0];
  lin.out_features = meta[1];
  size_t next = 0;
  auto take = [&](at::ScalarType dtype) {
    TORCH_CHECK(next < t.size(), "too few tensors for this linear");
    at::Tensor tensor = t[next++];
    TORCH_CHECK(tensor.device().is_cpu() && tensor.is_contiguous() &&
                    tensor.scalar_type() == dtype,
                "linear tensors must be contiguous CPU tensors of the kernel's dtype");
    return tensor;
  };
  if (kind == kBf16) {
    lin.weight = take(at::kBFloat16);
    TORCH_CHECK(lin.weight.sizes() == at::IntArrayRef({lin.out_features, lin.in_features}),
                "bf16 weight [N, K]");
  } else if (kind == kInt8) {
    lin.weight = take(at::kChar);
    lin.scale = take(at::kBFloat16);
    TORCH_CHECK(lin.weight.sizes() == at::IntArrayRef({lin.out_features, lin.in_features}) &&
                    lin.scale.numel() == lin.out_features,
                "int8 weight [N, K], scale [N]");
  } else if (kind == kInt4) {
    TORCH_CHECK(int4_runs(), "the int4 kernel needs AVX512-VNNI");
    TORCH_CHECK(meta.size() == 7, "int4 meta: ..., group_size, main_in, tail_in, padded_out");
    lin.group_size = meta[3];
    lin.main_in = meta[4];
    lin.tail_in = meta[5];
    lin.padded_out = meta[6];
    TORCH_CHECK(lin.padded_out % 64 == 0 && lin.padded_out >= lin.out_features &&
                    lin.main_in + lin.tail_in >= lin.in_features,
                "int4 padding");
    if (lin.main_in) {
      lin.packed = take(at::kByte);
      lin.scales_and_zeros = take(at::kBFloat16);
      TORCH_CHECK(lin.packed.sizes() == at::IntArrayRef({lin.padded_out, lin.main_in / 2}) &&
                      lin.scales_and_zeros.sizes() ==
                          at::IntArrayRef({lin.main_in / lin.group_size, lin.padded_out, 2}),
                  "int4 main part");
    }
    if (lin.tail_in) {
      lin.tail_packed = take(at::kByte);
      lin.tail_scales_and_zeros = take(at::kBFloat16);
      TORCH_CHECK(lin.tail_packed.sizes() == at::IntArrayRef({lin.padded_out, lin.tail_in / 2}) &&
                      lin.tail_scales_and_zeros.sizes() ==
                          at::IntArrayRef({1, lin.padded_out, 2}),
                  "int4 tail part");
    }
  } else {
    TORCH_CHECK(false, "unknown linear kind ", kind);
  }
  if (meta[2]) {
    lin.bias = take(at::kBFloat16);
    TORCH_CHECK(lin.bias.numel() == lin.out_features, "bias [N]");
  }
  TORCH_CHECK(next == t.size(), "too many tensors for this linear");
  return lin;
}

}  // namespace

class LlamaDecoder : public torch::CustomClassHolder {
 public:
  LlamaDecoder(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, double scaling,
               at::Tensor cos, at::Tensor signed_sin, at::Tensor final_norm)
      : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim),
        eps_(static_cast<float>(eps)), scaling_(static_cast<float>(scaling)),
        cos_(cos.contiguous()), sin_(signed_sin.contiguous()), final_norm_(final_norm) {
    TORCH_CHECK(heads % kv_heads == 0 && head_dim % 2 == 0, "heads, kv_heads, head_dim");
    TORCH_CHECK(cos_.scalar_type() == at::kBFloat16 && sin_.sizes() == cos_.sizes() &&
                    cos_.size(1) == head_dim,
                "bf16 rotary tables [positions, head_dim]");
    hidden_ = final_norm.numel();
  }

  void add_layer(at::Tensor input_norm, at::Tensor post_norm) {
    TORCH_CHECK(input_norm.numel() == hidden_ && post_norm.numel() == hidden_, "norm width");
    Layer layer;
    layer.input_norm = input_norm.contiguous();
    layer.post_norm = post_norm.contiguous();
    layers_.push_back(std::move(layer));
  }

  // Appends a projection to a slot of a layer (layer -1: the head).
  void add_linear(int64_t layer, int64_t slot, int64_t kind, std::vector<at::Tensor> tensors,
                  std::vector<int64_t> meta) {
    Slot* target = &slot_at(layer, slot);
    Linear lin = make_linear(kind, tensors, meta);
    target->width += lin.out_features;
    target->parts.push_back(std::move(lin));
  }

  // The LoRA stacks of a slot (layer -1: the head), read in place.
  void set_lora(int64_t layer, int64_t slot, at::Tensor a, at::Tensor b) {
    Slot& target = slot_at(layer, slot);
    TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
                    a.is_contiguous() && b.is_contiguous() && a.dim() == 3 && b.dim() == 3 &&
                    a.size(0) == b.size(0) && a.size(2) == b.size(1) && b.size(2) == target.width,
                "LoRA stacks: float32 A [slots, K, R], B [slots, R, width]");
    target.lora_a = a;
    target.lora_b = b;
  }

  void clear_lora() {
    for (Layer& layer : layers_)
      for (Slot& slot : layer.slots) slot.lora_a = slot.lora_b = at::Tensor();
    head_.lora_a = head_.lora_b = at::Tensor();
  }

  // x: the embedded tokens bf16 [B, hidden]; positions [B]; block_tables
  // [B, max_blocks] (each sequence's blocks, room for its new token); kv the
  // pool's storage [2, layers, slots, kv_heads, head_dim]; row_slots [B] each
  // row's adapter slot (empty: none). Returns float32 logits [B, vocab] and
  // leaves each token's keys and values in the pool.
  at::Tensor step(at::Tensor x, at::Tensor positions, at::Tensor block_tables, at::Tensor kv,
                  int64_t block_size, at::Tensor row_slots) {
    const int64_t B = x.size(0), H = hidden_, L = static_cast<int64_t>(layers_.size());
    const int64_t hd = head_dim_, group = heads_ / kv_heads_;
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(1) == H, "x");
    TORCH_CHECK(kv.scalar_type() == at::kBFloat16 && kv.is_contiguous() && kv.dim() == 5 &&
                    kv.size(0) == 2 && kv.size(1) == L && kv.size(3) == kv_heads_ &&
                    kv.size(4) == hd,
                "kv storage [2, layers, slots, kv_heads, head_dim] bf16");
    TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == B &&
                    block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 &&
                    block_tables.size(0) == B,
                "positions [B], block_tables [B, blocks] int64");
    TORCH_CHECK(head_.width > 0, "no head");
    at::Tensor adapters = row_slots.contiguous();
    TORCH_CHECK(adapters.numel() == 0 ||
                    (adapters.scalar_type() == at::kLong && adapters.numel() == B),
                "row_slots [B] int64 or empty");
    const int64_t* rs = adapters.numel() ? adapters.data_ptr<int64_t>() : nullptr;
    const int64_t slots_per_layer = kv.size(2);
    const int64_t* pos = positions.contiguous().data_ptr<int64_t>();
    at::Tensor tables = block_tables.contiguous();
    const int64_t* tab = tables.data_ptr<int64_t>();
    const int64_t max_blocks = tables.size(1);
    // Each sequence's key slots, its new token's last.
    std::vector<std::vector<int64_t>> keys(B);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(pos[b] >= 0 && pos[b] < cos_.size(0) && pos[b] / block_size < max_blocks,
                  "position past the rotary table or the block table");
      keys[b].resize(pos[b] + 1);
      for (int64_t j = 0; j <= pos[b]; ++j) {
        const int64_t slot = tab[b * max_blocks + j / block_size] * block_size + j % block_size;
        TORCH_CHECK(slot >= 0 && slot < slots_per_layer, "block table outside the pool");
        keys[b][j] = slot;
      }
    }
    const int64_t qk_width = (heads_ + kv_heads_) * hd;
    const int64_t kv_width = kv_heads_ * hd;
    std::vector<bf16> h(B * H), hidden(B * H), out(B * H);
    const bf16* xin = x.contiguous().data_ptr<bf16>();
    std::copy(xin, xin + B * H, hidden.begin());
    Scratch scratch;
    std::vector<bf16> qkv, attn(B * heads_ * hd), mlp, act, row;
    bf16* kv_base = kv.data_ptr<bf16>();
    const bf16* cos = cos_.data_ptr<bf16>();
    const bf16* sin = sin_.data_ptr<bf16>();
    for (int64_t l = 0; l < L; ++l) {
      const Layer& layer = layers_[l];
      const Slot& qkv_slot = layer.slots[kQkv];
      TORCH_CHECK(qkv_slot.width == qk_width + kv_width, "q/k/v width");
      rms_norm(hidden.data(), B, H, layer.input_norm.data_ptr<bf16>(), eps_, h.data());
      qkv.resize(B * qkv_slot.width);
      run_slot(qkv_slot, h.data(), B, qkv.data(), scratch, rs);
      bf16* k_layer = kv_base + (0 * L + l) * slots_per_layer * kv_width;
      bf16* v_layer = kv_base + (1 * L + l) * slots_per_layer * kv_width;
      for (int64_t b = 0; b < B; ++b) {
        bf16* qk = qkv.data() + b * qkv_slot.width;
        rotate(qk, heads_ + kv_heads_, hd, cos + pos[b] * hd, sin + pos[b] * hd, row);
        const int64_t slot = keys[b].back();
        std::copy(qk + heads_ * hd, qk + qk_width, k_layer + slot * kv_width);
        std::copy(qk + qk_width, qk + qk_width + kv_width, v_layer + slot * kv_width);
      }
      // A task per sequence and KV head reads its keys once for the group's
      // query heads; with too few such tasks to balance the threads, a task
      // per query head.
      const int64_t per_task = B * kv_heads_ >= 2 * at::get_num_threads() ? group : 1;
      at::parallel_for(0, B * heads_ / per_task, 1, [&](int64_t t0, int64_t t1) {
        std::vector<float> scores;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = t * per_task / heads_, head = t * per_task % heads_;
          const int64_t kh = head / group;
          attend_heads(qkv.data() + b * qkv_slot.width + head * hd, per_task, hd,
                       k_layer + kh * hd, v_layer + kh * hd, kv_width, keys[b], scaling_,
                       attn.data() + (b * heads_ + head) * hd, scores);
        }
      });
      run_slot(layer.slots[kO], attn.data(), B, out.data(), scratch, rs);
      add_rounded(hidden.data(), out.data(), B * H);
      rms_norm(hidden.data(), B, H, layer.post_norm.data_ptr<bf16>(), eps_, h.data());
      const Slot& gate_up = layer.slots[kGateUp];
      const int64_t inter = gate_up.width / 2;
      mlp.resize(B * gate_up.width);
      act.resize(B * inter);
      run_slot(gate_up, h.data(), B, mlp.data(), scratch, rs);
      for (int64_t b = 0; b < B; ++b) {
        const bf16* gate = mlp.data() + b * gate_up.width;
        gated(gate, gate + inter, inter, act.data() + b * inter);
      }
      run_slot(layer.slots[kDown], act.data(), B, out.data(), scratch, rs);
      add_rounded(hidden.data(), out.data(), B * H);
    }
    rms_norm(hidden.data(), B, H, final_norm_.data_ptr<bf16>(), eps_, h.data());
    std::vector<bf16> logits(B * head_.width);
    run_slot(head_, h.data(), B, logits.data(), scratch, rs);
    at::Tensor result = at::empty({B, head_.width}, x.options().dtype(at::kFloat));
    float* dst = result.data_ptr<float>();
    for (int64_t i = 0; i < B * head_.width; ++i) dst[i] = f(logits[i]);
    return result;
  }

 private:
  Slot& slot_at(int64_t layer, int64_t slot) {
    if (layer < 0) return head_;
    TORCH_CHECK(layer < static_cast<int64_t>(layers_.size()) && slot >= 0 && slot < kSlots,
                "no such layer or slot");
    return layers_[layer].slots[slot];
  }

  int64_t heads_, kv_heads_, head_dim_, hidden_;
  float eps_, scaling_;
  at::Tensor cos_, sin_, final_norm_;
  std::vector<Layer> layers_;
  Slot head_;
};

}  // namespace qs

TORCH_LIBRARY_FRAGMENT(quantserve, m) {
  m.class_<qs::LlamaDecoder>("LlamaDecoder")
      .def(torch::init<int64_t, int64_t, int64_t, double, double, at::Tensor, at::Tensor,
                       at::Tensor>())
      .def("add_layer", &qs::LlamaDecoder::add_layer)
      .def("add_linear", &qs::LlamaDecoder::add_linear)
      .def("set_lora", &qs::LlamaDecoder::set_lora)
      .def("clear_lora", &qs::LlamaDecoder::clear_lora)
      .def("step", &qs::LlamaDecoder::step);
}
