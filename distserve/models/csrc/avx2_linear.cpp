// bf16 linear layer (out = x @ w.T + bias) in float32 FMA over bf16-stored weights, for CPUs
// with AVX2 and FMA but no bf16 dot products (AMD Zen 2/3, Intel Haswell to Ice Lake client).
//
// Why: without AVX512-BF16 torch has no fast bf16 matmul, so the engine ran float32 and every
// decode step streamed 4 bytes a weight. Here the weight stays bf16 (2 bytes) and is widened
// in registers: bf16 is the top half of a float32, so a 32-bit lane holding an input pair
// (w[c, 2p], w[c, 2p + 1]) gives input 2p's float32 by a left shift of 16 and input 2p + 1's
// by masking the low half off. A decode step reads half the bytes; compute is float32 FMA.
//
// Weight layout: the one amx_pack makes (models/packed_linear.py), [N/32][K/32][16][32][2]:
// blocks of 32 output columns x 32 inputs, each as 16 rows p of 32 input pairs (128 bytes),
// four ymm loads of 8 columns each. x is widened to float32 once per call (per thread).
// Registers (16 ymm): one row of x takes the whole 32-column block (4 accumulators, 8 widened
// weights, 2 broadcasts); 2-23 rows take 16 columns at a time for up to kMaxRows rows
// (4 x 2 accumulators, 4 widened weights, 2 broadcasts), passing each half block once per row
// chunk, the second time from L2; 24 rows and more use a widened panel (below).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "packed_blocks.h"

#if defined(__AVX2__) && defined(__FMA__)
#define DISTSERVE_HAVE_AVX2_LINEAR 1
#include <immintrin.h>
#endif

namespace {

// weight blocks asked for ahead, 0 for none; set per machine (avx2_set_prefetch_blocks, by
// models/avx2_tuning.py: measured once, cached). Over SmolLM2's 121 matrices in a
// row (269 MB, from memory) at one row of x: on AMD Zen 3, 4 blocks ahead streamed 15-18 GB/s,
// 16 or 32 ahead 20-21 GB/s (torch's sum over a 1 GiB buffer: 21 GB/s), none at all 18-21; on
// AMD Zen 4 with every library held to AVX2, none was 1.15-1.6x faster than 16 ahead (25-39
// GB/s against 22-26; its hardware prefetchers alone stream faster, as for the AVX512-BF16
// kernel)
std::atomic<int64_t> prefetch_blocks{16};

#ifdef DISTSERVE_HAVE_AVX2_LINEAR

constexpr int kMaxRows = 4;            // rows of x per pass over a half column block
// from here on the widened panel (below) is faster: measured side by side over SmolLM2's and
// the 1.1 GB model's matrices (AMD EPYC, Zen 3, 2 threads), in GFLOP/s, in registers / panel:
// 4 rows 95-126 / 43-75, 16 rows 135-154 / 105-140, 24 rows 133-153 / 130-166, 128 rows
// 147-156 / 170-185, 512 rows 151-154 / 184-190 (torch's float32 matmul: 153-182)
constexpr int64_t kPanelMinRows = 24;

inline void prefetch_block(const char* block) {
  for (int64_t line = 0; line < kBlockBytes; line += 64) _mm_prefetch(block + line, _MM_HINT_T0);
}

// c[r][8 g0 : 8 (g0 + G)] (float32, row stride 32) = a[r, 0:K] @ columns 8 g0 .. 8 (g0 + G) - 1
// of one column block, for r < R; a is float32 with row stride lda.
template <int R, int G>
void column_groups(const float* a, int64_t lda, const char* w, int64_t kblocks, int g0, float* c) {
  __m256 acc[R][G];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) acc[r][g] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const int64_t ahead = g0 == 0 ? prefetch_blocks.load(std::memory_order_relaxed) : 0;
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const char* b = w + kb * kBlockBytes;
    if (ahead) prefetch_block(b + ahead * kBlockBytes);
    const float* ak = a + kb * kBlock;
#pragma GCC unroll 2
    for (int p = 0; p < 16; ++p) {
      __m256 even[G], odd[G];
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + p * 128 + (g0 + g) * 32));
        even[g] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        odd[g] = _mm256_castsi256_ps(_mm256_and_si256(v, high));
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m256 x0 = _mm256_broadcast_ss(ak + r * lda + 2 * p);
        const __m256 x1 = _mm256_broadcast_ss(ak + r * lda + 2 * p + 1);
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) {
          acc[r][g] = _mm256_fmadd_ps(x0, even[g], acc[r][g]);
          acc[r][g] = _mm256_fmadd_ps(x1, odd[g], acc[r][g]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) _mm256_storeu_ps(c + r * kBlock + 8 * (g0 + g), acc[r][g]);
}

