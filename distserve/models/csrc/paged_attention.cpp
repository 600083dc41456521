// Decode attention that reads K/V straight from the paged cache through block tables.
//
// Why: the torch path first copies every request's blocks into one padded tensor
// (index_select), then runs SDPA over it, so each byte of context is read three times
// and the padding is attended too. Here each (request, KV head) pair streams its own
// blocks once: a pass for the scores of the query heads that share the KV head, a
// softmax, and a pass for the weighted sum of V. Arithmetic in float32, as SDPA's CPU
// kernel does. AVX-512 or AVX2 vectors where the compiler targets them, plain loops otherwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_math.h"
#include "kernels.h"

namespace {

// One work item: request b's KV heads [h0, h0 + kv_heads) and the query heads that share
// them, q rows [h0 * group, (h0 + kv_heads) * group). Tokens are the outer loop and heads
// the inner one, so each token's K (then V) row of all the item's heads, contiguous in
// the cache, is read once and in order.
template <typename T>
struct Item {
  const T* cache;
  const int64_t* table;
  int64_t block_size, s_block, s_tok, s_head, kv_offset;
  int64_t h0, kv_heads, group, dim, len;
  const T* row(int64_t t, int64_t h) const {  // K of token t, head h0 + h (V: + kv_offset)
    return cache + table[t / block_size] * s_block + (t % block_size) * s_tok + (h0 + h) * s_head;
  }
  // At a block's first token, asks for the next block's rows (K, or V with kv_offset): a
  // block's slice of one layer is a few KB among other layers' slices, too short a run for
  // the hardware prefetcher to catch on its own.
  void prefetch_next_block(int64_t t, int64_t offset) const {
#ifdef DISTSERVE_SIMD
    if (t % block_size != 0 || t + block_size >= len) return;
    const char* first = reinterpret_cast<const char*>(row(t + block_size, 0) + offset);
    const char* last = reinterpret_cast<const char*>(row(t + block_size, kv_heads - 1) + offset + dim) +
                       (block_size - 1) * s_tok * sizeof(T);
    for (const char* line = first; line < last; line += 64) _mm_prefetch(line, _MM_HINT_T0);
#endif
  }
};

// Prefetches the next work item's K/V (its first blocks) a few cache lines at a time, fed
// from the current item's token loops. In a decode step each layer's K/V comes from memory
// (the weights streamed through the caches in between), and an item's first block had no
// prefetch at all. A burst of prefetches (into L2) at the item's start gained nothing
// measurable; spread over the work of the item before, 200-220 us a layer became 140-165
// (SmolLM2, batch 32, in real decode steps).
struct LineFeed {
  static constexpr int kMaxRanges = 16;
  const char* start[kMaxRanges];
  int64_t bytes[kMaxRanges];
  int count = 0, at = 0;
  int64_t offset = 0;
  void add(const void* p, int64_t n) {
    if (count < kMaxRanges && n > 0) {
      start[count] = static_cast<const char*>(p);
      bytes[count++] = n;
    }
  }
  void feed(int lines) {
#ifdef DISTSERVE_SIMD
    for (; lines > 0 && at < count; --lines) {
      _mm_prefetch(start[at] + offset, _MM_HINT_T0);
      offset += 64;
      if (offset >= bytes[at]) { ++at; offset = 0; }
    }
#endif
  }
};

// --- portable loops --------------------------------------------------------------------
// scores [kv_heads * group][len] = q . k
template <typename T>
void scores_plain(const Item<T>& it, const float* q, float* scores) {
  for (int64_t t = 0; t < it.len; ++t)
    for (int64_t h = 0; h < it.kv_heads; ++h) {
      const T* k = it.row(t, h);
      for (int64_t g = 0; g < it.group; ++g) {
        const int64_t j = h * it.group + g;
        float s = 0.f;
        for (int64_t d = 0; d < it.dim; ++d) s += q[j * it.dim + d] * to_float(k[d]);
        scores[j * it.len + t] = s;
      }
    }
}

// acc [kv_heads * group][dim] = p . v
template <typename T>
void values_plain(const Item<T>& it, const float* p, float* acc) {
  std::fill(acc, acc + it.kv_heads * it.group * it.dim, 0.f);
  for (int64_t t = 0; t < it.len; ++t)
    for (int64_t h = 0; h < it.kv_heads; ++h) {
      const T* v = it.row(t, h) + it.kv_offset;
      for (int64_t g = 0; g < it.group; ++g) {
        const int64_t j = h * it.group + g;
        const float w = p[j * it.len + t];
        for (int64_t d = 0; d < it.dim; ++d) acc[j * it.dim + d] += w * to_float(v[d]);
      }
    }
}

// Turns scores into probabilities in place.
void softmax_plain(float* s, int64_t len) {
  float mx = -INFINITY;
  for (int64_t t = 0; t < len; ++t) mx = std::max(mx, s[t]);
  float sum = 0.f;
  for (int64_t t = 0; t < len; ++t) {
    s[t] = std::exp(s[t] - mx);
    sum += s[t];
  }
  const float inv = 1.f / sum;
  for (int64_t t = 0; t < len; ++t) s[t] *= inv;
}

#ifdef DISTSERVE_SIMD
// --- vectors (AVX-512: 16 lanes, AVX2: 8) along the head dimension ----------------------
constexpr int64_t kMaxChunks = 256 / kLanes;  // head_dim up to 256

// Each K row is loaded (and converted) once for all the query heads that share it.
template <typename T>
void scores_vec(const Item<T>& it, const float* q, float* scores) {
  const int64_t chunks = it.dim / kLanes;
  vfloat kv[kMaxChunks];
  for (int64_t t = 0; t < it.len; ++t) {
    it.prefetch_next_block(t, 0);
    for (int64_t h = 0; h < it.kv_heads; ++h) {
      const T* k = it.row(t, h);
      for (int64_t c = 0; c < chunks; ++c) kv[c] = vload(k + kLanes * c);
      for (int64_t g = 0; g < it.group; ++g) {
        const int64_t j = h * it.group + g;
        const float* qj = q + j * it.dim;
        vfloat a = vmul(vload(qj), kv[0]);
        for (int64_t c = 1; c < chunks; ++c) a = vfma(vload(qj + kLanes * c), kv[c], a);
        scores[j * it.len + t] = vsum(a);
      }
    }
  }
}

template <typename T>
void values_vec(const Item<T>& it, const float* p, float* acc) {
  const int64_t chunks = it.dim / kLanes;
  std::fill(acc, acc + it.kv_heads * it.group * it.dim, 0.f);
  vfloat vv[kMaxChunks];
  for (int64_t t = 0; t < it.len; ++t) {
    it.prefetch_next_block(t, it.kv_offset);
    for (int64_t h = 0; h < it.kv_heads; ++h) {
      const T* v = it.row(t, h) + it.kv_offset;
      for (int64_t c = 0; c < chunks; ++c) vv[c] = vload(v + kLanes * c);
      for (int64_t g = 0; g < it.group; ++g) {
        const int64_t j = h * it.group + g;
        const vfloat w = vset1(p[j * it.len + t]);
        float* aj = acc + j * it.dim;
        for (int64_t c = 0; c < chunks; ++c) vstore(aj + kLanes * c, vfma(w, vv[c], vload(aj + kLanes * c)));
      }
    }
  }
}

void softmax_vec(float* s, int64_t len) {
  const int64_t whole = len / kLanes * kLanes;
  vfloat m = vset1(-INFINITY);
  for (int64_t t = 0; t < whole; t += kLanes) m = vmax(m, vload(s + t));
  float mx = vmaxval(m);
  for (int64_t t = whole; t < len; ++t) mx = std::max(mx, s[t]);
  const vfloat vmx = vset1(mx);
  vfloat acc = vzero();
  for (int64_t t = 0; t < whole; t += kLanes) {
    const vfloat e = exp_nonpositive(vsub(vload(s + t), vmx));
    vstore(s + t, e);
    acc = vadd(acc, e);
  }
  float sum = vsum(acc);
  for (int64_t t = whole; t < len; ++t) {
    s[t] = std::exp(s[t] - mx);
    sum += s[t];
  }
  const float inv = 1.f / sum;
  const vfloat vinv = vset1(inv);
  for (int64_t t = 0; t < whole; t += kLanes) vstore(s + t, vmul(vload(s + t), vinv));
  for (int64_t t = whole; t < len; ++t) s[t] *= inv;
}
#endif  // DISTSERVE_SIMD

#ifdef __AVX512F__
// --- AVX-512 with the query heads of one KV head in registers (head_dim 64 and 128) -----
// Why: at short contexts the loops above spend more on reductions and on accumulators in
// memory than on the K/V bytes (SmolLM2, batch 32, ~80 tokens, K/V in cache: this path
// takes 0.6x the time, 0.75x at 300 tokens; in a decode step, where K/V come from memory,
// it gained little until the LineFeed prefetch above). At head_dim 128, 2 query heads at a
// time (4 spill at 300+ tokens): on the AMD EPYC host 0.40-0.47x the time of the loops
// above at 80-500 tokens (1.1 GB model's shapes, batch 32, K/V in cache), and 190-205 us
// a layer instead of 440 in its batch-32 decode step (the step 0.95x); on the Intel host
// of session 4 the same 2-head pass measured up to 8% slower at 500 tokens.
// Here, per KV head and per group of G query heads: q (G x CH vectors) stays in registers;
// scores of 16 tokens are reduced together (sum16: 45 ops for 16 dot products instead of
// ~9 each); and the weighted sum of V accumulates in registers across all tokens.

// r[i] = sum of the 16 lanes of v[i], i < 16.
inline __m512 sum16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sum of v[4i .. 4i+3]
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(x01, x23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// scores of query heads j0 .. j0+G-1 (all sharing KV head h) over every token.
template <typename T, int CH, int G>
void scores_heads(const Item<T>& it, int64_t h, int64_t j0, const float* q, float* scores, LineFeed& next) {
  __m512 qv[G][CH];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CH; ++c) qv[g][c] = _mm512_loadu_ps(q + (j0 + g) * it.dim + 16 * c);
  __m512 part[G][16];
  for (int64_t t0 = 0; t0 < it.len; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, it.len - t0);
    for (int64_t i = 0; i < 16; ++i) {
      if (i >= n) {  // past the context: zeros, never stored
        for (int g = 0; g < G; ++g) part[g][i] = _mm512_setzero_ps();
        continue;
      }
      if (h == 0) it.prefetch_next_block(t0 + i, 0);
      next.feed(2);
      const T* k = it.row(t0 + i, h);
      __m512 kv[CH];
      for (int c = 0; c < CH; ++c) kv[c] = load16(k + 16 * c);
      for (int g = 0; g < G; ++g) {
        __m512 a = _mm512_mul_ps(qv[g][0], kv[0]);
        for (int c = 1; c < CH; ++c) a = _mm512_fmadd_ps(qv[g][c], kv[c], a);
        part[g][i] = a;
      }
    }
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
    for (int g = 0; g < G; ++g) _mm512_mask_storeu_ps(scores + (j0 + g) * it.len + t0, valid, sum16(part[g]));
  }
}

