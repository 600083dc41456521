// bf16 linear layer (out = x @ w.T + bias) on Intel AMX tiles, for CPUs that have them.
//
// Why: a decode step is ~4 matmuls per layer with only 1-64 rows; through torch each oneDNN
// call costs ~30 us before any arithmetic (SmolLM2: 121 calls, ~4 ms of a ~37 ms step at
// batch 32), and at these sizes oneDNN reaches only a third of the read bandwidth. Here a
// call is one pass: every thread streams its share of the weight once, block by block, in
// the order it lies in memory.
//
// Weight layout (amx_pack in models/amx_linear.py): w [N, K] cut into blocks of 32 output
// columns x 32 inputs, stored block after block ([N/32][K/32]), each block as AMX's B tile
// wants it: 16 rows of input pairs, each row 32 columns x 2 inputs (128 bytes). The two
// halves of a row (columns 0-15 and 16-31) are two B tiles read with a 128-byte stride.
// Tiles: C 0-3 (2 x 2 blocks of 16x16 float32), A 4-5 (16 rows x 32 inputs), B 6-7.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "kernels.h"
#include "packed_blocks.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__)
#define DISTSERVE_HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

// how far ahead of its tile loads each thread asks for weight blocks (8 KB): 2 to 16 blocks,
// into L1 or L2, all measured within noise of each other; none at all was ~1.3x slower at 32
// rows (each against oneDNN in the same run)
constexpr int64_t kPrefetchBlocks = 4;
constexpr int64_t kPanelBytes = 1 << 20;               // weight re-read per row block, from L2

#ifdef DISTSERVE_HAVE_AMX

