// Shared by the matmul ops (lowbit.cpp) and the native decode step (decoder.cpp).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace qs {

using bf16 = c10::BFloat16;

enum class Isa { scalar, avx2, avx512, avx512bf16 };

// The instruction set the kernels run on this CPU (detected once).
Isa isa();

// Each computes out[m, n] (row stride ldo) = x[m, :] . W[n, :] for M rows and
// N output channels, in parallel over blocks of channels. Every channel's sum
// runs in the same order whatever M, the blocking or the thread count.

// W int8 [N, K] row-major with a bf16 scale per channel; x float32 [M, K].
void int8_matmul(const float* x, int64_t M, int64_t K, const int8_t* w, const bf16* scale,
                 bf16* out, int64_t ldo, int64_t N);

// W in torch's CPU int4 packing (N a multiple of 64), groups of gs inputs with
// bf16 (scale, offset) pairs [K / gs, N, 2]; x bf16 with row stride lda.
// Needs Isa::avx512bf16.
void int4_matmul(const bf16* x, int64_t lda, int64_t M, int64_t K, const uint8_t* w,
                 int64_t gs, const bf16* scales_and_zeros, bf16* out, int64_t ldo, int64_t N);

// W bf16 [N, K] row-major; x bf16 [M, K]; bias bf16 [N] or null, added
// before the result's rounding.
void bf16_matmul(const bf16* x, int64_t M, int64_t K, const bf16* w, const bf16* bias,
                 bf16* out, int64_t ldo, int64_t N);

}  // namespace qs