// one pass of `rows` (1..kMaxRows) rows of a over a whole column block into c [rows][32]
void column_block(const float* a, int64_t lda, int64_t rows, const char* w, int64_t kblocks, float* c) {
  switch (rows) {
    case 1: column_groups<1, 4>(a, lda, w, kblocks, 0, c); return;
    case 2: for (int g0 : {0, 2}) column_groups<2, 2>(a, lda, w, kblocks, g0, c); return;
    case 3: for (int g0 : {0, 2}) column_groups<3, 2>(a, lda, w, kblocks, g0, c); return;
    default: for (int g0 : {0, 2}) column_groups<4, 2>(a, lda, w, kblocks, g0, c); return;
  }
}

// out[r, 0:cols] = bf16(c[r, 0:cols] + bias), rounded to nearest even as c10 does
void store_rows(const float* c, int64_t ldc, int64_t rows, int64_t cols, const c10::BFloat16* bias,
                c10::BFloat16* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j)
      out[r * ldo + j] = static_cast<c10::BFloat16>(c[r * ldc + j] + (bias ? to_float(bias[j]) : 0.f));
}

// --- many rows (prefill): each half column block widened once, then a 6 x 16 kernel ----
// Widening in registers costs 2 operations per 8 weights and pass; with many rows of x that
// repeats for every row chunk, and holding both halves of an input pair leaves no registers
// for more than 4 rows. So the half block (16 columns x K) is widened once into float32
// [K][16] (128 KB at K = 2048: it stays in L2) and every 6 rows of x pass over it with 12
// accumulators, 2 weight vectors and 1 broadcast: the classic AVX2 matmul kernel.
constexpr int kPanelRows = 6;
constexpr int64_t kHalf = 16;

// panel[k][0:16] = w[16 h + 0:16, k] for k < 32 kblocks, from the packed blocks of one column block
void widen_half(const char* w, int64_t kblocks, int h, float* panel) {
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const char* b = w + kb * kBlockBytes;
    float* pk = panel + kb * kBlock * kHalf;
    for (int p = 0; p < 16; ++p) {
      for (int g = 0; g < 2; ++g) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + p * 128 + (2 * h + g) * 32));
        _mm256_storeu_ps(pk + (2 * p) * kHalf + 8 * g, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
        _mm256_storeu_ps(pk + (2 * p + 1) * kHalf + 8 * g, _mm256_castsi256_ps(_mm256_and_si256(v, high)));
      }
    }
  }
}

// c[r][0:16] (row stride ldc) = a[r, 0:K] @ panel, for r < R
template <int R>
void panel_rows(const float* a, int64_t lda, const float* panel, int64_t k, float* c, int64_t ldc) {
  __m256 acc0[R], acc1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    const __m256 w0 = _mm256_loadu_ps(panel + i * kHalf), w1 = _mm256_loadu_ps(panel + i * kHalf + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r * lda + i);
      acc0[r] = _mm256_fmadd_ps(x, w0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(x, w1, acc1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(c + r * ldc, acc0[r]);
    _mm256_storeu_ps(c + r * ldc + 8, acc1[r]);
  }
}

using PanelFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t);
constexpr PanelFn kPanelRowsFn[kPanelRows] = {&panel_rows<1>, &panel_rows<2>, &panel_rows<3>,
                                              &panel_rows<4>, &panel_rows<5>, &panel_rows<6>};