// acc rows j0 .. j0+G-1 = p . v over every token, for KV head h.
template <typename T, int CH, int G>
void values_heads(const Item<T>& it, int64_t h, int64_t j0, const float* p, float* acc, LineFeed& next) {
  __m512 a[G][CH];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CH; ++c) a[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < it.len; ++t) {
    if (h == 0) it.prefetch_next_block(t, it.kv_offset);
    next.feed(2);
    const T* v = it.row(t, h) + it.kv_offset;
    __m512 vv[CH];
    for (int c = 0; c < CH; ++c) vv[c] = load16(v + 16 * c);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(p[(j0 + g) * it.len + t]);
      for (int c = 0; c < CH; ++c) a[g][c] = _mm512_fmadd_ps(w, vv[c], a[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CH; ++c) _mm512_storeu_ps(acc + (j0 + g) * it.dim + 16 * c, a[g][c]);
}

// For each KV head: its query heads, at most GMAX at a time (GMAX x CH = 16 registers of q).
template <typename T, int CH, int GMAX>
void attend_in_registers(const Item<T>& it, const float* q, float* scores, float* acc, LineFeed& next) {
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t h = 0; h < it.kv_heads; ++h)
      for (int64_t g0 = 0; g0 < it.group; g0 += GMAX) {
        const int64_t j0 = h * it.group + g0;
#define DISTSERVE_HEADS(G) (pass == 0 ? scores_heads<T, CH, G>(it, h, j0, q, scores, next) \
                                      : values_heads<T, CH, G>(it, h, j0, scores, acc, next))
        switch (std::min<int64_t>(GMAX, it.group - g0)) {
          case 4: if constexpr (GMAX >= 4) DISTSERVE_HEADS(4); break;
          case 3: if constexpr (GMAX >= 3) DISTSERVE_HEADS(3); break;
          case 2: DISTSERVE_HEADS(2); break;
          default: DISTSERVE_HEADS(1);
        }
#undef DISTSERVE_HEADS
      }
    if (pass == 0)
      for (int64_t j = 0; j < it.kv_heads * it.group; ++j) softmax_vec(scores + j * it.len, it.len);
  }
}

