// The packed weight both bf16 linear kernels read (csrc/amx_linear.cpp on AMX tiles,
// csrc/dpbf16_linear.cpp on AVX512-BF16; amx_pack in models/packed_linear.py writes it):
// w [N, K] as [N/32][K/32][16][32][2], blocks of 32 output columns x 32 inputs, each as 16
// rows of input pairs. Their shared argument checks and epilogue.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "cpu_math.h"

constexpr int64_t kBlock = 32;                         // columns and inputs per block
constexpr int64_t kBlockBytes = kBlock * kBlock * 2;   // one packed 32 x 32 bf16 block

// Checks out [M, N] = x [M, K] @ w.T + bias against the packed w; the bias pointer or null.
inline const c10::BFloat16* check_packed_linear(const char* op, const at::Tensor& out, const at::Tensor& x,
                                                const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && packed.dim() == 5, op, ": x and out must be 2-D, "
              "the packed weight 5-D");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16 &&
              packed.scalar_type() == at::kBFloat16, op, ": bf16 tensors only");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1 && packed.is_contiguous(),
              op, ": rows of x and out must be contiguous, the packed weight contiguous");
  TORCH_CHECK(packed.size(2) == 16 && packed.size(3) == kBlock && packed.size(4) == 2,
              op, ": the weight is not packed in 32 x 32 blocks");
  TORCH_CHECK(packed.size(1) > 0, op, ": the weight has no inputs");
  TORCH_CHECK(x.size(1) == packed.size(1) * kBlock, op, ": x has ", x.size(1),
              " inputs, the weight ", packed.size(1) * kBlock);
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) <= packed.size(0) * kBlock &&
              out.size(1) > (packed.size(0) - 1) * kBlock, op, ": out has the wrong shape");
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() &&
              bias->numel() == out.size(1), op, ": bias must be bf16 of size N");
  return bias->data_ptr<c10::BFloat16>();
}

// x itself, or a copy of it whose rows lie apart in the L1 cache. A pass of the AVX512-BF16
// or AMX kernel reads the same input pair of up to 12 (or 32) rows of x at once; at a row
// stride that is a multiple of 1 KB (K = 512, 2048, 4096...: most models' hidden sizes)
// those reads fall in 4 or fewer of L1's 64 sets, 8 lines each, and evict each other while
// the weight streams through. One cache line of padding a row spreads them over 12-32 sets:
// at 12 and 32 rows of a 2048 x 11264 layer, 337-369 GFLOP/s became 421-427 (AMD Zen 4, 2
// threads, side by side in one process). The copy is m x K values; the weight is N x K.
inline at::Tensor rows_apart(const at::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1);
  if (m <= 1 || (x.stride(0) * x.element_size()) % 1024 != 0) return x;
  const int64_t pad = 64 / x.element_size();
  return at::empty({m, k + pad}, x.options()).narrow(1, 0, k).copy_(x);
}

// Runs work(claim) once on each of torch's threads over the column blocks [0, n): claim(nb)
// hands the thread its next block, false when none is left. Each thread streams its own
// contiguous share front to back, as at::parallel_for splits a range, and a thread done with
// its share takes blocks from the back of another's, one at a time.
// Why: a decode step is ~120 calls of tens of microseconds, and on a shared VM one thread
// is often slower for a while; with fixed shares every call waits for it. Measured side by
// side in one process (AMD Zen 4, 2 threads, AVX512-BF16): SmolLM2's 121 matrices at one row
// 0.92-0.98x the time (faster in 23-27 of 30 paired runs), the 1.1 GB model's at 32 rows
// 0.95x and at 4 rows 0.94x (13 and 15 of 16).
template <class Work>
void parallel_blocks(int64_t n, const Work& work) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  struct alignas(64) Share {       // one cache line each: no false sharing until a steal
    std::atomic<uint64_t> range;   // next block in the low 32 bits, one past the last in the high
  };
  std::vector<Share> shares(threads);
  for (int64_t t = 0; t < threads; ++t)
    shares[t].range.store(static_cast<uint64_t>(n * t / threads) |
                          (static_cast<uint64_t>(n * (t + 1) / threads) << 32));
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {   // one each, unless called inside a parallel region
      int64_t other = 0;                  // 0: our own share, from the front; then the others'
      work([&](int64_t& nb) {
        for (; other < threads; ++other) {
          Share& s = shares[(t + other) % threads];
          uint64_t r = s.range.load(std::memory_order_relaxed);
          while (static_cast<uint32_t>(r) < (r >> 32)) {
            const uint64_t next = other == 0 ? r + 1 : r - (uint64_t{1} << 32);
            if (s.range.compare_exchange_weak(r, next, std::memory_order_relaxed)) {
              nb = other == 0 ? static_cast<int64_t>(static_cast<uint32_t>(r)) : static_cast<int64_t>(r >> 32) - 1;
              return true;
            }
          }
        }
        return false;
      });
    }
  });
}

#ifdef __AVX512F__
// out[r, 0:cols] = round(c[r, 0:cols] + bias) for r < rows: the epilogue of the bf16 linear
// kernels (float32 sums, row stride ldc, into bf16 rows of stride ldo; bias may be null).
inline void store_rows_bf16(const float* c, int64_t ldc, int64_t rows, int64_t cols,
                            const c10::BFloat16* bias, c10::BFloat16* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* cr = c + r * ldc;
    c10::BFloat16* orow = out + r * ldo;
    int64_t j = 0;
    for (; j + 16 <= cols; j += 16) {
      __m512 v = _mm512_loadu_ps(cr + j);
      if (bias) v = _mm512_add_ps(v, load16(bias + j));
      store16(orow + j, v);
    }
    for (; j < cols; ++j) orow[j] = static_cast<c10::BFloat16>(cr[j] + (bias ? to_float(bias[j]) : 0.f));
  }
}

#endif  // __AVX512F__