void avx2_linear_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                      const c10::BFloat16* bias) {
  const int64_t m = x.size(0), n = out.size(1);
  const int64_t nblocks = packed.size(0), kblocks = packed.size(1);
  const char* wp = reinterpret_cast<const char*>(packed.data_ptr<c10::BFloat16>());
  auto* op = out.data_ptr<c10::BFloat16>();
  const int64_t k = kblocks * kBlock, ldo = out.stride(0);
  if (m >= kPanelMinRows) {
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    const float* xp = xf.data_ptr<float>();
    const int64_t lda = xf.stride(0);
    // row chunks of near-equal size (32 rows: 5, 5, 5, 5, 6, 6, not five of 6 and a thin 2)
    const int64_t passes = (m + kPanelRows - 1) / kPanelRows, small = m / passes, big = m % passes;
    parallel_blocks(nblocks, [&](const auto& claim) {
      std::vector<float> panel(k * kHalf);
      alignas(32) float c[kPanelRows * kHalf];
      for (int64_t nb; claim(nb);)
        for (int h = 0; h < 2; ++h) {
          const int64_t n0 = nb * kBlock + h * kHalf;
          if (n0 >= n) break;
          widen_half(wp + nb * kblocks * kBlockBytes, kblocks, h, panel.data());
          for (int64_t pass = 0, m0 = 0, rows = 0; pass < passes; ++pass, m0 += rows) {
            rows = small + (pass >= passes - big);
            kPanelRowsFn[rows - 1](xp + m0 * lda, lda, panel.data(), k, c, kHalf);
            store_rows(c, kHalf, rows, std::min(kHalf, n - n0), bias ? bias + n0 : nullptr, op + m0 * ldo + n0, ldo);
          }
        }
    });
    return;
  }
  // row chunks of equal size (10 rows: 4, 3, 3), so no pass is a thin one
  const int64_t chunks = (m + kMaxRows - 1) / kMaxRows;
  const int64_t chunk = (m + chunks - 1) / chunks;
  const c10::BFloat16* xb = x.data_ptr<c10::BFloat16>();
  parallel_blocks(nblocks, [&](const auto& claim) {
    alignas(32) float c[kMaxRows * kBlock];
    // x widened by each thread for itself: a few thousand values, where a float32 tensor
    // cost ~7 us of allocation and dispatch per call (121 calls a SmolLM2 decode step)
    std::vector<float> xf(m * k);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t i = 0; i < k; i += 8)
        _mm256_storeu_ps(xf.data() + r * k + i, load8(xb + r * x.stride(0) + i));
    const float* xp = xf.data();
    const int64_t lda = k;
    for (int64_t nb; claim(nb);) {
      const char* w = wp + nb * kblocks * kBlockBytes;
      const int64_t n0 = nb * kBlock;
      for (int64_t m0 = 0; m0 < m; m0 += chunk) {
        const int64_t rows = std::min(chunk, m - m0);
        column_block(xp + m0 * lda, lda, rows, w, kblocks, c);
        store_rows(c, kBlock, rows, std::min(kBlock, n - n0), bias ? bias + n0 : nullptr, op + m0 * ldo + n0, ldo);
      }
    }
  });
}

#endif  // DISTSERVE_HAVE_AVX2_LINEAR

}  // namespace

namespace distserve {  // entry points, also called by decode_layers.cpp

bool avx2_available() {
#ifdef DISTSERVE_HAVE_AVX2_LINEAR
  return true;
#else
  return false;
#endif
}

// out [M, N] = x [M, K] @ w.T + bias, with w packed by amx_pack: [N/32, K/32, 16, 32, 2].
void avx2_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                 const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(avx2_available(), "avx2_linear: this CPU or kernel build has no AVX2 and FMA");
  const c10::BFloat16* bias_ptr = check_packed_linear("avx2_linear", out, x, packed, bias);
#ifdef DISTSERVE_HAVE_AVX2_LINEAR
  if (x.size(0) > 0) avx2_linear_impl(out, x, packed, bias_ptr);
#endif
}

// Sets how many weight blocks ahead the kernel prefetches (0: none); returns the previous value.
int64_t avx2_set_prefetch_blocks(int64_t blocks) {
  TORCH_CHECK(blocks >= 0, "avx2_set_prefetch_blocks: blocks must be >= 0, got ", blocks);
  return prefetch_blocks.exchange(blocks);
}

}  // namespace distserve

TORCH_LIBRARY_FRAGMENT(distserve_cpu, m) {
  m.def("avx2_available() -> bool", &distserve::avx2_available);
  m.def("avx2_set_prefetch_blocks(int blocks) -> int", &distserve::avx2_set_prefetch_blocks);
  m.def("avx2_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
}

TORCH_LIBRARY_IMPL(distserve_cpu, CPU, m) {
  m.impl("avx2_linear", &distserve::avx2_linear);
}