#endif

template <typename T>
void decode_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& cache,
                      const at::Tensor& block_tables, const at::Tensor& context_lens,
                      double scale) {
  const int64_t batch = q.size(0), num_heads = q.size(1), dim = q.size(2);
  const int64_t num_kv_heads = cache.size(3), group = num_heads / num_kv_heads;
  const int64_t width = block_tables.size(1);
  const T* q_ptr = q.data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  const T* cache_ptr = cache.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);
#ifdef DISTSERVE_SIMD
  const bool vector = dim % kLanes == 0 && dim / kLanes <= kMaxChunks;
#endif
  // whole requests per item when there are enough of them for the threads; else split heads
  const int64_t splits = std::min(num_kv_heads, (at::get_num_threads() + batch - 1) / batch);
  const int64_t heads_per_item = (num_kv_heads + splits - 1) / splits;

  at::parallel_for(0, batch * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, acc, scores;
    for (int64_t index = begin; index < end; ++index) {
      LineFeed next;  // the next item's first blocks, K and V
      if (index + 1 < end) {
        const int64_t nb = (index + 1) / splits, len = lens[nb];
        const int64_t rows_bytes = cache.stride(2) * static_cast<int64_t>(sizeof(T));
        for (int64_t t0 = 0; t0 < len && next.count + 2 <= LineFeed::kMaxRanges; t0 += cache.size(2)) {
          const T* k = cache_ptr + tables[nb * width + t0 / cache.size(2)] * cache.stride(0);
          const int64_t n = std::min(cache.size(2), len - t0) * rows_bytes;
          next.add(k, n);
          next.add(k + cache.stride(1), n);
        }
      }
      const int64_t b = index / splits, h0 = index % splits * heads_per_item;
      const int64_t kv_heads = std::min(heads_per_item, num_kv_heads - h0);
      if (kv_heads <= 0) continue;
      const Item<T> it{cache_ptr, tables + b * width, cache.size(2), cache.stride(0), cache.stride(2),
                       cache.stride(3), cache.stride(1), h0, kv_heads, group, dim, lens[b]};
      const int64_t nq = kv_heads * group;
      const T* qrow = q_ptr + b * q.stride(0) + h0 * group * dim;  // heads of a row are adjacent
      qf.resize(nq * dim);
      acc.resize(nq * dim);
      scores.resize(nq * it.len);
      for (int64_t i = 0; i < nq * dim; ++i) qf[i] = to_float(qrow[i]) * fscale;
#ifdef __AVX512F__
      if (dim == 64) {
        attend_in_registers<T, 4, 4>(it, qf.data(), scores.data(), acc.data(), next);
      } else if (dim == 128) {
        attend_in_registers<T, 8, 2>(it, qf.data(), scores.data(), acc.data(), next);
      } else
#endif
#ifdef DISTSERVE_SIMD
      if (vector) {
        scores_vec(it, qf.data(), scores.data());
        for (int64_t j = 0; j < nq; ++j) softmax_vec(scores.data() + j * it.len, it.len);
        values_vec(it, scores.data(), acc.data());
      } else
#endif
      {
        scores_plain(it, qf.data(), scores.data());
        for (int64_t j = 0; j < nq; ++j) softmax_plain(scores.data() + j * it.len, it.len);
        values_plain(it, scores.data(), acc.data());
      }
      T* o = out_ptr + (b * num_heads + h0 * group) * dim;
      for (int64_t i = 0; i < nq * dim; ++i) o[i] = static_cast<T>(acc[i]);
    }
  });
}

}  // namespace

