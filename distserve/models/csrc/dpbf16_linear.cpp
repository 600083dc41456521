// bf16 linear layer (out = x @ w.T + bias) on AVX512-BF16 dot products, for CPUs that have
// them but no AMX tiles (AMD Zen 4 and later, Intel Cooper Lake).
//
// Why: the same as csrc/amx_linear.cpp. A decode step is a chain of matmuls with 1-64 rows;
// through torch each oneDNN call costs tens of microseconds before any arithmetic, and every
// weight must be streamed once per step. Here a call is one pass over the weight, each
// thread streaming its share in memory order.
//
// Weight layout: the one amx_pack makes (models/packed_linear.py), [N/32][K/32][16][32][2]:
// blocks of 32 output columns x 32 inputs, each as 16 rows of input pairs; a row is 32 columns
// x 2 inputs (128 bytes), i.e. two zmm vectors of 16 columns x (input 2p, input 2p + 1) - the
// operand VDPBF16PS multiplies pairwise with a broadcast pair of x and adds into 16 float32
// sums. A column block is kept in registers for up to kMaxRows rows of x (2 accumulators a
// row, 2 weight vectors, 1 broadcast: 27 of the 32 zmm registers at 12 rows; 14 would fit,
// but 12 splits 32 rows into 3 passes as well and leaves the compiler room).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#include "kernels.h"
#include "packed_blocks.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define DISTSERVE_HAVE_DPBF16 1
#endif

namespace {

constexpr int kMaxRows = 12;                          // rows of x per pass over a column block

#ifdef DISTSERVE_HAVE_DPBF16

// c[r][0:32] (float32) = a[r, 0:K] @ one column block of the weight, for r < R.
template <int R>
void column_block(const c10::BFloat16* a, int64_t lda, const char* w, int64_t kblocks, float* c) {
  // every loop over the rows fully unrolled: GCC then keeps the accumulators in registers
  // (without the pragmas it stored them to the stack after every product: 1.7x slower)
  __m512 acc0[R], acc1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    // no software prefetch: the hardware's alone streams faster. Prefetching every line 4
    // blocks ahead took 1.4-1.7x the time over SmolLM2's 121 matrices at one row, and 1.05-1.3x
    // over the 1.1 GB model's at 2, 8 and 32 rows (AMD Zen 4, 1 and 2 threads, in one process:
    // 29-30 of 30 and 15-16 of 16 paired runs faster without)
    const char* b = w + kb * kBlockBytes;
    const c10::BFloat16* ak = a + kb * kBlock;
    for (int p = 0; p < 16; ++p) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(b + p * 128);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(b + p * 128 + 64);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, ak + r * lda + 2 * p, sizeof(pair));
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
        acc0[r] = _mm512_dpbf16_ps(acc0[r], xb, w0);
        acc1[r] = _mm512_dpbf16_ps(acc1[r], xb, w1);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(c + r * kBlock, acc0[r]);
    _mm512_storeu_ps(c + r * kBlock + 16, acc1[r]);
  }
}

using ColumnBlockFn = void (*)(const c10::BFloat16*, int64_t, const char*, int64_t, float*);

template <int... R>
constexpr auto make_table(std::integer_sequence<int, R...>) {
  return std::array<ColumnBlockFn, sizeof...(R)>{&column_block<R + 1>...};
}
// kernels for 1..kMaxRows rows, fully unrolled over the rows
constexpr auto kColumnBlock = make_table(std::make_integer_sequence<int, kMaxRows>{});

void dpbf16_linear_impl(at::Tensor& out, const at::Tensor& x_in, const at::Tensor& packed,
                        const c10::BFloat16* bias) {
  const at::Tensor x = rows_apart(x_in);
  const int64_t m = x.size(0), n = out.size(1);
  const int64_t nblocks = packed.size(0), kblocks = packed.size(1);
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const char* wp = reinterpret_cast<const char*>(packed.data_ptr<c10::BFloat16>());
  auto* op = out.data_ptr<c10::BFloat16>();
  const int64_t lda = x.stride(0), ldo = out.stride(0);
  // row chunks of equal size (32 rows: 11, 11, 10), so no pass is a thin one
  const int64_t chunks = (m + kMaxRows - 1) / kMaxRows;
  const int64_t chunk = (m + chunks - 1) / chunks;
  const ColumnBlockFn kernel = kColumnBlock[chunk - 1], last = kColumnBlock[m - (chunks - 1) * chunk - 1];
  parallel_blocks(nblocks, [&](const auto& claim) {
    alignas(64) float c[kMaxRows * kBlock];
    // every row chunk passes a column block before the next one: the first pass reads it from
    // memory, the others from L2, and the reads from memory spread evenly over the call (a
    // 512 KB panel of column blocks per pass instead: 1.06x the time at 32 rows, SmolLM2's
    // and the 1.1 GB model's matrices)
    for (int64_t nb; claim(nb);) {
      const char* w = wp + nb * kblocks * kBlockBytes;
      const int64_t n0 = nb * kBlock;
      for (int64_t m0 = 0; m0 < m; m0 += chunk) {
        const int64_t rows = std::min(chunk, m - m0);
        (rows == chunk ? kernel : last)(xp + m0 * lda, lda, w, kblocks, c);
        store_rows_bf16(c, kBlock, rows, std::min(kBlock, n - n0), bias ? bias + n0 : nullptr,
                        op + m0 * ldo + n0, ldo);
      }
    }
  });
}

#endif  // DISTSERVE_HAVE_DPBF16

}  // namespace

namespace distserve {  // entry points, also called by decode_layers.cpp

bool dpbf16_available() {
#ifdef DISTSERVE_HAVE_DPBF16
  return true;
#else
  return false;
#endif
}

// out [M, N] = x [M, K] @ w.T + bias, with w packed by amx_pack: [N/32, K/32, 16, 32, 2].
void dpbf16_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                   const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(dpbf16_available(), "dpbf16_linear: this CPU or kernel build has no AVX512-BF16");
  const c10::BFloat16* bias_ptr = check_packed_linear("dpbf16_linear", out, x, packed, bias);
#ifdef DISTSERVE_HAVE_DPBF16
  if (x.size(0) > 0) dpbf16_linear_impl(out, x, packed, bias_ptr);
#endif
}

}  // namespace distserve

TORCH_LIBRARY_FRAGMENT(distserve_cpu, m) {
  m.def("dpbf16_available() -> bool", &distserve::dpbf16_available);
  m.def("dpbf16_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
}

TORCH_LIBRARY_IMPL(distserve_cpu, CPU, m) {
  m.impl("dpbf16_linear", &distserve::dpbf16_linear);
}