struct TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out AMX state only to processes that ask for it (once per process).
bool amx_permitted() {
  static const bool ok = [] {
    constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// Tiles for a row block of `rows` (1-32) rows: A and C tiles of the second half exist only
// when rows > 16.
void configure_tiles(int64_t rows) {
  TileConfig cfg;
  const uint8_t top = static_cast<uint8_t>(std::min<int64_t>(rows, 16));
  const uint8_t bottom = static_cast<uint8_t>(std::max<int64_t>(rows - 16, 0));
  const uint8_t rows_of[8] = {top, top, bottom, bottom, top, bottom, 16, 16};
  for (int t = 0; t < 8; ++t) {
    if (rows_of[t] == 0) continue;
    cfg.rows[t] = rows_of[t];
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

inline void prefetch_block(const char* block) {
  for (int64_t line = 0; line < kBlockBytes; line += 64) _mm_prefetch(block + line, _MM_HINT_T0);
}

// c[0:rows, 0:16] and c[0:rows, 16:32] (float32, row stride 32) = a[0:rows, 0:K] @ one block
// column of the weight, for rows <= 16: tiles C 0-1, A 4, B 6-7.
inline void block_product_16(const c10::BFloat16* a, int64_t lda, const char* w, int64_t kblocks,
                             float* c) {
  const int64_t stride = lda * 2;
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const char* b = w + kb * kBlockBytes;
    prefetch_block(b + kPrefetchBlocks * kBlockBytes);  // past this column: the next one's
    _tile_loadd(4, a + kb * kBlock, stride);
    _tile_loadd(6, b, 128);
    _tile_loadd(7, b + 64, 128);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
}

// The same for 17-32 rows: tiles C 0-3 (2 x 2), A 4-5, B 6-7. Tiles are not renamed, so a
// load waits for the multiplies that read the tile before it: each tile is reloaded for the
// next block as soon as its last reader is issued (B6 after the two products that use it,
// then A4, A5, B7). Measured against the order A4 B6 B7, two products, A5, two products:
// 0.9x the time at 32 rows over SmolLM2's matrices (weights cold or in cache), 0.95x over the
// 1.1 GB benchmark model's. Needs kblocks >= 1 (amx_usable: K > 0).
inline void block_product_32(const c10::BFloat16* a, int64_t lda, const char* w, int64_t kblocks,
                             float* c) {
  const int64_t stride = lda * 2;
  const c10::BFloat16* a_bottom = a + 16 * lda;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a, stride);
  _tile_loadd(5, a_bottom, stride);
  _tile_loadd(6, w, 128);
  _tile_loadd(7, w + 64, 128);
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const char* next = w + (kb + 1) * kBlockBytes;
    prefetch_block(next + (kPrefetchBlocks - 1) * kBlockBytes);
    const bool more = kb + 1 < kblocks;
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if (more) _tile_loadd(6, next, 128);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
    if (more) {
      _tile_loadd(4, a + (kb + 1) * kBlock, stride);
      _tile_loadd(5, a_bottom + (kb + 1) * kBlock, stride);
      _tile_loadd(7, next + 64, 128);
    }
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  _tile_stored(2, c + 16 * kBlock, 128);
  _tile_stored(3, c + 16 * kBlock + 16, 128);
}

void amx_linear_impl(at::Tensor& out, const at::Tensor& x_in, const at::Tensor& packed,
                     const c10::BFloat16* bias) {
  const at::Tensor x = rows_apart(x_in);  // tile loads read 16 rows at once
  const int64_t m = x.size(0), n = out.size(1);
  const int64_t nblocks = packed.size(0), kblocks = packed.size(1);
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const char* wp = reinterpret_cast<const char*>(packed.data_ptr<c10::BFloat16>());
  auto* op = out.data_ptr<c10::BFloat16>();
  const int64_t lda = x.stride(0), ldo = out.stride(0);
  const int64_t panel = std::max<int64_t>(1, kPanelBytes / (kblocks * kBlockBytes));
  at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float c[kBlock * kBlock];
    int64_t configured_rows = -1;
    for (int64_t g = begin; g < end; g += panel) {  // a panel of the weight stays in L2...
      const int64_t g_end = std::min(end, g + panel);
      for (int64_t m0 = 0; m0 < m; m0 += kBlock) {  // ...while every row block passes it
        const int64_t rows = std::min(kBlock, m - m0);
        if (rows != configured_rows) { configure_tiles(rows); configured_rows = rows; }
        const c10::BFloat16* a = xp + m0 * lda;
        for (int64_t nb = g; nb < g_end; ++nb) {
          const char* w = wp + nb * kblocks * kBlockBytes;
          if (rows > 16) block_product_32(a, lda, w, kblocks, c);
          else block_product_16(a, lda, w, kblocks, c);
          const int64_t n0 = nb * kBlock;
          store_rows_bf16(c, kBlock, rows, std::min(kBlock, n - n0), bias ? bias + n0 : nullptr,
                          op + m0 * ldo + n0, ldo);
        }
      }
    }
    if (configured_rows >= 0) _tile_release();  // leave the tiles as oneDNN expects them
  });
}

#endif  // DISTSERVE_HAVE_AMX

}  // namespace

namespace distserve {  // entry points, also called by decode_layers.cpp

bool amx_available() {
#ifdef DISTSERVE_HAVE_AMX
  return amx_permitted();
#else
  return false;
#endif
}

// out [M, N] = x [M, K] @ w.T + bias, with w packed by amx_pack: [N/32, K/32, 16, 32, 2].
void amx_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(amx_available(), "amx_linear: this CPU or kernel does not allow AMX");
  const c10::BFloat16* bias_ptr = check_packed_linear("amx_linear", out, x, packed, bias);
#ifdef DISTSERVE_HAVE_AMX
  if (x.size(0) > 0) amx_linear_impl(out, x, packed, bias_ptr);
#endif
}

}  // namespace distserve

TORCH_LIBRARY_FRAGMENT(distserve_cpu, m) {
  m.def("amx_available() -> bool", &distserve::amx_available);
  m.def("amx_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
}

TORCH_LIBRARY_IMPL(distserve_cpu, CPU, m) {
  m.impl("amx_linear", &distserve::amx_linear);
}