namespace distserve {  // entry points, also called by decode_layers.cpp

// out [B, Hq, D] (written), q [B, Hq, D] (rows may be apart), cache [num_blocks, 2, block_size, Hkv, D]
// (any strides but a contiguous last dim), block_tables [B, W] int64, context_lens [B] int64.
void paged_decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens,
                            double scale) {
  // q may be a view into the fused q/k/v projection: rows apart, each row's heads contiguous
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && out.is_contiguous(),
              "q must have contiguous rows of heads, out must be contiguous");
  TORCH_CHECK(cache.dim() == 5 && cache.size(1) == 2 && cache.stride(4) == 1,
              "cache must be [blocks, 2, block_size, heads, dim] with a contiguous last dim");
  TORCH_CHECK(q.dim() == 3 && q.size(2) == cache.size(4) && q.size(1) % cache.size(3) == 0,
              "q must be [batch, heads, dim] with heads a multiple of the KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong &&
              block_tables.is_contiguous() && context_lens.is_contiguous(),
              "block tables and lengths must be contiguous int64");
  TORCH_CHECK(q.scalar_type() == cache.scalar_type() && out.scalar_type() == q.scalar_type(),
              "q, out and cache must share a dtype");
  DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_decode_attention",
                       decode_attention<scalar>(out, q, cache, block_tables, context_lens, scale));
}

// float32 lanes of the vectors this build's kernels use: 16 (AVX-512), 8 (AVX2), 1 (plain loops)
int64_t simd_lanes() {
#ifdef DISTSERVE_SIMD
  return kLanes;
#else
  return 1;
#endif
}

}  // namespace distserve

TORCH_LIBRARY(distserve_cpu, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor cache, Tensor block_tables, "
        "Tensor context_lens, float scale) -> ()");
  m.def("simd_lanes() -> int", &distserve::simd_lanes);
}

TORCH_LIBRARY_IMPL(distserve_cpu, CPU, m) {
  m.impl("paged_decode_attention", &distserve::paged_decode_attention);
}
